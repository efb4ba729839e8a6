"""Who may call gtvp's webhooks: the common name of the client certificate the webhook
server's TLS handshake verified, checked against the names the operator was given
(`--webhook-client-name`); pure, on what `ssl.SSLSocket.getpeercert()` returns."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

UNKNOWN_WEBHOOK = "unknown-webhook"
CALLER_NOT_ALLOWED = "caller-not-allowed"
REFUSALS = (UNKNOWN_WEBHOOK, CALLER_NOT_ALLOWED)
"""Why the server refused a request before any handler saw it (metric label)."""


def common_names(peercert: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The subject common names of a verified peer certificate, as `ssl.getpeercert()`
    returns it (empty: no certificate, or one the handshake did not verify)."""
    if not peercert:
        return ()
    names = []
    for rdn in peercert.get("subject") or ():
        for attribute in rdn:
            if len(attribute) == 2 and attribute[0] == "commonName":
                names.append(str(attribute[1]))
    return tuple(names)


def caller_allowed(peercert: Mapping[str, Any] | None, allowed: Collection[str]) -> bool:
    """True when no names are required, or the peer certificate's only common name is one
    of `allowed` (a certificate with two common names is refused: which one counts would be
    the signer's choice, not ours)."""
    if not allowed:
        return True
    names = common_names(peercert)
    return len(names) == 1 and names[0] in allowed
