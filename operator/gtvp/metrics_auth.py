"""Who may read `/metrics`: the API server decides, as controller-runtime's
`filters.WithAuthenticationAndAuthorization` does.

Each request's bearer token is sent in a TokenReview (who is it?), then that identity in a
SubjectAccessReview for the request's path as a non-resource URL and its method as the verb
(may it `get` `/metrics`?). No token or a token the API server does not authenticate: 401;
authenticated but not allowed: 403; allowed: served. Answers are cached per token, path and
verb (allowed for `ALLOWED_TTL`, refused for `REFUSED_TTL`, at most `CACHE_SIZE` entries),
so a Prometheus scraping every 15 s costs the API server two reviews a minute, not eight.

Functional core, imperative shell: everything here but `api_reviewer` and `TlsFiles` is pure
(the reviews are functions handed in, the clock too); `api_reviewer` is the two API calls.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import ssl
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gtvp.http_endpoints import error_line

log = logging.getLogger(__name__)

ALLOWED_TTL = 60.0
"""Seconds an allowed token is not reviewed again."""
REFUSED_TTL = 10.0
"""Seconds a refused (unauthenticated or forbidden) token is not reviewed again."""
WARN_EVERY = 30.0
"""Seconds between two warnings that a review failed (the others are logged at debug)."""
CACHE_SIZE = 1024
"""Entries kept at most (the oldest go first): a flood of bad tokens cannot grow it."""

Review = Callable[[dict[str, Any]], Mapping[str, Any]]
"""Creates a review object (TokenReview, SubjectAccessReview); returns its status."""


@dataclass(frozen=True)
class Identity:
    """Who a token belongs to, as the TokenReview says."""

    user: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass(frozen=True)
class Refusal:
    """An HTTP answer instead of the metrics."""

    status: int
    text: str

    @property
    def reason(self) -> str:
        return {401: "Unauthorized", 403: "Forbidden"}.get(self.status, "Service Unavailable")


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (None: no usable header)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


def token_review(token: str) -> dict[str, Any]:
    return {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": token},
    }


def authenticated(status: Mapping[str, Any]) -> Identity | None:
    """The identity a TokenReview's status vouches for (None: not authenticated)."""
    if not status.get("authenticated"):
        return None
    user = status.get("user") or {}
    name = str(user.get("username") or "")
    if not name:
        return None
    extra = user.get("extra") or {}
    return Identity(
        user=name,
        uid=str(user.get("uid") or ""),
        groups=tuple(str(g) for g in user.get("groups") or ()),
        extra=tuple(sorted((str(k), tuple(str(v) for v in vs or ())) for k, vs in extra.items())),
    )


def access_review(who: Identity, path: str, verb: str) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "user": who.user,
        "groups": list(who.groups),
        "nonResourceAttributes": {"path": path, "verb": verb},
    }
    if who.uid:
        spec["uid"] = who.uid
    if who.extra:
        spec["extra"] = {k: list(v) for k, v in who.extra}
    return {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": spec,
    }


def allowed(status: Mapping[str, Any]) -> bool:
    return bool(status.get("allowed")) and not status.get("denied")


def verdict(path: str, verb: str, who: Identity | None, may: bool) -> Refusal | None:
    """None to serve the request; else what to answer."""
    if who is None:
        return Refusal(401, "Unauthorized: no valid bearer token\n")
    if not may:
        return Refusal(403, f'Forbidden: user "{who.user}" may not {verb} {path}\n')
    return None


@dataclass
class ReviewCache:
    """Answers by (token digest, path, verb), each until its own deadline, LRU-bounded."""

    size: int = CACHE_SIZE
    _entries: OrderedDict[tuple[str, str, str], tuple[float, Refusal | None]] = field(
        default_factory=OrderedDict
    )
    _lock: threading.Lock = field(default_factory=threading.Lock)
    """Each request has its thread: an entry deleted or evicted by one while another moves
    it would raise (a 500)."""

    @staticmethod
    def key(token: str, path: str, verb: str) -> tuple[str, str, str]:
        return hashlib.sha256(token.encode()).hexdigest(), path, verb

    def get(self, key: tuple[str, str, str], now: float) -> tuple[bool, Refusal | None]:
        """(found, answer): found False when absent or expired."""
        with self._lock:
            got = self._entries.get(key)
            if got is None:
                return False, None
            until, answer = got
            if now >= until:
                del self._entries[key]
                return False, None
            self._entries.move_to_end(key)
            return True, answer

    def put(self, key: tuple[str, str, str], answer: Refusal | None, now: float) -> None:
        ttl = ALLOWED_TTL if answer is None else REFUSED_TTL
        with self._lock:
            self._entries[key] = (now + ttl, answer)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


@dataclass
class Guard:
    """Authenticates and authorizes requests with the two reviews handed in."""

    review_token: Review
    review_access: Review
    clock: Callable[[], float]
    cache: ReviewCache = field(default_factory=ReviewCache)
    warned_at: float | None = None
    """When a failed review was last logged as a warning (one each WARN_EVERY seconds: during
    an API outage anyone reaching the port could write a line per request)."""

    def check(self, authorization: str | None, path: str, method: str) -> Refusal | None:
        """None: serve the request. A failed review (API server unreachable...) is a 503
        and is not cached."""
        token = bearer_token(authorization)
        if token is None:
            return Refusal(401, "Unauthorized: send an Authorization: Bearer <token> header\n")
        verb = method.lower()
        key = ReviewCache.key(token, path, verb)
        found, answer = self.cache.get(key, self.clock())
        if found:
            return answer
        try:
            who = authenticated(self.review_token(token_review(token)))
            may = who is not None and allowed(self.review_access(access_review(who, path, verb)))
        except Exception as exc:  # noqa: BLE001 - any failure to review is a refusal, said
            # the caller is not authenticated yet: the API error (its headers and body name
            # the operator's account, the API server, its flow control) goes to the log only
            now = self.clock()
            loud = self.warned_at is None or now - self.warned_at >= WARN_EVERY
            if loud:
                self.warned_at = now
            log.log(
                logging.WARNING if loud else logging.DEBUG,
                "cannot review a /metrics request with the API server: %s",
                error_line(exc),
            )
            return Refusal(503, "cannot review the request with the API server: ask again\n")
        answer = verdict(path, verb, who, may)
        self.cache.put(key, answer, self.clock())
        return answer


def plain_http_allowed(address: str) -> bool:
    """Plain, unauthenticated HTTP only on loopback (for a proxy sidecar or a local pool)."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return False


# ----- the imperative shell ------------------------------------------------------------------


def api_reviewer(api: Any) -> tuple[Review, Review]:
    """TokenReview and SubjectAccessReview through a kubernetes `ApiClient`."""
    from kubernetes import client

    authn = client.AuthenticationV1Api(api)
    authz = client.AuthorizationV1Api(api)

    def review_token(body: dict[str, Any]) -> Mapping[str, Any]:
        got: Any = api.sanitize_for_serialization(authn.create_token_review(body))
        return dict(got.get("status") or {})

    def review_access(body: dict[str, Any]) -> Mapping[str, Any]:
        got: Any = api.sanitize_for_serialization(authz.create_subject_access_review(body))
        return dict(got.get("status") or {})

    return review_token, review_access


@dataclass
class TlsFiles:
    """A server TLS context from a certificate and key on disk, loaded again when either
    file changes (cert-manager renews the Secret, the kubelet updates the mounted files)."""

    certfile: str
    keyfile: str
    _stamp: tuple[float, float] | None = None
    _context: ssl.SSLContext | None = None

    def context(self) -> ssl.SSLContext:
        try:
            stamp = (os.stat(self.certfile).st_mtime, os.stat(self.keyfile).st_mtime)
            if self._context is None or stamp != self._stamp:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                ctx.minimum_version = ssl.TLSVersion.TLSv1_2
                ctx.load_cert_chain(self.certfile, self.keyfile)
                self._context, self._stamp = ctx, stamp
        except (OSError, ssl.SSLError):
            if self._context is None:
                raise
            # caught between the new certificate and its key: the old pair until both agree
        return self._context
