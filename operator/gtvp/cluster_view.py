"""The operator's view of the cluster: the latest body of every object it watches.

Kept by the watches (`gtvp.handlers` feeds every event here, after a start-up listing), read
by every decision, so that a decision costs no API call: members and their EK index, nodes,
VMs, VMIs (indexed by node, with the room they take; a VMI is on the node its status names
and on every node where its virt-launcher pods are: `gtvp.core.launchers`) and migrations,
Lazy Boxes, OSComponents and the SecurityPolicy in force. Bookkeeping only: no I/O, no
decisions, no kopf.
"""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from gtvp.core.footprint import FINISHED, Footprint, placed_footprint, usage_by_node
from gtvp.core.launchers import LauncherPod, launcher_pod, made_for, pod_nodes
from gtvp.core.node_affinity import allowed_among
from gtvp.core.policy import Policy
from gtvp.core.trust import MemberView, as_labelled, labelled_until, member_view, node_boot_id

Key = tuple[str, str]
"""(namespace, name) of a namespaced object."""


def key_of(body: Mapping[str, Any]) -> Key:
    meta = body.get("metadata") or {}
    return (str(meta.get("namespace", "")), str(meta.get("name", "")))


def name_of(body: Mapping[str, Any]) -> str:
    return str((body.get("metadata") or {}).get("name", ""))


def kept(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the view keeps of a body: a copy of all of it but `metadata.managedFields`, which
    no decision reads, with every key and every short string value interned. A Member of
    6 KiB of JSON parses into 28 KiB of Python objects; without managedFields 14 KiB, and
    with its keys and repeated values (field names, phases, reasons, condition messages, a
    member class's PCR values) shared across members 6.5 KiB: at 10,000 members about
    200 MiB less, and a full garbage collection walks a fraction of the objects. A deep copy
    (27 us per Member): the caller's body is not changed, and nothing the caller does to it
    later changes the view. Omitting managedFields from an update leaves the server's as
    they are, so a kept body can still be written back."""
    meta = body.get("metadata")
    copied = {sys.intern(k): _kept(v) for k, v in body.items() if k != "metadata"}
    if isinstance(meta, Mapping):
        copied["metadata"] = {
            sys.intern(k): _kept(v) for k, v in meta.items() if k != "managedFields"
        }
    elif "metadata" in body:
        copied["metadata"] = meta
    return copied


SHARED_STRING = 100
"""Strings up to this many characters are interned (longer ones are certificates, quotes and
tokens: one of a kind)."""


def _kept(value: Any) -> Any:
    if isinstance(value, str):
        return sys.intern(value) if len(value) <= SHARED_STRING else value
    if isinstance(value, Mapping):
        return {sys.intern(str(k)): _kept(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_kept(v) for v in value]
    return value


@dataclass
class ClusterView:
    """The latest bodies by name (cluster-scoped) or (namespace, name), and indexes on them."""

    members: dict[str, dict[str, Any]] = field(default_factory=dict)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    node_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    vms: dict[Key, dict[str, Any]] = field(default_factory=dict)
    vmis: dict[Key, dict[str, Any]] = field(default_factory=dict)
    migrations: dict[Key, dict[str, Any]] = field(default_factory=dict)
    boxes: dict[Key, dict[str, Any]] = field(default_factory=dict)
    components: dict[str, dict[str, Any]] = field(default_factory=dict)
    labelled_memo: dict[
        str,
        tuple[
            Mapping[str, Any],
            Mapping[str, str] | None,
            str | None,
            dt.datetime,
            dt.datetime | None,
            Mapping[str, Any],
        ],
    ] = field(default_factory=dict)
    """Per member: `_as_labelled`'s last answer, with what it was asked on and until when."""
    boot_memo: dict[str, tuple[Mapping[str, Any] | None, str | None]] = field(default_factory=dict)
    """Per Node: the object `node_boot_id` last read and what it found."""
    unwritten: dict[str, tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=dict)
    """Verdicts taking trust away that could not be stored (`hold_to`): member -> (the
    stored verdict each was reached over, `_verdict_part`, and the verdict)."""
    policy: Policy | None = None
    """The generation of the enforced SecurityPolicy the pool runs under (None: none usable)."""
    policy_lost_at: dt.datetime | None = None
    """Since when no policy has been in force, as this replica saw it (None: one is, or
    none was seen lost yet)."""
    policy_error: str | None = None
    """Why no policy is usable (every member is Untrusted, NoPolicy)."""
    policy_version: str | None = None
    """The enforced SecurityPolicy's resourceVersion as last seen (None: none seen)."""
    loaded: bool = False
    """True once the start-up listing is in: until then the webhooks refuse what needs a
    verdict and /readyz says not ready."""
    # EK fingerprint index: which members are bound to which EK
    ek_of: dict[str, str] = field(default_factory=dict)
    ek_holders: dict[str, set[str]] = field(default_factory=dict)
    # which VMIs run on which node (evacuation looks at one node's VMIs): `node_of` is where
    # a VMI's status says it runs, `on_node` also counts the nodes of its launcher pods
    on_node: dict[str, set[Key]] = field(default_factory=dict)
    node_of: dict[Key, str] = field(default_factory=dict)
    launchers: dict[Key, dict[Key, LauncherPod]] = field(default_factory=dict)
    """VMI -> its launcher pods by (namespace, pod name)."""
    launcher_vmi: dict[Key, Key] = field(default_factory=dict)
    """Launcher pod -> the VMI it runs."""
    nodes_of: dict[Key, frozenset[str]] = field(default_factory=dict)
    """VMI -> every node `on_node` holds it under."""
    migrating: dict[Key, dict[Key, int]] = field(default_factory=dict)
    """VMI -> its unfinished migrations (made for this VMI, not an earlier one under its
    name), each with the event count when it was first seen unfinished."""
    events: int = 0
    """Launcher pod and migration events seen so far; `pod_seen`: at which of them each pod
    was last (a deleted one until the next resync); `pod_ended`: first seen ended."""
    pod_seen: dict[Key, int] = field(default_factory=dict)
    pod_ended: dict[Key, int] = field(default_factory=dict)
    migration_seen: dict[Key, int] = field(default_factory=dict)
    """At which event each migration was last told of (a deleted one until the next resync)."""
    component_seen: dict[str, int] = field(default_factory=dict)
    """Per OSComponent name: the event count at its last change (`note_component`)."""
    # room taken by every placed VMI, boxes' too, by its own requests, and its sum per node
    # as of a version of `placed` (summed again once `placed_version` moved on)
    placed: dict[Key, Footprint] = field(default_factory=dict)
    placed_version: int = 0
    placed_usage: tuple[int, dict[str, tuple[int, int]]] | None = None

    # -- members and nodes ----------------------------------------------------------------

    def observe_member(self, body: Mapping[str, Any], event_type: str) -> bool:
        """Record a Member event; False when the member is gone."""
        name = name_of(body)
        if event_type == "DELETED":
            self.members.pop(name, None)
            self.labelled_memo.pop(name, None)
            self.unwritten.pop(name, None)
            self._index_ek(name, None)
            return False
        self.remember_member(name, body)
        return True

    def remember_member(self, name: str, body: Mapping[str, Any]) -> None:
        """The latest body of a member (from a watch event or our own write); a verdict
        stored since one was held to (`hold_to`) ends that hold."""
        self.members[name] = body = kept(body)
        held = self.unwritten.get(name)
        if held is not None and _verdict_part(body.get("status") or {}) != held[0]:
            del self.unwritten[name]
        ek = ((body.get("status") or {}).get("trust") or {}).get("ekSHA256")
        self._index_ek(name, str(ek) if ek else None)

    def _index_ek(self, name: str, fingerprint: str | None) -> None:
        old = self.ek_of.get(name)
        if old == fingerprint:
            return
        if old is not None:
            holders = self.ek_holders.get(old, set())
            holders.discard(name)
            if not holders:
                self.ek_holders.pop(old, None)
            del self.ek_of[name]
        if fingerprint is not None:
            self.ek_of[name] = fingerprint
            self.ek_holders.setdefault(fingerprint, set()).add(name)

    def other_ek_holders(self, name: str) -> Mapping[str, str]:
        """EK fingerprint -> another member bound to it (so a second one is refused)."""
        return OtherHolders(self, name)

    def member_views(self) -> list[MemberView]:
        return [
            member_view(n, self.verdict_of(n, by_labels=True), self.node_boot_id(n))
            for n in list(self.members)
        ]

    def hold_to(self, name: str, over: Mapping[str, Any], verdict: Mapping[str, Any]) -> None:
        """A verdict that takes trust away which the operator reached over the stored
        status `over` but could not store (the API server refused the write: an object an
        agent grew past what etcd takes, a webhook, a 5xx): until the stored verdict
        changes, the pool is held to it (`verdict_of`), not to the stored one."""
        self.unwritten[name] = (_verdict_part(over), dict(verdict))

    def verdict_of(self, name: str, *, by_labels: bool = False) -> Mapping[str, Any]:
        """The status a member is held to (`held_body`)."""
        body = self.member_body(name, by_labels=by_labels) or {}
        status: Mapping[str, Any] = body.get("status") or {}
        return status

    def member_body(self, name: str, *, by_labels: bool = False) -> Mapping[str, Any] | None:
        """The member's body with the status it is held to (`held_body`)."""
        return self.held_body(name, self.members.get(name), by_labels=by_labels)

    def held_body(
        self,
        name: str,
        body: Mapping[str, Any] | None,
        *,
        by_labels: bool = False,
        now: dt.datetime | None = None,
    ) -> Mapping[str, Any] | None:
        """`body` (the member's, from the view or read fresh) with the status the pool is
        held to: the verdict this replica reached but could not store (`hold_to`), while
        that body still stores the one it was reached over; and (`by_labels`: for new
        placements only, admission's and the boxes', which the scheduler would refuse
        there anyway) a stored Trusted verdict no more than its Node's trust labels say
        (`trust.as_labelled`: the replica that reached a verdict it could not store takes
        them off). Never for what moves or stops VMs, aborts migrations or withholds
        Secrets: labels also lag a verdict for ordinary reasons (a Maintenance ended, a
        failed Node write), and those must not take running VMs down. `now`: the caller's
        clock (a placement's, asked of every member), else the current time."""
        if body is None:
            return None
        status: Mapping[str, Any] = body.get("status") or {}
        held = self.unwritten.get(name)
        if held is not None and _verdict_part(status) == held[0]:
            status = held[1]
        elif by_labels and name in self.nodes:
            status = self._as_labelled(name, status, now or dt.datetime.now(dt.UTC))
        return body if status is body.get("status") else {**body, "status": status}

    def _as_labelled(
        self, name: str, status: Mapping[str, Any], now: dt.datetime
    ) -> Mapping[str, Any]:
        """`trust.as_labelled` for the member's Node as the view holds it, remembered per
        (status, labels, boot) objects until the answer may turn (`trust.labelled_until`):
        admission and every box placement ask it of each member."""
        labels, boot = self.node_labels.get(name), self.node_boot_id(name)
        hit = self.labelled_memo.get(name)
        if (
            hit is not None
            and hit[0] is status
            and hit[1] is labels
            and hit[2] == boot
            and hit[3] <= now
            and (hit[4] is None or now < hit[4])
        ):
            return hit[5]
        got = as_labelled(status, labels, boot, now)
        self.labelled_memo[name] = (status, labels, boot, now, labelled_until(status, now), got)
        return got

    def observe_node(self, body: Mapping[str, Any], event_type: str) -> bool:
        """Record a Node event; False when the node is gone."""
        name = name_of(body)
        if event_type == "DELETED":
            self.node_labels.pop(name, None)
            self.nodes.pop(name, None)
            self.boot_memo.pop(name, None)
            return False
        self.node_labels[name] = dict((body.get("metadata") or {}).get("labels") or {})
        self.nodes[name] = kept(body)
        return True

    def node_boot_id(self, name: str) -> str | None:
        """The boot the Node's kubelet reports (`status.nodeInfo.bootID`); None when the
        Node is unknown or reports none. Remembered per Node object (the view replaces a
        Node, never edits it): every placement asks it of every member."""
        node = self.nodes.get(name)
        hit = self.boot_memo.get(name)
        if hit is not None and hit[0] is node:
            return hit[1]
        boot = node_boot_id(node or {})
        self.boot_memo[name] = (node, boot)
        return boot

    # -- KubeVirt -------------------------------------------------------------------------

    def pinnable(self, key: Key, names: Iterable[str]) -> frozenset[str] | None:
        """Which of the nodes `names` the VMI's own nodeSelector and required node affinity
        allow (`core.node_affinity`; None: they name no nodes, any will do): a migration
        pinned elsewhere could never be scheduled."""
        spec = (self.vmis.get(key) or {}).get("spec") or {}
        return allowed_among(spec, {n: self.node_labels.get(n) or {} for n in names})

    def observe_vm(self, body: dict[str, Any], event_type: str) -> None:
        self._store(self.vms, body, event_type)

    def observe_migration(self, body: dict[str, Any], event_type: str) -> frozenset[str]:
        """A watch event, or a migration gtvp just created (`body` as planned, no
        resourceVersion): the planned copy counts at once, but never replaces the server's
        copy when the watch delivered it first, so a later conditional delete (uid and
        resourceVersion) still has them. The nodes its VMI was added to (`_index`)."""
        had = self.migrations.get(key_of(body)) or {}
        planned = not (body.get("metadata") or {}).get("resourceVersion")
        served = bool((had.get("metadata") or {}).get("resourceVersion"))
        if planned and served and event_type != "DELETED":
            return frozenset()
        self.events += 1
        self.migration_seen[key_of(body)] = self.events
        key = self._store(self.migrations, body, event_type)
        vmi = (key[0], str((body.get("spec") or {}).get("vmiName", "")))
        unfinished = event_type != "DELETED" and (body.get("status") or {}).get("phase") not in (
            FINISHED
        )
        was = key in self.migrating.get(vmi, {})
        if unfinished == was:
            return frozenset()
        if unfinished:
            self.migrating.setdefault(vmi, {})[key] = self.events
        else:
            del self.migrating[vmi][key]
            if not self.migrating[vmi]:
                del self.migrating[vmi]
        return self._index(vmi)

    def resync_migrations(self, listed: list[dict[str, Any]], since: int) -> frozenset[str]:
        """The migrations as listed when the event count was `since`: one deleted while the
        watch was away (no DELETED for it) is forgotten, so that it neither keeps its VMI
        busy nor keeps counting it as migrating; one the watch told of after `since` is as
        the watch says. The nodes VMIs were added to."""
        present = {key_of(m) for m in listed}
        gone = [
            k
            for k in self.migrations
            if k not in present and self.migration_seen.get(k, since) <= since
        ]
        added: frozenset[str] = frozenset()
        for key in gone:
            body = {**self.migrations[key]}
            added |= self.observe_migration(body, "DELETED")
        self.migration_seen = {
            k: at for k, at in self.migration_seen.items() if at > since or k in self.migrations
        }
        return added

    def observe_vmi(self, body: dict[str, Any], event_type: str) -> frozenset[str]:
        """Record a VMI event; the nodes it was added to."""
        key = key_of(body)
        gone = event_type == "DELETED"
        seen = self.vmis.get(key) or {}
        same = _uid(seen) is not None and _uid(seen) == _uid(body)  # not one made anew
        node = None if gone else vmi_node(body, self.node_of.get(key) if same else None)
        self._store(self.vmis, body, event_type)
        added = self._place(key, node)
        if _replace(self.placed, key, None if gone else placed_footprint(body)):
            self.placed_version += 1
        return added

    @staticmethod
    def _store(store: dict[Key, dict[str, Any]], body: dict[str, Any], event_type: str) -> Key:
        key = key_of(body)
        if event_type == "DELETED":
            store.pop(key, None)
        else:
            store[key] = kept(body)
        return key

    def _place(self, key: Key, node: str | None) -> frozenset[str]:
        if node:
            self.node_of[key] = node
        else:
            self.node_of.pop(key, None)
        return self._index(key)

    def resync_pods(self, listed: list[dict[str, Any]], since: int) -> frozenset[str]:
        """The launcher pods as listed when `events` was `since`: those gone unseen (a
        watch that resumed after a gap delivers no DELETED for them) are forgotten, those
        missed are added; a pod the watch told of after `since` is as the watch says. The
        nodes VMIs were added to."""
        present = {key_of(p) for p in listed}
        fresh = {k for k, at in self.pod_seen.items() if at > since}
        added: frozenset[str] = frozenset()
        for pod_key in [k for k in self.launcher_vmi if k not in present and k not in fresh]:
            meta = {"namespace": pod_key[0], "name": pod_key[1]}
            added |= self.observe_pod({"metadata": meta}, "DELETED")
        for body in listed:
            if key_of(body) not in fresh:
                added |= self.observe_pod(body, "ADDED")
        self.pod_seen = {
            k: at for k, at in self.pod_seen.items() if at > since or k in self.launcher_vmi
        }
        return added

    def observe_pod(self, body: Mapping[str, Any], event_type: str) -> frozenset[str]:
        """Record a virt-launcher pod event; the nodes its VMI was added to (a host where
        the VMI runs that its status does not name)."""
        pod_key = key_of(body)
        pod = None if event_type == "DELETED" else launcher_pod(body)
        self.events += 1
        self.pod_seen[pod_key] = self.events  # also when gone, until the next resync
        if pod is None or not pod.ended:
            self.pod_ended.pop(pod_key, None)
        else:
            self.pod_ended.setdefault(pod_key, self.events)
        vmi = self.launcher_vmi.pop(pod_key, None)
        pods = self.launchers.get(vmi) if vmi is not None else None
        if vmi is not None and pods is not None:
            pods.pop(pod_key, None)
            if not pods:
                del self.launchers[vmi]
        if pod is not None:
            self.launcher_vmi[pod_key] = pod.vmi
            self.launchers.setdefault(pod.vmi, {})[pod_key] = pod
        added: frozenset[str] = frozenset()
        for touched in {k for k in (vmi, pod.vmi if pod else None) if k is not None}:
            added |= self._index(touched)
        return added

    def _index(self, key: Key) -> frozenset[str]:
        """Put VMI `key` under every node it runs on; the nodes it was not under before."""
        old = self.nodes_of.get(key, frozenset())
        pods = self.launchers.get(key, {})
        began = self._migrating_since(key)
        nodes = pod_nodes(
            pods.values(),
            _uid(self.vmis.get(key) or {}),
            ended_while_migrating=[
                p
                for k, p in pods.items()
                if began is not None and self.pod_ended.get(k, -1) > began
            ],
        )
        status_node = self.node_of.get(key)
        if status_node:
            nodes |= {status_node}
        for node in old - nodes:
            there = self.on_node.get(node)
            if there is not None:
                there.discard(key)
                if not there:
                    del self.on_node[node]
        for node in nodes - old:
            self.on_node.setdefault(node, set()).add(key)
        if nodes:
            self.nodes_of[key] = nodes
        else:
            self.nodes_of.pop(key, None)
        return nodes - old

    def _migrating_since(self, key: Key) -> int | None:
        """The event count when the VMI's earliest unfinished migration made for it (not
        for an earlier VMI under its name; an undated one is: this widens what holds the
        VMI) was first seen; None: none."""
        vmi = self.vmis.get(key) or {}
        since = None
        for mkey, at in self.migrating.get(key, {}).items():
            if not made_for(self.migrations.get(mkey) or {}, vmi, undated=True):
                continue
            since = at if since is None else min(since, at)
        return since

    def vmi_usage(self) -> dict[str, tuple[int, int]]:
        """(CPU millicores, memory bytes) per node taken by every placed VMI. Worker threads
        call it while the event loop records VMIs: it sums a copy of `placed`, and a sum
        cached under a version that moved on meanwhile is never returned."""
        cached = self.placed_usage
        if cached is not None and cached[0] == self.placed_version:
            return cached[1]
        version = self.placed_version  # read before the copy: a later change re-sums
        usage = usage_by_node(dict(self.placed))
        self.placed_usage = (version, usage)
        return usage

    # -- Lazy Boxes and components --------------------------------------------------------

    def observe_box(self, body: dict[str, Any], event_type: str) -> bool:
        """Record a LazyBox event; True when it is new or changed (not the echo of a status
        write that left its resourceVersion as we knew it)."""
        key = key_of(body)
        if event_type == "DELETED":
            return self.boxes.pop(key, None) is not None
        known = self.boxes.get(key)
        rv = (body.get("metadata") or {}).get("resourceVersion")
        self.boxes[key] = kept(body)
        return known is None or (known.get("metadata") or {}).get("resourceVersion") != rv

    def note_component(self, name: str) -> None:
        """The view's copy of OSComponent `name` changed now (an event, or the operator's own
        read or write): a listing requested before is not taken over it (`resync`)."""
        self.events += 1
        self.component_seen[name] = self.events

    def observe_component(self, body: dict[str, Any], event_type: str) -> bool:
        """Record an OSComponent event; False when it is gone."""
        name = name_of(body)
        self.note_component(name)
        if event_type == "DELETED":
            self.components.pop(name, None)
            return False
        self.components[name] = kept(body)
        return True


class OtherHolders(Mapping[str, str]):
    """EK fingerprint -> another member bound to it (a view; nothing is copied)."""

    def __init__(self, view: ClusterView, name: str) -> None:
        self.view = view
        self.name = name

    def __getitem__(self, fingerprint: str) -> str:
        others = self.view.ek_holders.get(fingerprint, set()) - {self.name}
        if not others:
            raise KeyError(fingerprint)
        return min(others)

    def __iter__(self) -> Iterator[str]:
        return (fp for fp in list(self.view.ek_holders) if fp in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _replace(store: dict[Key, Footprint], key: Key, fp: Footprint | None) -> bool:
    """Put `fp` (None: nothing) under `key`; whether that changed anything."""
    if store.get(key) == fp:
        return False
    if fp is None:
        del store[key]
    else:
        store[key] = fp
    return True


NODE_LABEL = "kubevirt.io/nodeName"  # KubeVirt labels a scheduled VMI with its node too


def vmi_node(body: Mapping[str, Any], before: str | None) -> str | None:
    """The node a VMI runs on, as gtvp holds it: `status.nodeName`, else KubeVirt's
    `kubevirt.io/nodeName` label, else, while the VMI has not ended, the node it was last
    seen on. An update that blanks where a running VMI is (root on its host can write VMIs
    with that host's virt-handler token) does not hide it from evacuation and its bound: a
    VMI that really moves names its new node."""
    status = body.get("status") or {}
    labels = (body.get("metadata") or {}).get("labels") or {}
    node = status.get("nodeName") or labels.get(NODE_LABEL)
    if node:
        return str(node)
    return before if status.get("phase") not in FINISHED else None


def _uid(body: Mapping[str, Any]) -> str | None:
    uid = (body.get("metadata") or {}).get("uid")
    return str(uid) if uid else None


def _verdict_part(status: Mapping[str, Any]) -> dict[str, Any]:
    """A stored status's verdict (`status.trust`) less the uses spent on it: a spend is
    stored even when a verdict is not (it does not grow the Member), and must not end a
    hold (`ClusterView.hold_to`); only another verdict does."""
    trust = (status or {}).get("trust") or {}
    return {k: v for k, v in trust.items() if k != "usesLeft"}
