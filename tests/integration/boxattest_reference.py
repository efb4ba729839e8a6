"""A tiny HTTPS server for box attestation protocol v1 (the contract in docs/boxattest.md):
the guest client's counterpart in tests, and a reference for the operator's endpoints.

It does what gtvp does with gtvp.core's own checks: the EK certificate must chain to the
vTPM CA bundle and certify exactly `ekPublic` (`enrolment.check_ek_certificate`), the AK
must be a restricted signing key (`enrolment.ak_facts`), the activation is gtvp's
MakeCredential (`make_activation_challenge`, `check_activation`); a quote must carry the
nonce it handed out (single use), be signed by the bound AK (`quote.check_signature`),
select PCR 13 whose reported value is both the one the quote's PCR digest covers and the
fold of the expected component digests. It hands out a nonce when a test asks for one
(`want_quote`): after boot and after a migration.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import secrets
import ssl
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from gtvp.core import enrolment
from gtvp.core.quote import check_signature
from gtvp.core.tpm_wire import parse_attest, parse_public, parse_signature

PCR = 13


def fold(digests: Sequence[str]) -> str:
    """PCR 13 after extending zeros with each sha256 digest (hex) in order."""
    pcr = bytes(32)
    for d in digests:
        pcr = hashlib.sha256(pcr + bytes.fromhex(d)).digest()
    return pcr.hex()


def attest_line(*, url: str, box: str, credential: str, ca_pem: str) -> str:
    """The `#gtvp-attest <base64 JSON>` line gtvp writes into a box's user data."""
    doc = {"v": 1, "url": url, "box": box, "credential": credential, "caPem": ca_pem, "pcr": PCR}
    return "#gtvp-attest " + base64.b64encode(json.dumps(doc).encode()).decode()


class Refused(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class Quoted:
    nonce: str
    verified: bool
    reason: str
    pcr13: str


@dataclass
class BoxState:
    """What the server knows of one box."""

    box: str
    credential_sha256: str
    expected: list[str]  # the component digests (hex) in mount order
    vtpm_ca_pem: str
    enrolments: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    """enrolment id → (AK public area, sha256 of the activation secret)"""
    ak: bytes | None = None
    nonces: set[str] = field(default_factory=set)
    want_quote: bool = True
    quotes: list[Quoted] = field(default_factory=list)
    enrolled: int = 0
    enrol_again: bool = False
    """ask for an enrolment every time (as a replica that has not seen the last one does)"""
    retry_after: float = 1


class Reference:
    """The server's logic (no I/O): one handler per endpoint."""

    def __init__(self, state: BoxState) -> None:
        self.s = state
        self.lock = threading.Lock()

    def handle(self, path: str, bearer: str, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            if body.get("box") != self.s.box:
                raise Refused(401, "Unauthorized", "unknown box")
            if hashlib.sha256(bearer.encode()).hexdigest() != self.s.credential_sha256:
                raise Refused(401, "Unauthorized", "bad credential")
            if path == "/boxattest/v1/challenge":
                return self.challenge()
            if path == "/boxattest/v1/enrol":
                return self.enrol(body)
            if path == "/boxattest/v1/activate":
                return self.activate(body)
            if path == "/boxattest/v1/quote":
                return self.quote(body)
            raise Refused(404, "NotFound", path)

    def challenge(self) -> dict[str, Any]:
        if self.s.ak is None or self.s.enrol_again:
            return {"nonce": None, "enrol": True, "retryAfter": self.s.retry_after}
        if not self.s.want_quote:
            return {"nonce": None, "retryAfter": self.s.retry_after}
        nonce = secrets.token_hex(32)
        self.s.nonces.add(nonce)
        return {"nonce": nonce, "retryAfter": self.s.retry_after}

    def enrol(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            cert = base64.b64decode(body["ekCertificate"])
            ek_area = base64.b64decode(body["ekPublic"])
            ak_area = base64.b64decode(body["akPublic"])
            ek = enrolment.ek_facts(ek_area)
            ak = enrolment.ak_facts(ak_area)
        except (KeyError, ValueError) as exc:
            raise Refused(400, "Malformed", str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - gtvp's refusals: wrong EK or AK attributes
            raise Refused(403, type(exc).__name__, str(exc)) from None
        try:
            enrolment.check_ek_certificate(
                ek_spki=ek.spki,
                certificate=cert,
                presented_chain=(),
                ca_bundle_pem=self.s.vtpm_ca_pem,
                now=dt.datetime.now(dt.UTC),
            )
        except Exception as exc:  # noqa: BLE001
            raise Refused(403, type(exc).__name__, str(exc)) from None
        secret = secrets.token_bytes(32)
        ch = enrolment.make_activation_challenge(
            ek_public_area=ek_area, ak_name=ak.public.name, secret=secret
        )
        eid = secrets.token_hex(8)
        self.s.enrolments[eid] = (ak_area, ch.secret_sha256)
        return {
            "enrolment": eid,
            "credentialBlob": base64.b64encode(ch.credential_blob).decode(),
            "secret": base64.b64encode(ch.encrypted_secret).decode(),
        }

    def activate(self, body: dict[str, Any]) -> dict[str, Any]:
        got = self.s.enrolments.pop(str(body.get("enrolment")), None)
        if got is None:
            raise Refused(409, "StaleEnrolment", "unknown or used enrolment")
        ak_area, secret_sha256 = got
        try:
            enrolment.check_activation(
                proof=base64.b64decode(body["secret"]), secret_sha256=secret_sha256
            )
        except Exception as exc:  # noqa: BLE001
            raise Refused(403, type(exc).__name__, str(exc)) from None
        self.s.ak = ak_area
        self.s.enrolled += 1
        return {"bound": True}

    def quote(self, body: dict[str, Any]) -> dict[str, Any]:
        nonce = str(body.get("nonce"))
        if nonce not in self.s.nonces:
            raise Refused(409, "StaleNonce", "unknown or used nonce")
        self.s.nonces.discard(nonce)
        assert self.s.ak is not None
        raw = base64.b64decode(body["quote"])
        if len(raw) >= 2 and struct.unpack(">H", raw[:2])[0] == len(raw) - 2:
            raw = raw[2:]  # TPM2B_ATTEST → TPMS_ATTEST
        pcr13 = str((body.get("pcrs") or {}).get(str(PCR), ""))
        reasons = []
        try:
            attest = parse_attest(raw)
            check_signature(
                parse_public(self.s.ak), parse_signature(base64.b64decode(body["signature"])), raw
            )
            if attest.extra_data != bytes.fromhex(nonce):
                reasons.append("the quote does not carry the nonce")
            if attest.pcr_digest != hashlib.sha256(bytes.fromhex(pcr13)).digest():
                reasons.append("the reported PCR 13 is not the quoted one")
        except Exception as exc:  # noqa: BLE001
            reasons.append(f"{type(exc).__name__}: {exc}")
        if pcr13 != fold(self.s.expected):
            reasons.append("PCR 13 is not the fold of the composed components")
        measured = [str(m).removeprefix("sha256:") for m in body.get("measurements") or []]
        if measured != self.s.expected:
            reasons.append("the event log is not the composed component set")
        verified = not reasons
        self.s.quotes.append(Quoted(nonce, verified, "; ".join(reasons), pcr13))
        if verified:
            self.s.want_quote = False
        return {"verified": verified, "reason": "; ".join(reasons)}


class Server:
    """`Reference` over HTTPS on (address, port 0 → a free one) with `cert`/`key` files."""

    def __init__(self, ref: Reference, address: str, cert: str, key: str) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                bearer = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                try:
                    body = json.loads(self.rfile.read(n) or b"{}")
                    status, out = 200, ref.handle(self.path, bearer, body)
                except Refused as r:
                    status, out = r.status, {"error": r.code, "message": r.message}
                except (ValueError, KeyError) as exc:
                    status, out = 400, {"error": "Malformed", "message": str(exc)}
                data = json.dumps(out).encode()
                outer.requests.append((self.path, status))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.requests: list[tuple[str, int]] = []
        self.httpd = ThreadingHTTPServer((address, 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.url = f"https://{address}:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
