"""The keys that sign verdict tokens (`gtvp.core.ear`): kept in a Secret, published as a JWKS.

Storage: the Secret `gtvp-verdict-keys` in the operator's namespace (the Leases' namespace)
holds every key still needed, oldest first, as JSON (`keys.json`: kid, created, retired,
PKCS#8 PEM). The first replica that starts creates it with one fresh P-256 key (create;
AlreadyExists: read what the winner wrote), so every replica signs with the same newest
key. Its public keys are published as a JWKS in the ConfigMap `gtvp-verdict-jwks`
(`jwks.json`) and on the operator's HTTP endpoint (`/.well-known/jwks.json`).

Rotation (`gtvp token rotate-key`): a new key is appended and the one before it marked
retired; each replica re-reads the Secret every `REFRESH` and signs with the newest key from
then on. A retired key stays in the Secret and the JWKS for as long as a token it signed
may still be valid: the longest verdict validity of the policy plus one refresh period (a
replica may have signed with it until it read the rotation), then the leader removes it.

Private key material is never logged, put in an Event or a status: only kids are named.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gtvp import __version__
from gtvp.core import ear
from gtvp.core.timestamps import format_ts, parse_ts

log = logging.getLogger("gtvp.verdict_keys")

SECRET = "gtvp-verdict-keys"  # noqa: S105 - the Secret's name
CONFIGMAP = "gtvp-verdict-jwks"
SECRET_KEY = "keys.json"  # noqa: S105 - its data key
JWKS_KEY = "jwks.json"
REFRESH = dt.timedelta(seconds=30)
DEFAULT_AUDIENCE = "gtvp"
DEFAULT_RETENTION = dt.timedelta(hours=1)
"""How long a retired key is kept when no policy says how long verdicts last."""


@dataclass(frozen=True)
class StoredKey:
    kid: str
    private: ec.EllipticCurvePrivateKey = field(repr=False)
    created: dt.datetime
    retired: dt.datetime | None = None


def new_key(now: dt.datetime) -> StoredKey:
    private = ec.generate_private_key(ec.SECP256R1())
    return StoredKey(ear.thumbprint(private.public_key()), private, now)


def dump(keys: list[StoredKey]) -> str:
    """The Secret's `keys.json` (holds private keys: never log it)."""
    entries = []
    for k in keys:
        pem = k.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        entry = {"kid": k.kid, "created": format_ts(k.created), "pem": pem}
        if k.retired is not None:
            entry["retired"] = format_ts(k.retired)
        entries.append(entry)
    return json.dumps({"keys": entries}, indent=1)


def load(text: str) -> list[StoredKey]:
    """The keys in `keys.json`; ValueError (naming no key material) when it is unusable."""
    try:
        entries = json.loads(text)["keys"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"Secret {SECRET}: {SECRET_KEY} is not the expected JSON") from exc
    keys = []
    for e in entries:
        try:
            private = serialization.load_pem_private_key(str(e["pem"]).encode(), password=None)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"Secret {SECRET}: key {e.get('kid')!r} cannot be read") from exc
        if not isinstance(private, ec.EllipticCurvePrivateKey) or not isinstance(
            private.curve, ec.SECP256R1
        ):
            raise ValueError(f"Secret {SECRET}: key {e.get('kid')!r} is not EC P-256")
        created = parse_ts(e.get("created")) or dt.datetime.fromtimestamp(0, dt.UTC)
        keys.append(
            StoredKey(
                ear.thumbprint(private.public_key()), private, created, parse_ts(e.get("retired"))
            )
        )
    if not keys:
        raise ValueError(f"Secret {SECRET} holds no key")
    return keys


def rotated(keys: list[StoredKey], now: dt.datetime, *, revoke: bool = False) -> list[StoredKey]:
    """`keys` with the signing key retired now and a new one appended (signs from now);
    `revoke`: the new key alone (every earlier key withdrawn at once: one may be stolen, and
    no token it signed verifies any more, issued ones included)."""
    if revoke:
        return [new_key(now)]
    old = [k if k.retired is not None else replace(k, retired=now) for k in keys]
    return [*old, new_key(now)]


def pruned(keys: list[StoredKey], now: dt.datetime, retention: dt.timedelta) -> list[StoredKey]:
    """`keys` without the retired ones whose every token has expired (`retention` after
    they were retired, plus one refresh period); the newest key always stays."""
    keep = retention + REFRESH
    return [k for k in keys[:-1] if k.retired is None or now < k.retired + keep] + keys[-1:]


def public_jwks(keys: list[StoredKey], issuer: str | None = None) -> dict[str, Any]:
    """The JWK Set of `keys`; with `issuer`, named by the issuer whose tokens they sign (a
    relying party keeps one key set per issuer: `gtvp token verify --issuer` checks it)."""
    out = ear.jwks([k.private.public_key() for k in keys])
    if issuer is not None:
        out["issuer"] = issuer
    return out


# ----- the Secret and the ConfigMap -------------------------------------------------------


def _api_status(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) else None


def _secret_body(namespace: str, keys: list[StoredKey], version: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": SECRET,
        "namespace": namespace,
        "labels": {"app.kubernetes.io/part-of": "gtvp"},
    }
    if version is not None:
        meta["resourceVersion"] = version
    data = base64.b64encode(dump(keys).encode()).decode()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta,
        "type": "Opaque",
        "data": {SECRET_KEY: data},
    }


def read_keys(clients: Any, namespace: str) -> tuple[list[StoredKey], str] | None:
    """(keys, resourceVersion) of the Secret; None when it does not exist."""
    try:
        secret = clients.core.read_namespaced_secret(SECRET, namespace)
    except Exception as exc:
        if _api_status(exc) == 404:
            return None
        raise
    raw = (secret.data or {}).get(SECRET_KEY)
    if not raw:
        raise ValueError(f"Secret {namespace}/{SECRET} has no {SECRET_KEY}")
    return load(base64.b64decode(raw).decode()), str(secret.metadata.resource_version)


def ensure_keys(clients: Any, namespace: str, now: dt.datetime) -> list[StoredKey]:
    """The stored keys, creating the Secret with a fresh key when there is none yet (a
    replica that loses the race reads what the winner wrote)."""
    got = read_keys(clients, namespace)
    if got is not None:
        return got[0]
    keys = [new_key(now)]
    try:
        clients.core.create_namespaced_secret(namespace, _secret_body(namespace, keys, None))
    except Exception as exc:
        if _api_status(exc) != 409:
            raise
        again = read_keys(clients, namespace)
        if again is None:
            raise RuntimeError(f"Secret {namespace}/{SECRET} exists and then does not") from exc
        return again[0]
    log.info("created the verdict signing key %s (Secret %s/%s)", keys[0].kid, namespace, SECRET)
    return keys


def write_keys(clients: Any, namespace: str, keys: list[StoredKey], version: str) -> None:
    """Replace the Secret at `version` (409 when it changed since: read it again)."""
    clients.core.replace_namespaced_secret(
        SECRET, namespace, _secret_body(namespace, keys, version)
    )


def publish(clients: Any, namespace: str, keys: list[StoredKey], issuer: str | None = None) -> bool:
    """Write the JWKS ConfigMap when it differs; True when it was written."""
    text = json.dumps(public_jwks(keys, issuer), indent=1, sort_keys=True)
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": CONFIGMAP,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": "gtvp"},
        },
        "data": {JWKS_KEY: text},
    }
    try:
        current = clients.core.read_namespaced_config_map(CONFIGMAP, namespace)
    except Exception as exc:
        if _api_status(exc) != 404:
            raise
        try:
            clients.core.create_namespaced_config_map(namespace, body)
        except Exception as exc2:
            if _api_status(exc2) != 409:
                raise
            return False  # another replica published it first; the next refresh compares
        return True
    if (current.data or {}).get(JWKS_KEY) == text:
        return False
    body["metadata"]["resourceVersion"] = current.metadata.resource_version
    try:
        clients.core.replace_namespaced_config_map(CONFIGMAP, namespace, body)
    except Exception as exc:
        if _api_status(exc) != 409:
            raise
        return False
    return True


def _published_issuer(clients: Any, namespace: str) -> str | None:
    """The issuer the published JWKS names (the operator's, `--token-issuer` included)."""
    try:
        current = clients.core.read_namespaced_config_map(CONFIGMAP, namespace)
        named = json.loads((current.data or {}).get(JWKS_KEY, "{}")).get("issuer")
    except Exception:  # noqa: BLE001 - none published yet, or unreadable: derived instead
        return None
    return named if isinstance(named, str) and named else None


def rotate(
    clients: Any, namespace: str, now: dt.datetime, *, revoke: bool = False
) -> tuple[str, list[str]]:
    """Add a new signing key (the current one retired, or with `revoke` every earlier one
    withdrawn); (new kid, kids still published)."""
    name = _published_issuer(clients, namespace)  # the JWKS keeps naming its issuer
    if name is None:
        # else none: the operator's leader names it again at its next refresh
        with contextlib.suppress(RuntimeError):
            name = read_cluster_issuer(clients)
    for _ in range(5):
        got = read_keys(clients, namespace)
        if got is None:
            keys = ensure_keys(clients, namespace, now)
            publish(clients, namespace, keys, name)
            return keys[-1].kid, [k.kid for k in keys]
        keys, version = got
        new = rotated(keys, now, revoke=revoke)
        try:
            write_keys(clients, namespace, new, version)
        except Exception as exc:
            if _api_status(exc) == 409:
                continue
            raise
        publish(clients, namespace, new, name)
        return new[-1].kid, [k.kid for k in new]
    raise RuntimeError(f"Secret {namespace}/{SECRET} kept changing; try again")


# ----- the operator's signer --------------------------------------------------------------


@dataclass
class Issuer:
    """What the operator signs verdict tokens with: the newest stored key (None until the
    keys are loaded: no token is issued then, and a changed verdict drops its old token)."""

    namespace: str
    audience: str = DEFAULT_AUDIENCE
    name: str | None = None
    """The tokens' `iss` (`--token-issuer`; else named after the cluster at the first
    refresh, `ear.cluster_issuer`: no token until it is known)."""
    keys: list[StoredKey] = field(default_factory=list)
    build: str = f"gtvp {__version__}"

    @property
    def signing_key(self) -> StoredKey | None:
        return self.keys[-1] if self.keys else None

    def jwks(self) -> dict[str, Any]:
        return public_jwks(self.keys, self.name)

    def token(
        self,
        member: str,
        status: Mapping[str, Any],
        policy: ear.PolicyId | None,
        now: dt.datetime,
        lifetime: dt.timedelta,
    ) -> str | None:
        key = self.signing_key
        if key is None or self.name is None:
            return None
        claims = ear.verdict_claims(
            member=member,
            status=status,
            policy=policy,
            now=now,
            audience=self.audience,
            issuer=self.name,
            build=self.build,
            lifetime=lifetime,
        )
        return ear.sign(claims, key.private)


def _why(exc: BaseException) -> str:
    """A failure in words that never quote key material (API reason, or our own message)."""
    reason = getattr(exc, "reason", None)
    if reason:
        return f"{reason} ({_api_status(exc)})"
    return str(exc) if isinstance(exc, ValueError | RuntimeError) else type(exc).__name__


def longest_validity(policy: Any) -> dt.timedelta:
    """The longest verdict validity of `policy` (a `gtvp.core.policy.Policy`; None: the
    default retention): how long a token may stay valid."""
    levels = getattr(policy, "levels", None) or ()
    return max((lv.valid_for for lv in levels), default=DEFAULT_RETENTION)


def refresh(
    clients: Any, issuer: Issuer, *, now: dt.datetime, leader: bool, retention: dt.timedelta
) -> None:
    """Load the keys (creating them the first time), then the tokens' issuer name while none
    is known (a failure to read it is logged: keys load and publish all the same); the
    leader also drops keys past their retention and keeps the JWKS ConfigMap in step."""
    got = read_keys(clients, issuer.namespace)
    if got is None:
        keys = ensure_keys(clients, issuer.namespace, now)
        version = None
    else:
        keys, version = got
    before = issuer.signing_key.kid if issuer.signing_key else None
    if leader and version is not None:
        kept = pruned(keys, now, retention)
        if len(kept) != len(keys):
            try:
                write_keys(clients, issuer.namespace, kept, version)
            except Exception as exc:
                if _api_status(exc) != 409:
                    raise
            else:
                gone = sorted({k.kid for k in keys} - {k.kid for k in kept})
                log.info("verdict keys %s removed: every token they signed has expired", gone)
                keys = kept
    issuer.keys = keys
    if before != keys[-1].kid:
        log.info("signing verdict tokens with key %s", keys[-1].kid)
    if issuer.name is None:  # after the keys: they load and publish all the same
        try:
            issuer.name = read_cluster_issuer(clients)
        except RuntimeError as exc:
            log.warning("%s; no verdict tokens until it is known", exc)
        else:
            log.info("verdict tokens are issued as %s", issuer.name)
    if leader or got is None:
        publish(clients, issuer.namespace, keys, issuer.name)


def read_cluster_issuer(clients: Any) -> str:
    """`ear.cluster_issuer` of this cluster: the uid of its `kube-system` namespace."""
    try:
        got = clients.core.read_namespace("kube-system")
    except Exception as exc:
        raise RuntimeError(
            f"cannot name this cluster's verdict tokens ('iss'): reading namespace kube-system:"
            f" {_why(exc)}; grant get on it, or set --token-issuer"
        ) from exc
    uid = str(getattr(got.metadata, "uid", "") or "")
    if not uid:
        raise RuntimeError("namespace kube-system has no uid to name the verdict tokens by")
    return ear.cluster_issuer(uid)


async def load_once(clients: Any, issuer: Issuer) -> bool:
    """One refresh as a non-leader (start-up: before the first verdict); False when the
    keys are unavailable (logged; `keep` retries)."""
    try:
        await asyncio.to_thread(
            refresh,
            clients,
            issuer,
            now=dt.datetime.now(dt.UTC),
            leader=False,
            retention=DEFAULT_RETENTION,
        )
    except Exception as exc:  # noqa: BLE001 - no tokens until it works
        log.warning(
            "verdict signing keys (Secret %s/%s) unavailable: %s; no verdict tokens until they are",
            issuer.namespace,
            SECRET,
            _why(exc),
        )
        return False
    return True


async def keep(
    clients: Any,
    issuer: Issuer,
    *,
    leader: Callable[[], bool],
    retention: Callable[[], dt.timedelta],
    stop: asyncio.Event,
) -> None:
    """Refresh the keys now and every REFRESH until `stop` (failures logged, retried)."""
    while not stop.is_set():
        try:
            await asyncio.to_thread(
                refresh,
                clients,
                issuer,
                now=dt.datetime.now(dt.UTC),
                leader=leader(),
                retention=retention(),
            )
        except Exception as exc:  # noqa: BLE001 - no tokens until it works; said once a turn
            log.warning(
                "verdict signing keys (Secret %s/%s) unavailable: %s; retrying in %ss",
                issuer.namespace,
                SECRET,
                _why(exc),
                int(REFRESH.total_seconds()),
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=REFRESH.total_seconds())


# ----- what the operator serves -----------------------------------------------------------

_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


def documents(
    issuer: Issuer, token_of: Callable[[str], str | None]
) -> Callable[[str], tuple[int, str, bytes] | None]:
    """The public paths (`gtvp.http_endpoints.Public`): `/.well-known/jwks.json` and
    `/ear/members/<name>` (that member's current token, from the operator's view)."""

    def answer(path: str) -> tuple[int, str, bytes] | None:
        if path == "/.well-known/jwks.json":
            if not issuer.keys:
                return 503, "text/plain; charset=utf-8", b"no verdict signing keys loaded yet\n"
            body = json.dumps(issuer.jwks(), sort_keys=True).encode()
            return 200, "application/jwk-set+json", body
        if path.startswith("/ear/members/"):
            name = path.removeprefix("/ear/members/")
            if not _NAME.fullmatch(name):
                return 404, "text/plain; charset=utf-8", b"not a member name\n"
            token = token_of(name)
            if not token:
                text = f"member {name}: no verdict token (unknown member, or none issued yet)\n"
                return 404, "text/plain; charset=utf-8", text.encode()
            return 200, "application/jwt", token.encode()
        return None

    return answer
