"""Measured-boot reference sets on the real API server, with swtpm members and event logs.

Each member's swtpm has its PCR 4 extended with the digests of the boot it "ran" (shim, a
bootloader, a separator), and its agent (a real `gtvp-agent` process) sends an event log
file with the quote. The SecurityPolicy's member class accepts two boots at once (a staged
rollout from grub 2.06 to 2.12); golden values hold the other PCRs.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gtvp.core.eventlog import parse_event_log
from gtvp.core.refvalues import learn
from gtvp_local.controlplane import ControlPlane, agent_identity
from gtvp_local.pool import GOLDEN_PCRS, Pool, _bin, pool_policy
from tests.unit.test_refvalues import boot, synth_log

pytestmark = [pytest.mark.controlplane, pytest.mark.tpm]

ZERO = "00" * 32
# member -> (the boot its TPM measured, the boot its event log claims)
BOOTS = {
    "a": (b"grub-2.06", b"grub-2.06"),  # on the old reference set
    "b": (b"grub-2.12", b"grub-2.12"),  # on the new one
    "c": (b"grub-2.14-rc1", b"grub-2.14-rc1"),  # a bootloader no set allows (yet)
    "d": (b"grub-2.06-backdoored", b"grub-2.06"),  # a good log beside another boot's quote
}


def _ref_set(name: str, bootloader: bytes) -> dict[str, Any]:
    return learn(parse_event_log(synth_log(boot(bootloader))), "sha256", [4], name=name)


class Fleet:
    def __init__(self, pool: Pool, names: dict[str, str], logs: dict[str, Path]) -> None:
        self.pool, self.names, self.logs = pool, names, logs

    def gtvp(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gtvp.cli", *argv],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )

    def kubeconfig(self) -> str:
        return str(self.pool.cp.admin_kubeconfig)


@pytest.fixture(scope="module")
def fleet(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("refsets")
    pool = Pool(control_plane, tmp / "pool", policy=f"rs-{uuid.uuid4().hex[:6]}")
    pool.install_access()
    prefix = f"r{uuid.uuid4().hex[:4]}"
    names = {key: f"{prefix}-{key}" for key in BOOTS}
    logs: dict[str, Path] = {}
    for key, (measured, claimed) in BOOTS.items():
        name = names[key]
        pool.add_member(name, identity=2, start_agent=False)
        for _pcr, _type, data in boot(measured):
            pool.extend_pcr(name, 4, data)
        logs[key] = tmp / f"{key}.log"
        logs[key].write_bytes(synth_log(boot(claimed)))
    pool.ca.ensure()
    policy = pool_policy(pool.ca, name=pool.policy_name, interval="2s", valid_for="6s")
    policy["spec"]["memberClasses"] = [
        {
            "name": "swtpm",
            "goldenPCRs": {str(p): ZERO for p in GOLDEN_PCRS if p != 4},
            "referenceSets": [
                _ref_set("grub-2-06", b"grub-2.06"),
                _ref_set("grub-2-12", b"grub-2.12"),
            ],
        }
    ]
    pool.put(policy)
    pool.start_operator()
    for key, name in names.items():
        kubeconfig = control_plane.kubeconfig_for(agent_identity(name))
        pool.procs.start(
            f"agent-{name}",
            [
                _bin("gtvp-agent"),
                "--node",
                name,
                "--tpm",
                pool.tpm(name).tcti,
                "--kubeconfig",
                str(kubeconfig),
                "--state-dir",
                str(pool.dir / "agent-state"),
                "--event-log",
                str(logs[key]),
            ],
        )
    try:
        yield Fleet(pool, names, logs)
    finally:
        pool.stop()
        pool.delete_members()
        control_plane.kubectl("delete", "securitypolicy", pool.policy_name, "--ignore-not-found")


def test_members_on_either_reference_set_are_trusted_and_status_names_which(fleet: Fleet) -> None:
    for key, ref in (("a", "grub-2-06"), ("b", "grub-2-12")):
        m = fleet.pool.wait_phase(fleet.names[key], "Trusted", timeout=90)
        trust = m["status"]["trust"]
        assert trust["referenceSet"] == ref
        assert f"reference set {ref}" in trust["message"]
        # the log it replayed against the signed PCRs: what `policy learn` may learn from
        assert trust["eventLogSHA256"] == hashlib.sha256(fleet.logs[key].read_bytes()).hexdigest()
        assert (trust["eventLogBank"], trust["eventLogPCRs"]) == ("sha256", list(range(8)))


def test_a_bootloader_no_set_allows_is_untrusted_with_the_event_named(fleet: Fleet) -> None:
    m = fleet.pool.wait_phase(fleet.names["c"], "Untrusted", reason="EventNotAllowed", timeout=90)
    msg = m["status"]["trust"]["message"]
    digest = parse_event_log(synth_log(boot(b"grub-2.14-rc1"))).events[1].digests["sha256"]
    assert f"event 1 (PCR 4, EV_EFI_BOOT_SERVICES_APPLICATION, sha256 {digest.hex()})" in msg
    assert "'grub-2-06'" in msg
    assert "'grub-2-12'" in msg
    assert "referenceSet" not in m["status"]["trust"]


def test_an_allowlisted_log_that_does_not_replay_to_the_quote_is_refused(fleet: Fleet) -> None:
    m = fleet.pool.wait_phase(fleet.names["d"], "Untrusted", reason="EventLogMismatch", timeout=90)
    assert "PCR 4" in m["status"]["trust"]["message"]
    assert "eventLogSHA256" not in m["status"]["trust"]


def test_learn_refuses_an_untrusted_member(fleet: Fleet) -> None:
    fleet.pool.wait_phase(fleet.names["c"], "Untrusted", timeout=90)
    out = fleet.gtvp(
        "policy", "learn", "--member", fleet.names["c"], "--kubeconfig", fleet.kubeconfig()
    )
    assert out.returncode == 1
    assert "only a Trusted member's boot is proposed" in out.stderr


def test_learn_from_a_trusted_member_proposes_its_boot(fleet: Fleet) -> None:
    fleet.pool.wait_phase(fleet.names["b"], "Trusted", timeout=90)
    out = fleet.gtvp(
        "policy", "learn", "--member", fleet.names["b"], "--kubeconfig", fleet.kubeconfig()
    )
    assert out.returncode == 0, out.stderr
    assert f"SecurityPolicy {fleet.pool.policy_name}" in out.stdout
    (op,) = yaml.safe_load(out.stdout)
    assert op["path"] == "/spec/memberClasses/0/referenceSets/-"
    # the policy's selection is 0-7: only PCR 4 holds events in this log, and every other
    # PCR asked for gets a rule allowing no event (a learned set verifies the whole selection)
    learned = learn(
        parse_event_log(synth_log(boot(b"grub-2.12"))), "sha256", list(range(8)), name="x"
    )
    assert op["value"]["pcrs"] == learned["pcrs"]
    assert [r["pcr"] for r in op["value"]["pcrs"]] == list(range(8))
    assert [r["pcr"] for r in op["value"]["pcrs"] if r["events"]] == [4]
    # only what the verified quote covered: no PCR it did not sign, no other bank
    for extra, said in (
        (("--pcrs", "4,8"), "did not cover PCR(s) 8"),
        (("--bank", "sha384"), "was verified in the sha256 bank, not sha384"),
    ):
        out = fleet.gtvp(
            "policy", "learn", "--member", fleet.names["b"], "--kubeconfig", fleet.kubeconfig(),
            *extra,
        )  # fmt: skip
        assert out.returncode == 1, out.stdout
        assert said in out.stderr
    # nothing was applied
    policy = json.loads(
        fleet.pool.cp.kubectl("get", "securitypolicy", fleet.pool.policy_name, "-o", "json").stdout
    )
    assert len(policy["spec"]["memberClasses"][0]["referenceSets"]) == 2


def test_learned_patch_applied_by_a_person_makes_the_member_trusted(
    fleet: Fleet, tmp_path: Path
) -> None:
    """c's bootloader was reviewed (a release candidate rolled to one canary): a person
    learns its set from the log, applies the patch, and c turns Trusted on it."""
    out = fleet.gtvp(
        "policy",
        "learn",
        "--event-log",
        str(fleet.logs["c"]),
        "--pcrs",
        "4",
        "--name",
        "grub-2-14-canary",
    )
    assert out.returncode == 0, out.stderr
    patch = tmp_path / "patch.yaml"
    patch.write_text(out.stdout)
    fleet.pool.cp.kubectl(
        "patch",
        "securitypolicy",
        fleet.pool.policy_name,
        "--type",
        "json",
        "--patch-file",
        str(patch),
    )
    m = fleet.pool.wait_phase(fleet.names["c"], "Trusted", timeout=90)
    assert m["status"]["trust"]["referenceSet"] == "grub-2-14-canary"


def test_an_expired_reference_set_quarantines_its_members_only(fleet: Fleet) -> None:
    fleet.pool.wait_phase(fleet.names["a"], "Trusted", timeout=90)
    fleet.pool.cp.kubectl(
        "patch",
        "securitypolicy",
        fleet.pool.policy_name,
        "--type",
        "json",
        "-p",
        json.dumps(
            [
                {
                    "op": "add",
                    "path": "/spec/memberClasses/0/referenceSets/0/notAfter",
                    "value": "2026-01-01T00:00:00Z",
                }
            ]
        ),
    )
    m = fleet.pool.wait_phase(
        fleet.names["a"], "Untrusted", reason="ReferenceSetExpired", timeout=90
    )
    assert (
        "reference set 'grub-2-06' expired at 2026-01-01T00:00:00Z"
        in m["status"]["trust"]["message"]
    )
    assert "referenceSet" not in m["status"]["trust"]  # it matches none now
    b = fleet.pool.member(fleet.names["b"])
    assert b["status"]["phase"] == "Trusted"
    assert b["status"]["trust"]["referenceSet"] == "grub-2-12"
