"""The agent's loop: read its Member, answer what the operator asks, write only status.agent.

One `step` reads the Member named after this node and, in one status write at most:
publishes the enrolment (EK public area and certificate, AK) when it differs, answers an
outstanding credential challenge with ActivateCredential, and answers an outstanding nonce
with a quote at once (the operator publishes each nonce when its quote is due; one an older
operator published ahead waits for its `answerAfter`). Between steps it watches its Member
(one watch, server-side field selector), so an idle agent costs no writes and no polling;
it reads its Member again just after a quote falls due, should the watch miss the nonce.

Restart-safe: the AK is reloaded from its blobs, and a challenge already answered is not
answered twice. A TPM that disappears is reported in status.agent.error and retried with
back-off. Secrets (the activated credential) are written only to the API server, never
logged.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from gtvp.core.timestamps import format_ts, parse_ts
from gtvp_agent import __version__
from gtvp_agent.tpm import Enrolment, Tpm, TpmUnavailable

log = logging.getLogger("gtvp_agent")

GROUP, VERSION, PLURAL = "gtvp.io", "v1alpha1", "members"
EVENT_LOG = Path("/sys/kernel/security/tpm0/binary_bios_measurements")
MAX_EVENT_LOG = 1024 * 1024 // 4 * 3
"""The largest event log sent: its base64 must fit the Member CRD's 1 MiB for
`evidence.eventLog` (a larger one would make every evidence write fail)."""
API_TIMEOUT = (10.0, 60.0)
"""Seconds to connect and to wait for each read of an API answer: a call the API server
never answers (a half-open connection after it restarted) fails and is retried instead of
stopping the agent's loop for good. A watch waits its own length on top."""
DUE_SLACK = 1.0
"""Seconds after a quote's `answerAfter` the agent reads its Member again if no nonce came."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


@dataclass
class AgentConfig:
    node: str
    tcti: str
    state_dir: Path
    ek_type: str = "rsa"
    ak_type: str = "ecc"
    event_log: Path | None = EVENT_LOG
    idle_watch_seconds: int = 60


class Agent:
    """The attestation agent of one node."""

    def __init__(
        self,
        api: client.CustomObjectsApi,
        config: AgentConfig,
        tpm_opener: Callable[[], contextlib.AbstractContextManager[Tpm]] | None = None,
    ) -> None:
        self.api = api
        self.cfg = config
        self._open = tpm_opener or (
            lambda: Tpm.open(
                config.tcti, config.state_dir, ek_type=config.ek_type, ak_type=config.ak_type
            )
        )
        self._enrolment: Enrolment | None = None
        self._answered: set[str] = set()
        self._last_error = ""
        self._backoff = 1.0
        self._resource_version: str | None = None

    # ----- API ------------------------------------------------------------------------------
    def _get(self) -> Mapping[str, Any] | None:
        try:
            obj: Mapping[str, Any] = self.api.get_cluster_custom_object(
                GROUP, VERSION, PLURAL, self.cfg.node, _request_timeout=API_TIMEOUT
            )
            return obj
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def _patch(self, agent_part: dict[str, Any]) -> None:
        agent_part = {**agent_part, "agentVersion": __version__, "heartbeatTime": format_ts(_now())}
        self.api.patch_cluster_custom_object_status(
            GROUP,
            VERSION,
            PLURAL,
            self.cfg.node,
            {"status": {"agent": agent_part}},
            _request_timeout=API_TIMEOUT,
        )

    # ----- one pass -------------------------------------------------------------------------
    def step(self) -> float:
        """Do what the Member asks for now; return seconds until the next look is due."""
        member = self._get()
        if member is None:
            log.info("no Member %s yet (the operator creates one per Node); waiting", self.cfg.node)
            return 5.0
        self._resource_version = (member.get("metadata") or {}).get("resourceVersion")
        status = member.get("status") or {}
        mine = status.get("agent") or {}
        challenge = status.get("challenge") or {}
        try:
            patch, wait, quoted = self._answer(mine, challenge)
        except TpmUnavailable as exc:
            message = str(exc)[:2000]
            log.error("TPM unavailable: %s", message)
            self._enrolment = None
            if message != self._last_error:
                self._patch({"error": message})
                self._last_error = message
            self._backoff = min(self._backoff * 2, 60.0)
            return self._backoff
        if self._last_error:
            patch["error"] = ""
        if patch:
            self._patch(patch)  # a failed write keeps the back-off growing (run)
        self._backoff = 1.0
        self._last_error = ""
        if quoted:
            self.stored_answer(quoted)
        return wait

    def stored_answer(self, nonce: str) -> None:
        """The evidence for `nonce` is stored: never quote it again. Only then: a write that
        failed (an API server restarting, a timeout) is quoted and sent again on the next
        pass (the operator replaces a nonce only once it is answered, so one lost write
        would leave it unanswered until the verdict expired)."""
        self._answered.add(nonce)
        if len(self._answered) > 64:
            self._answered = {nonce}

    def _answer(
        self, mine: Mapping[str, Any], challenge: Mapping[str, Any]
    ) -> tuple[dict[str, Any], float, str | None]:
        """What to write (the enrolment, an activation, evidence), seconds until the next
        look, and the nonce quoted (None: none)."""
        patch: dict[str, Any] = {}
        quoted: str | None = None
        wait = float(self.cfg.idle_watch_seconds)
        with self._open() as tpm:
            if self._enrolment is None:
                self._enrolment = tpm.enrolment()
            en = self._enrolment
            published = mine.get("enrollment") or {}
            wanted = {
                "ekPublic": _b64(en.ek_public),
                "ekCertificate": _b64(en.ek_certificate) if en.ek_certificate else None,
                "akPublic": _b64(en.ak_public),
                "akName": en.ak_name.hex(),
            }
            if any(published.get(k) != v for k, v in wanted.items()):
                log.info("publishing enrolment: AK %s…", en.ak_name.hex()[:16])
                patch["enrollment"] = {**wanted, "activation": None}
                published = {}
            cred = challenge.get("credential") or {}
            activation = published.get("activation") or {}
            if (
                cred.get("id")
                and cred.get("akName") == en.ak_name.hex()
                and activation.get("challengeId") != cred["id"]
            ):
                log.info("answering credential challenge %s", cred["id"])
                secret = tpm.activate_credential(
                    base64.b64decode(cred["credentialBlob"]), base64.b64decode(cred["secret"])
                )
                patch.setdefault("enrollment", {})["activation"] = {
                    "challengeId": cred["id"],
                    "secret": _b64(secret),
                }
            nonce = challenge.get("nonce")
            answered = (mine.get("evidence") or {}).get("nonce")
            after = parse_ts(challenge.get("answerAfter"))
            if not nonce and after is not None:
                # the operator publishes the nonce when due: look again then, should the
                # watch miss that write (a verdict must not wait for an idle watch's end);
                # while it is late, less and less often (every agent of a pool would poll
                # an operator that is down)
                until = (after - _now()).total_seconds()
                wait = min(wait, until + DUE_SLACK if until > 0 else max(DUE_SLACK, -until))
            if nonce and nonce != answered and nonce not in self._answered:
                issued = parse_ts(challenge.get("issuedAt"))
                # a nonce published when due is quoted at once, whatever this node's clock
                # says; one an older operator published ahead waits for its answerAfter
                remaining = 0.0
                if after is not None and (issued is None or after > issued):
                    remaining = (after - _now()).total_seconds()
                if remaining > 0:
                    wait = min(wait, remaining)
                else:
                    evidence = self._quote(tpm, challenge)
                    # a merge patch keeps what it does not name: the values of PCRs no longer
                    # quoted (the policy's selection shrank) are removed, or every later
                    # quote would be refused for reporting PCRs it does not cover
                    before = (mine.get("evidence") or {}).get("pcrValues") or {}
                    for pcr in set(before) - set(evidence["pcrValues"]):
                        evidence["pcrValues"][pcr] = None
                    patch["evidence"] = evidence
                    quoted = str(nonce)
        return patch, wait, quoted

    def _quote(self, tpm: Tpm, challenge: Mapping[str, Any]) -> dict[str, Any]:
        nonce = bytes.fromhex(str(challenge["nonce"]))
        bank = str(challenge.get("pcrBank", "sha256"))
        pcrs = [int(p) for p in challenge.get("pcrs") or []]
        q = tpm.quote(nonce, bank, pcrs)
        evidence: dict[str, Any] = {
            "nonce": challenge["nonce"],
            "attest": _b64(q.attest),
            "signature": _b64(q.signature),
            "pcrBank": q.pcr_bank,
            "pcrValues": {str(p): v.hex() for p, v in sorted(q.pcr_values.items())},
            "producedAt": format_ts(_now()),
            "eventLog": None,
        }
        log_bytes = self._event_log()
        if log_bytes:
            evidence["eventLog"] = _b64(log_bytes)
        log.info("quoted %s:%s for nonce %s…", bank, pcrs, str(challenge["nonce"])[:12])
        return evidence

    def _event_log(self) -> bytes | None:
        path = self.cfg.event_log
        if path is None:
            return None
        try:
            with path.open("rb") as f:
                data = f.read(MAX_EVENT_LOG + 1)
        except OSError:
            return None
        if len(data) > MAX_EVENT_LOG:
            log.warning("event log %s is larger than %d bytes; not sent", path, MAX_EVENT_LOG)
            return None
        return data

    # ----- loop -----------------------------------------------------------------------------
    def _changes(self, timeout: float) -> Iterator[None]:
        w = watch.Watch()
        kwargs: dict[str, Any] = {
            "field_selector": f"metadata.name={self.cfg.node}",
            "timeout_seconds": max(1, int(timeout)),
            "_request_timeout": (API_TIMEOUT[0], max(1, int(timeout)) + API_TIMEOUT[1]),
        }
        if self._resource_version:
            kwargs["resource_version"] = self._resource_version
        try:
            for _ in w.stream(
                self.api.list_cluster_custom_object, GROUP, VERSION, PLURAL, **kwargs
            ):
                yield None
        finally:
            w.stop()

    def run(self, stop: threading.Event) -> None:
        """Step, then wait for a change to the Member or for the next due time; until stop."""
        log.info("gtvp-agent %s for node %s, TPM %s", __version__, self.cfg.node, self.cfg.tcti)
        while not stop.is_set():
            try:
                wait = self.step()
            except ApiException as exc:
                log.warning("API server: %s %s; retrying", exc.status, exc.reason)
                wait = min(self._backoff, 10.0)
                self._backoff = min(self._backoff * 2, 30.0)
            except Exception as exc:  # noqa: BLE001 - the loop must survive an API restart
                log.warning("step failed (%s: %s); retrying", type(exc).__name__, exc)
                wait = 2.0
            if stop.is_set():
                break
            if wait <= 1.0:
                stop.wait(wait)
                continue
            try:
                for _ in self._changes(wait):
                    break
            except Exception as exc:  # noqa: BLE001 - a broken watch is retried after a pause
                log.debug("watch ended: %s", exc)
                stop.wait(min(wait, 2.0))
