"""Which levels a member may hold by who certified its TPM (`spec.levels[].ekCaBundle`).

`spec.ekTrust.caBundle` admits a TPM at all: its EK certificate must chain to one of those
CAs. A security team that admits several kinds of TPM (two vendors' discrete chips, a
cloud's virtual TPMs) may want its most sensitive level held only on some of them: a level
that names an `ekCaBundle` is held only by a member whose EK certificate also chains to
one of that bundle's CAs, and so is every level above it (a member's verdict backs the
lower levels' VMs too, never a higher level's). A TPM without an EK certificate (admitted
by an administrator's approval) holds no such level. The path is validated as enrolment
validates it (`enrolment.check_ek_certificate`: RFC 5280, the EK certificate's own
checks, validity at `now`), against the level's bundle alone. Pure.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from gtvp.core import errors
from gtvp.core.enrolment import check_ek_certificate
from gtvp.core.policy import Level

NO_CEILING = (9, None)
"""Every level (no level names an ekCaBundle)."""


def ek_ceiling(
    levels: Sequence[Level],
    *,
    ek_spki: bytes,
    certificate: bytes | None,
    presented_chain: Sequence[bytes],
    now: dt.datetime,
) -> tuple[int, str | None]:
    """The highest of `levels` (lowest first) the EK `ek_spki`, certified by `certificate`
    (None: no EK certificate) through `presented_chain`, may hold, and why not the next one
    up (None when no level holds it back)."""
    below = 0
    for lv in levels:
        if lv.ek_ca_bundle is not None:
            why = _refused(lv, lv.ek_ca_bundle, ek_spki, certificate, presented_chain, now=now)
            if why is not None:
                return below, why
        below = lv.level
    return NO_CEILING


def _refused(
    lv: Level,
    bundle: str,
    ek_spki: bytes,
    certificate: bytes | None,
    presented_chain: Sequence[bytes],
    *,
    now: dt.datetime,
) -> str | None:
    head = (
        f"level {lv.level} ({lv.name}) and above need an EK certificate from a CA of its ekCaBundle"
    )
    if certificate is None:
        return f"{head}, and this TPM has no EK certificate"
    try:
        check_ek_certificate(
            ek_spki=ek_spki,
            certificate=certificate,
            presented_chain=presented_chain,
            ca_bundle_pem=bundle,
            now=now,
        )
    except errors.VerificationError as exc:
        return f"{head}: {_for_the_level(str(exc))}"
    except Exception as exc:  # noqa: BLE001 - agent-written bytes broke a parser or library
        return f"{head}: its EK certificate cannot be read ({type(exc).__name__})"
    return None


def _for_the_level(refusal: str) -> str:
    """Enrolment's refusal, about the level's bundle: the pool's bundle admitted this TPM,
    and its advice (add the vendor's CA) would undo what the level says."""
    return refusal.replace(
        "the policy's ekTrust.caBundle; add the TPM vendor's CA to the bundle if this TPM is "
        "genuine",
        "the level's ekCaBundle",
    ).replace("the policy's ekTrust.caBundle", "the level's ekCaBundle")
