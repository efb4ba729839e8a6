"""A VM written again keeps its running guest's key-release credential only as far as the
cloud-init Secret allows: written at the resourceVersion it was read at (read and decided
again when it changed), a fresh one when it is gone, and a Secret gtvp cannot read or write
says so (the box waits) instead of throwing out of the box loop, which had the member's
verdict use counted for a placement never written. Found by reviews."""

from __future__ import annotations

import base64
import copy
from types import SimpleNamespace
from typing import Any, cast

import pytest
from kubernetes.client import V1ObjectMeta, V1OwnerReference, V1Secret
from kubernetes.client.exceptions import ApiException

from gtvp import key_release, kube
from gtvp.core import compose
from gtvp.core import keyrelease as kr
from gtvp.runtime import OperatorSettings, Runtime

KEY = ("shop", "vault")
BOX_UID = "box-uid"
RUNNING = "2026-12-05T12:00:10Z"
CREDENTIAL = "c" * 43


def _secret(rv: str, annotations: dict[str, str]) -> V1Secret:
    text = compose.key_release_user_data(
        "#cloud-config\n{}\n", credential=CREDENTIAL, url="https://gtvp:1", path=kr.PATH,
        namespace=KEY[0], box=KEY[1],
    )  # fmt: skip
    return V1Secret(
        metadata=V1ObjectMeta(
            name=kr.cloud_init_secret(KEY[1]),
            namespace=KEY[0],
            resource_version=rv,
            annotations=annotations,
            owner_references=[
                V1OwnerReference(
                    api_version="gtvp.io/v1alpha1",
                    kind="LazyBox",
                    name=KEY[1],
                    uid=BOX_UID,
                    controller=True,
                )
            ],
        ),
        data={kr.USER_DATA_KEY: base64.b64encode(text.encode()).decode()},
    )


class _Core:
    """The Secret API as far as arming goes: `reads` served in turn, `replies` to each
    replace (None: done; an ApiException: raised); creates recorded."""

    def __init__(self, reads: list[Any], replies: list[Any]) -> None:
        self.reads, self.replies = reads, replies
        self.replaced: list[dict[str, Any]] = []
        self.created: list[dict[str, Any]] = []

    def read_namespaced_secret(self, *_a: Any, **_kw: Any) -> Any:
        got = self.reads.pop(0) if len(self.reads) > 1 else self.reads[0]
        if isinstance(got, Exception):
            raise got
        return got

    def replace_namespaced_secret(self, _name: str, _ns: str, body: Any, **_kw: Any) -> Any:
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        self.replaced.append(copy.deepcopy(body))
        return body

    def create_namespaced_secret(self, _ns: str, body: Any, **_kw: Any) -> Any:
        self.created.append(copy.deepcopy(body))
        return body


def _runtime(core: _Core) -> Runtime:
    clients = cast(kube.Clients, SimpleNamespace(core=core, field_manager="gtvp"))
    rt = Runtime(settings=OperatorSettings(), clients=clients)
    rt.key_release = kr.Settings(url="https://gtvp:1", ca_pem=None)
    rt.view.boxes[KEY] = {"metadata": {"name": KEY[1], "namespace": KEY[0], "uid": BOX_UID}}
    rt.view.vmis[KEY] = {
        "metadata": {"name": KEY[1], "namespace": KEY[0], "uid": "vmi-1",
                     "creationTimestamp": RUNNING},
        "status": {"phase": "Running"},
    }  # fmt: skip
    return rt


VM = {"metadata": {"name": KEY[1]}, "spec": {"template": {"spec": {
    "domain": {"devices": {"disks": [{"name": "cloudinit", "disk": {"bus": "virtio"}}]}},
    "volumes": [{"name": "cloudinit", "cloudInitNoCloud": {"userData": "#cloud-config\n{}\n"}}],
}}}}  # fmt: skip
ISSUED = kr.issued_annotations(CREDENTIAL, "2026-12-05T12:00:00Z")


def _credential_in(body: dict[str, Any]) -> str | None:
    text = base64.b64decode(body["data"][kr.USER_DATA_KEY]).decode()
    return compose.key_release_credential_of(text)


def test_a_secret_changed_since_its_read_is_read_and_decided_again() -> None:
    conflict = ApiException(status=409, reason="Conflict")
    core = _Core([_secret("1", ISSUED), _secret("2", ISSUED)], [conflict, None])
    assert isinstance(key_release.arm(_runtime(core), KEY, VM), dict)
    (written,) = core.replaced
    assert written["metadata"]["resourceVersion"] == "2"
    assert _credential_in(written) == CREDENTIAL  # kept: still its guest's, unused


def test_a_credential_a_release_consumed_meanwhile_is_never_made_current_again() -> None:
    used = kr.consumed_annotations(
        ISSUED, used=kr.credential_hash(CREDENTIAL), next_credential="n" * 43,
        now="2026-12-05T12:00:30Z", vmi="vmi-1",
    )  # fmt: skip
    conflict = ApiException(status=409, reason="Conflict")
    core = _Core([_secret("1", ISSUED), _secret("2", used)], [conflict])
    assert isinstance(key_release.arm(_runtime(core), KEY, VM), dict)
    assert not core.replaced
    (created,) = core.created
    assert _credential_in(created) not in (None, CREDENTIAL, "n" * 43)


def test_a_secret_gone_meanwhile_gets_a_fresh_credential() -> None:
    core = _Core([_secret("1", ISSUED)], [ApiException(status=404, reason="Not Found")])
    assert isinstance(key_release.arm(_runtime(core), KEY, VM), dict)
    (created,) = core.created
    assert _credential_in(created) not in (None, CREDENTIAL)


@pytest.mark.parametrize("where", ["read", "replace"])
def test_a_secret_the_api_server_fails_on_is_said_and_nothing_is_written(where: str) -> None:
    failure = ApiException(status=500, reason="etcdserver: request timed out")
    core = _Core([failure], []) if where == "read" else _Core([_secret("1", ISSUED)], [failure])
    got = key_release.arm(_runtime(core), KEY, VM)
    assert isinstance(got, str)
    assert "500" in got
    assert not core.created


def test_arming_that_fails_without_an_answer_spends_no_verdict_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A timeout or a dropped connection while arming (no ApiException) left the use the
    plan counted for the placement to be spent, on every pass while it lasted: the VM is
    not written, so nothing is spent, and the box is looked at again. Found by a review."""
    from gtvp import box_attestation
    from gtvp.core.boxes import Decision
    from gtvp.core.placement import Placement
    from gtvp.handlers import lazyboxes

    rt = _runtime(_Core([_secret("1", ISSUED)], []))

    def plan(rt_: Runtime, _key: Any) -> Decision:
        rt_.boxes.unspent["m1"] += 1  # as `_plan` counts a placement
        return Decision({"phase": "Placing"}, vm=copy.deepcopy(VM),
                        placement=Placement("m1", "cached"))  # fmt: skip

    def timed_out(*_a: Any, **_kw: Any) -> Any:
        raise TimeoutError("read timed out")

    monkeypatch.setattr(lazyboxes, "_plan", plan)
    monkeypatch.setattr(box_attestation, "arm", timed_out)
    with pytest.raises(TimeoutError):
        lazyboxes.reconcile_box(rt, KEY)
    assert rt.boxes.unspent["m1"] == 0


def test_user_data_that_is_no_yaml_holds_no_credential() -> None:
    """Whoever may write Secrets in the namespace can put anything in the cloud-init
    Secret: an impossible date or deep nesting is no credential, not an error."""
    assert compose.key_release_credential_of("a: 2026-02-30\n") is None
    assert compose.key_release_credential_of("[" * 5000) is None


def test_a_secret_that_keeps_changing_leaves_the_box_waiting_not_its_guest_locked_out() -> None:
    conflict = ApiException(status=409, reason="Conflict")
    core = _Core([_secret(str(i), ISSUED) for i in range(4)], [conflict] * 3)
    got = key_release.arm(_runtime(core), KEY, VM)
    assert isinstance(got, str)
    assert "kept changing" in got
    assert not core.created
