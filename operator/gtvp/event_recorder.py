"""Kubernetes Events with repeats aggregated, as client-go's EventRecorder does.

An Event with the same involved object, type, reason and message as one recorded within
`window` (10 minutes since its last occurrence) is not created again: the existing Event's
`count` goes up and its `lastTimestamp` moves on (core/v1 Events, the API `kube.post_event`
writes; client-go's EventCorrelator does the same with a `count`/`lastTimestamp` patch). A
bounded LRU cache (`max_keys`, 4096 like client-go's) remembers which Event stands for which
key. When that Event is gone (expired by the API server's `--event-ttl`, or deleted) the
patch answers 404 and a new Event is created with count 1. The cache lives in the process: a
restarted operator starts new Events.

`EventCache` is the decision, pure apart from its lock (the time is an argument);
`EventRecorder` makes the API calls. Calls for the same key are serialised (a striped lock),
so two threads never create two Events for one key. Messages are written as given and only
reason, kind and name are logged: callers never put secrets in messages.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace

from kubernetes import client

MAX_MESSAGE = 1024
MAX_KEYS = 4096
WINDOW = dt.timedelta(minutes=10)
_STRIPES = 64


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """The object an Event is about (`namespace` None for a cluster-scoped one)."""

    api_version: str
    kind: str
    name: str
    uid: str
    namespace: str | None

    @property
    def event_namespace(self) -> str:
        """Where its Events live: its own namespace, `default` for cluster-scoped objects."""
        return self.namespace or "default"


@dataclass(frozen=True, slots=True)
class EventKey:
    """What makes two Events the same one: object, type, reason and (truncated) message."""

    obj: ObjectRef
    type: str
    reason: str
    message: str

    @classmethod
    def of(cls, obj: ObjectRef, type_: str, reason: str, message: str) -> EventKey:
        return cls(obj, type_, reason, message[:MAX_MESSAGE])


@dataclass(frozen=True, slots=True)
class Occurrence:
    """The Event that stands for a key, and how often and when it happened."""

    event_name: str
    count: int
    first: dt.datetime
    last: dt.datetime

    def repeated(self, now: dt.datetime) -> Occurrence:
        return replace(self, count=self.count + 1, last=now)


class EventCache:
    """Key -> the Event recorded for it, least recently used dropped beyond `max_keys`."""

    def __init__(self, max_keys: int = MAX_KEYS, window: dt.timedelta = WINDOW) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.max_keys = max_keys
        self.window = window
        self._entries: OrderedDict[EventKey, Occurrence] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def recent(self, key: EventKey, now: dt.datetime) -> Occurrence | None:
        """The Event recorded for `key` if its last occurrence is within the window."""
        with self._lock:
            occ = self._entries.get(key)
            if occ is None:
                return None
            if now - occ.last > self.window:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return occ

    def remember(self, key: EventKey, occ: Occurrence) -> None:
        with self._lock:
            self._entries[key] = occ
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_keys:
                self._entries.popitem(last=False)

    def forget(self, key: EventKey) -> None:
        with self._lock:
            self._entries.pop(key, None)


def _timestamp(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class EventRecorder:
    """Records Events through a CoreV1Api, aggregating repeats (see the module docstring)."""

    def __init__(self, component: str, cache: EventCache | None = None) -> None:
        self.component = component
        self.cache = cache if cache is not None else EventCache()
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]

    def record(
        self,
        core: client.CoreV1Api,
        obj: ObjectRef,
        *,
        type_: str,
        reason: str,
        message: str,
        now: dt.datetime | None = None,
    ) -> Occurrence:
        """Create the Event, or count a repeat on the recent one; ApiException propagates."""
        now = now or dt.datetime.now(dt.UTC)
        key = EventKey.of(obj, type_, reason, message)
        with self._stripes[hash(key) % _STRIPES]:
            prev = self.cache.recent(key, now)
            if prev is not None:
                occ = prev.repeated(now)
                if self._bump(core, key, occ):
                    self.cache.remember(key, occ)
                    return occ
                self.cache.forget(key)  # the Event expired or was deleted
            occ = self._create(core, key, now)
            self.cache.remember(key, occ)
            return occ

    def _bump(self, core: client.CoreV1Api, key: EventKey, occ: Occurrence) -> bool:
        """Patch count and lastTimestamp; False if the Event is gone."""
        patch = {"count": occ.count, "lastTimestamp": _timestamp(occ.last)}
        try:
            core.patch_namespaced_event(
                occ.event_name,
                key.obj.event_namespace,
                patch,
                _content_type="application/merge-patch+json",
            )
        except client.exceptions.ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def _create(self, core: client.CoreV1Api, key: EventKey, now: dt.datetime) -> Occurrence:
        obj = key.obj
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(
                generate_name=f"{obj.name}.", namespace=obj.event_namespace
            ),
            involved_object=client.V1ObjectReference(
                api_version=obj.api_version,
                kind=obj.kind,
                name=obj.name,
                uid=obj.uid,
                namespace=obj.namespace,
            ),
            type=key.type,
            reason=key.reason,
            message=key.message,
            source=client.V1EventSource(component=self.component),
            first_timestamp=now,
            last_timestamp=now,
            count=1,
        )
        created = core.create_namespaced_event(obj.event_namespace, body)
        return Occurrence(str(created.metadata.name), 1, now, now)
