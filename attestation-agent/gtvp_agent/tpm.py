"""The node's TPM 2.0, through tpm2-pytss: EK, AK, credential activation, quotes, PCR reads.

The only module in gtvp that talks to a TPM. `Tpm.open(tcti)` accepts a TCTI string:
`device:/dev/tpmrm0` (the kernel resource manager, in a cluster) or
`swtpm:host=127.0.0.1,port=2321` (an emulator). A bare swtpm socket has no resource manager,
so every transient object and session is flushed after use and leftovers from a crashed
run are flushed on open.

The AK is created once under the EK and its (TPM-wrapped) blobs are kept in the agent's
state directory, so a restarted agent loads the same AK. A TPM that disappears raises
`TpmUnavailable` with what to check.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TSS2_LOG", "all+NONE")  # ESYS logs to stderr otherwise

from tpm2_pytss import ESAPI, TCTILdr, TSS2_Exception
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_HT,
    TPM2_RC,
    TPM2_SE,
    TPMA_OBJECT,
)
from tpm2_pytss.types import (
    TPM2B_DIGEST,
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPML_DIGEST,
    TPML_PCR_SELECTION,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
)
from tpm2_pytss.utils import NoSuchIndex, NVReadEK, create_ek_template

log = logging.getLogger("gtvp_agent.tpm")

# TCG EK Credential Profile, high-range templates, SHA-384 branches of the EK authPolicy:
# PolicySecret(TPM_RH_ENDORSEMENT) and PolicyAuthorizeNV(0x01C07F02).
EK_POLICY_OR_SHA384 = (
    bytes.fromhex(
        "8bbf2266537c171cb56e403c4dc1d4b64f432611dc386e6f532050c3278c930e"
        "143e8bb1133824ccb431053871c6db53"
    ),
    bytes.fromhex(
        "d6032ce61f2fb3c240eb3cf6a33237ef2b6a16f4293c22b455e261cffd217ad5"
        "b4947c2d73e63005eed2dc2b3593d165"
    ),
)
EK_TYPES = {"rsa": ("EK-RSA2048", 0x01C00002), "ecc": ("EK-HIGH-ECC384", 0x01C00016)}
AK_TEMPLATES = {"ecc": "ecc256:ecdsa-sha256:null", "rsa": "rsa2048:rsassa-sha256:null"}
AK_ATTRIBUTES = (
    TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
    | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    # The AK has an empty authValue: dictionary-attack protection guards nothing here, and
    # after unclean restarts (a crash, a power cut) it would lock the AK out of quoting.
    | TPMA_OBJECT.NODA
)


_FOREIGN_BLOB = frozenset(
    int(rc)
    for rc in (
        TPM2_RC.INTEGRITY,  # its HMAC is another parent's: another TPM, or another EK seed
        TPM2_RC.BINDING,
        TPM2_RC.SIZE,
        TPM2_RC.INSUFFICIENT,
        TPM2_RC.KEY_SIZE,
        TPM2_RC.KEY,
        TPM2_RC.TYPE,
        TPM2_RC.ATTRIBUTES,
        TPM2_RC.VALUE,
    )
)


def _not_this_tpms(exc: TSS2_Exception) -> bool:
    """Whether a failed TPM2_Load says the blobs are not this TPM's (a format-1 error of the
    TPM itself about them), not that the TPM cannot load anything now (a warning: retry,
    testing, out of memory; or the TCTI or ESAPI layer: the TPM gone)."""
    return exc.rc >> 16 == 0 and bool(exc.fmt1) and exc.error in _FOREIGN_BLOB


class TpmUnavailable(RuntimeError):
    """The TPM cannot be reached or refused a command; the message says what to check."""


@dataclass(frozen=True)
class Enrolment:
    """What the agent reports about its keys."""

    ek_public: bytes  # TPM2B_PUBLIC
    ek_certificate: bytes | None  # DER
    ak_public: bytes  # TPM2B_PUBLIC
    ak_name: bytes


@dataclass(frozen=True)
class Quote:
    attest: bytes  # TPMS_ATTEST
    signature: bytes  # TPMT_SIGNATURE
    pcr_bank: str
    pcr_values: dict[int, bytes]


def _tcti(spec: str) -> TCTILdr:
    name, _, conf = spec.partition(":")
    return TCTILdr(name, conf)


class Tpm:
    """An open connection to one TPM plus the agent's key state directory."""

    def __init__(
        self, esapi: ESAPI, tcti: TCTILdr, state_dir: Path, *, ek_type: str, ak_type: str
    ) -> None:
        self._e = esapi
        self._tcti = tcti
        self.state_dir = state_dir
        self.ek_type = ek_type
        self.ak_type = ak_type

    @classmethod
    @contextlib.contextmanager
    def open(
        cls, tcti: str, state_dir: Path, *, ek_type: str = "rsa", ak_type: str = "ecc"
    ) -> Iterator[Tpm]:
        if ek_type not in EK_TYPES or ak_type not in AK_TEMPLATES:
            raise ValueError(
                f"ek_type must be one of {list(EK_TYPES)}, ak_type of {list(AK_TEMPLATES)}"
            )
        try:
            t = _tcti(tcti)
            e = ESAPI(t)
        except (TSS2_Exception, RuntimeError, OSError) as exc:
            raise TpmUnavailable(
                f"cannot open the TPM at {tcti!r}: {exc}. In a cluster check that /dev/tpmrm0 "
                "exists and is mounted into the agent; for swtpm check that it runs and "
                "listens on that port."
            ) from exc
        tpm = cls(e, t, state_dir, ek_type=ek_type, ak_type=ak_type)
        try:
            if tcti.startswith("swtpm"):
                tpm._flush_leftovers()
            yield tpm
        except TSS2_Exception as exc:
            raise TpmUnavailable(f"the TPM at {tcti!r} failed a command: {exc}") from exc
        finally:
            with contextlib.suppress(Exception):
                e.close()

    # ----- housekeeping --------------------------------------------------------------------
    def _flush_leftovers(self) -> None:
        for ht in (TPM2_HT.TRANSIENT, TPM2_HT.LOADED_SESSION):
            _, data = self._e.get_capability(TPM2_CAP.HANDLES, ht << 24, 64)
            for h in data.data.handles:
                with contextlib.suppress(TSS2_Exception):
                    self._e.flush_context(self._e.tr_from_tpmpublic(h))

    @contextlib.contextmanager
    def _transient(self, handle: ESYS_TR) -> Iterator[ESYS_TR]:
        try:
            yield handle
        finally:
            with contextlib.suppress(TSS2_Exception):
                self._e.flush_context(handle)

    @contextlib.contextmanager
    def _ek_session(self) -> Iterator[ESYS_TR]:
        """A policy session satisfying the EK's authPolicy.

        Low-range templates (RSA-2048): PolicySecret(TPM_RH_ENDORSEMENT) with SHA-256.
        High-range templates (ECC P-384, TCG EK Credential Profile): SHA-384, and the policy
        is PolicyOR(PolicySecret(endorsement), PolicyAuthorizeNV(0x01C07F02)); satisfying
        the first branch and OR-ing with both branch digests gives the EK's authPolicy.
        """
        high = self.ek_type == "ecc"
        s = self._e.start_auth_session(
            ESYS_TR.NONE,
            ESYS_TR.NONE,
            TPM2_SE.POLICY,
            TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
            TPM2_ALG.SHA384 if high else TPM2_ALG.SHA256,
        )
        with self._transient(s):
            self._e.policy_secret(ESYS_TR.ENDORSEMENT, s, b"", b"", b"", 0)
            if high:
                self._e.policy_or(s, TPML_DIGEST([TPM2B_DIGEST(d) for d in EK_POLICY_OR_SHA384]))
            yield s

    # ----- EK -------------------------------------------------------------------------------
    def _nv(self) -> NVReadEK:
        return NVReadEK(self._e)

    def ek_certificate(self) -> bytes | None:
        """The EK certificate from NV (None where the manufacturer put none)."""
        _template, index = EK_TYPES[self.ek_type]
        try:
            return bytes(self._nv()(index))
        except NoSuchIndex:
            return None

    @contextlib.contextmanager
    def _ek(self) -> Iterator[tuple[ESYS_TR, TPM2B_PUBLIC]]:
        template_name, _ = EK_TYPES[self.ek_type]
        try:
            _cert, template = create_ek_template(template_name, self._nv())
        except ValueError:
            _cert, template = create_ek_template(template_name, _no_nv)
        handle, public, _, _, _ = self._e.create_primary(
            TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT
        )
        with self._transient(handle):
            yield handle, public

    # ----- AK -------------------------------------------------------------------------------
    def _ak_files(self) -> tuple[Path, Path]:
        return (
            self.state_dir / f"ak-{self.ek_type}-{self.ak_type}.pub",
            self.state_dir / f"ak-{self.ek_type}-{self.ak_type}.priv",
        )

    def _ak_blobs(self, ek: ESYS_TR) -> tuple[TPM2B_PRIVATE, TPM2B_PUBLIC]:
        pub_f, priv_f = self._ak_files()
        if pub_f.exists() and priv_f.exists():
            pub, _ = TPM2B_PUBLIC.unmarshal(pub_f.read_bytes())
            priv, _ = TPM2B_PRIVATE.unmarshal(priv_f.read_bytes())
            return priv, pub
        template = TPM2B_PUBLIC.parse(AK_TEMPLATES[self.ak_type], objectAttributes=AK_ATTRIBUTES)
        with self._ek_session() as s:
            priv, pub, _, _, _ = self._e.create(ek, TPM2B_SENSITIVE_CREATE(), template, session1=s)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        pub_f.write_bytes(bytes(pub.marshal()))
        fd = os.open(priv_f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(bytes(priv.marshal()))
        log.info("created a new AK (%s) under the EK; kept in %s", self.ak_type, self.state_dir)
        return priv, pub

    @contextlib.contextmanager
    def _loaded_ak(self) -> Iterator[tuple[ESYS_TR, ESYS_TR, TPM2B_PUBLIC]]:
        with self._ek() as (ek, _ek_pub):
            priv, pub = self._ak_blobs(ek)
            try:
                with self._ek_session() as s:
                    ak = self._e.load(ek, priv, pub, session1=s)
            except TSS2_Exception as exc:
                if not _not_this_tpms(exc):
                    # busy, testing, out of object memory, gone: the enrolled AK is kept (a
                    # new one would unbind the member: EnrolmentChanged)
                    raise TpmUnavailable(f"the TPM could not load the AK now: {exc}") from exc
                # blobs from another TPM (state dir reused) cannot load: make a new AK
                log.warning("the AK's blobs do not load on this TPM (%s): making a new AK", exc)
                for f in self._ak_files():
                    f.unlink(missing_ok=True)
                priv, pub = self._ak_blobs(ek)
                with self._ek_session() as s:
                    ak = self._e.load(ek, priv, pub, session1=s)
            with self._transient(ak):
                yield ek, ak, pub

    # ----- operations -----------------------------------------------------------------------
    def enrolment(self) -> Enrolment:
        with self._loaded_ak() as (_ek, _ak, ak_pub), self._ek() as (_h, ek_pub):
            return Enrolment(
                ek_public=bytes(ek_pub.marshal()),
                ek_certificate=self.ek_certificate(),
                ak_public=bytes(ak_pub.marshal()),
                ak_name=bytes(ak_pub.get_name().marshal())[2:],
            )

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        blob, _ = TPM2B_ID_OBJECT.unmarshal(credential_blob)
        secret, _ = TPM2B_ENCRYPTED_SECRET.unmarshal(encrypted_secret)
        with self._loaded_ak() as (ek, ak, _pub), self._ek_session() as s:
            out: TPM2B_DIGEST = self._e.activate_credential(ak, ek, blob, secret, session2=s)
            return bytes(out)

    def quote(self, nonce: bytes, bank: str, pcrs: Sequence[int]) -> Quote:
        """TPM2_Quote over `nonce` and the PCRs, then the PCR values (read right after)."""
        with self.session() as s:
            return s.quote(nonce, bank, pcrs)

    @contextlib.contextmanager
    def session(self) -> Iterator[LoadedKeys]:
        """EK and AK loaded once for many operations (the load generator of the scale
        benchmark answers thousands of challenges this way)."""
        with self._loaded_ak() as (ek, ak, _pub):
            yield LoadedKeys(self, ek, ak)

    def read_pcrs(self, bank: str, pcrs: Sequence[int]) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        remaining = sorted(pcrs)
        while remaining:  # the TPM returns at most 8 digests per read
            sel = TPML_PCR_SELECTION.parse(f"{bank}:{','.join(str(p) for p in remaining)}")
            _, got_sel, digests = self._e.pcr_read(sel)
            got = [p for s in got_sel for p in _selected(bytes(s.pcrSelect), s.sizeofSelect)]
            if not got:
                raise TpmUnavailable(f"the TPM returned no {bank} PCR values")
            for p, d in zip(got, digests, strict=False):
                out[p] = bytes(d)
            remaining = [p for p in remaining if p not in out]
        return out

    def extend_pcr(self, pcr: int, data: bytes, bank: str = "sha256") -> None:
        """Extend a PCR (used by `gtvp local tamper` and the tamper tests on an swtpm)."""
        import hashlib

        from tpm2_pytss.types import TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA

        digest = hashlib.new(bank, data).digest()
        alg = getattr(TPM2_ALG, bank.upper())
        values = TPML_DIGEST_VALUES([TPMT_HA(hashAlg=alg, digest=TPMU_HA(**{bank: digest}))])
        self._e.pcr_extend(ESYS_TR.PCR0 + pcr, values)


def _selected(bitmap: bytes, size: int) -> list[int]:
    return [b * 8 + i for b in range(size) for i in range(8) if bitmap[b] & (1 << i)]


def _no_nv(index: int) -> bytes:
    raise NoSuchIndex(index)


class LoadedKeys:
    """The EK and AK of an open Tpm, loaded: quotes and activations without reloading."""

    def __init__(self, tpm: Tpm, ek: ESYS_TR, ak: ESYS_TR) -> None:
        self._tpm = tpm
        self._ek = ek
        self._ak = ak

    def quote(self, nonce: bytes, bank: str, pcrs: Sequence[int]) -> Quote:
        selection = f"{bank}:{','.join(str(p) for p in sorted(pcrs))}"
        attest, sig = self._tpm._e.quote(
            self._ak,
            TPML_PCR_SELECTION.parse(selection),
            nonce,
            TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL),
        )
        values = self._tpm.read_pcrs(bank, pcrs)
        return Quote(bytes(attest.marshal())[2:], bytes(sig.marshal()), bank, values)

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        blob, _ = TPM2B_ID_OBJECT.unmarshal(credential_blob)
        secret, _ = TPM2B_ENCRYPTED_SECRET.unmarshal(encrypted_secret)
        with self._tpm._ek_session() as s:
            out: TPM2B_DIGEST = self._tpm._e.activate_credential(
                self._ak, self._ek, blob, secret, session2=s
            )
            return bytes(out)
