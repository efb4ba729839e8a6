"""Several operator replicas on the local pool, broken on purpose (issue #12).

Real: kube-apiserver + etcd, swtpm + gtvp-agent per member, two `gtvp-operator` processes
sharing the members through Leases, each with its own ServiceAccount token. Simulated: Nodes
(kwok), KubeVirt's virt-controller (the stand-in) and the Service in front of the replicas'
webhooks (`gtvp_local.frontend`, as kube-proxy would: a connection goes to a ready replica).

The pool's policy (interval 5 s, validFor 15 s) and lease timings (duration 4 s, renew
deadline 2.5 s, retry 0.5 s) meet the failover bound validFor - interval > duration +
2 x retry (+ about 2 s for the agent's quote and the judgement): 10 > 7, so no member may
expire while a shard changes hands.

Every fault is watched through the API server: a watch on the pool's Members records each
write (phase, reason, nonce, which replica wrote it), a watch on the Leases records each
change of holder, with the etcd revision (resourceVersion) that orders them.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from kubernetes import client, config, watch

from gtvp.core.shards import shard_of
from gtvp_local.controlplane import ControlPlane
from gtvp_local.pool import Pool
from gtvp_local.replicas import LEASE_NAMESPACE, LeaseTimings
from tests.pools import trusted_pool
from tests.pools import wait_for as _wait

pytestmark = [pytest.mark.e2e, pytest.mark.controlplane, pytest.mark.tpm]

TIMINGS = LeaseTimings()  # the local pool's: duration 4, renew deadline 2.5, retry 0.5
VALID_FOR = 15.0
SLACK = 3.0  # processing and the 0.25 s polls on a loaded 2-core machine


@pytest.fixture(scope="module")
def pool(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    with trusted_pool(
        control_plane,
        tmp_path_factory.mktemp("e2e-ha"),
        tag="ha",
        identities={"a": 3, "b": 3, "c": 3, "d": 3},
        replicas=2,
        timings=TIMINGS,
        timeout=90,
    ) as p:
        yield p


@pytest.fixture(scope="module")
def api(control_plane: ControlPlane) -> client.ApiClient:
    return config.new_client_from_config(str(control_plane.admin_kubeconfig))


# ----- what the API server shows ----------------------------------------------------------------
def _rv(obj: dict[str, Any]) -> int:
    return int(obj["metadata"]["resourceVersion"])


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC).timestamp()


def _writer_times(obj: dict[str, Any]) -> dict[str, float]:
    """Field manager -> when it last wrote the Member's status (1 s precision)."""
    return {
        str(e["manager"]): _ts(e["time"])
        for e in obj["metadata"].get("managedFields") or []
        if e.get("subresource") == "status" and e.get("time")
    }


_SANITIZE = client.ApiClient().sanitize_for_serialization
"""A typed model (V1Lease) as the API server's JSON."""


@dataclass
class Recorder:
    """A watch in a thread: every event's resourceVersion, wall time and object."""

    list_call: Callable[..., Any]
    args: tuple[Any, ...]
    keep: Callable[[dict[str, Any]], bool]
    events: list[tuple[int, float, dict[str, Any]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _list(self) -> str:
        """The current state (recorded) and the collection's resourceVersion to watch from.
        (An object's own resourceVersion is no place to resume: a watch from the oldest
        object's version replays every later event, long before the test began.)"""
        listing = self.list_call(*self.args)
        listing = listing if isinstance(listing, dict) else _SANITIZE(listing)
        for obj in listing.get("items") or []:
            if self.keep(obj):
                self.events.append((_rv(obj), time.time(), obj))
        return str(listing["metadata"]["resourceVersion"])

    def _run(self) -> None:
        rv: str | None = None
        while not self._stop.is_set():
            if rv is None:
                try:
                    rv = self._list()
                except Exception:  # noqa: BLE001 - the API server is busy: list again
                    time.sleep(0.2)
                continue
            w = watch.Watch()
            kwargs: dict[str, Any] = {"timeout_seconds": 2, "resource_version": rv}
            try:
                for ev in w.stream(self.list_call, *self.args, **kwargs):
                    obj = ev["object"]
                    obj = obj if isinstance(obj, dict) else _SANITIZE(obj)
                    rv = obj["metadata"]["resourceVersion"]
                    if self.keep(obj):
                        self.events.append((_rv(obj), time.time(), obj))
                    if self._stop.is_set():
                        w.stop()
            except client.ApiException as exc:
                if exc.status == 410:  # too old: the current state again
                    rv = None
            except Exception:  # noqa: BLE001, S110 - a dropped watch resumes from rv
                pass

    def __enter__(self) -> Recorder:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def _members_recorder(api: client.ApiClient, pool: Pool) -> Recorder:
    names = set(pool.members())
    return Recorder(
        client.CustomObjectsApi(api).list_cluster_custom_object,
        ("gtvp.io", "v1alpha1", "members"),
        lambda o: o["metadata"]["name"] in names,
    )


def _leases_recorder(api: client.ApiClient) -> Recorder:
    return Recorder(
        client.CoordinationV1Api(api).list_namespaced_lease,
        (LEASE_NAMESPACE,),
        lambda o: "gtvp.io/lease" in (o["metadata"].get("labels") or {}),
    )


def _expired(events: list[tuple[int, float, dict[str, Any]]]) -> list[str]:
    """Every recorded moment a member was not Trusted: name, phase, reason, when (wall
    clock), and the last writer of its status."""
    out = []
    for _rv, seen, obj in events:
        st = obj.get("status") or {}
        if st.get("phase") != "Trusted":
            reason = (st.get("trust") or {}).get("reason")
            times = _writer_times(obj)
            last = max(times, key=lambda k: times[k]) if times else None
            out.append(
                f"{obj['metadata']['name']}: {st.get('phase')} {reason} at {seen:.1f} "
                f"(last writer {last})"
            )
    return out


def _members_of(pool: Pool, identity: str) -> list[str]:
    holders = pool.shard_holders()
    return [m for m in pool.members() if holders[shard_of(m, TIMINGS.shards)] == identity]


def _held(pool: Pool, identity: str) -> set[int]:
    return {s for s, h in pool.shard_holders().items() if h == identity}


def _settle(pool: Pool) -> None:
    """Every replica running and ready, every shard held by a live replica, each replica its
    fair share, a leader, every member Trusted."""
    for r in pool.replicas:
        tracked = pool.procs.get(r.process)
        if tracked is None or not tracked.alive():
            pool.start_replica(r.index, wait=0)
    pool.wait_operator_ready(60)
    share = TIMINGS.shards // len(pool.replicas)
    _wait(
        "shards balanced over the replicas and a leader",
        lambda: (
            all(len(_held(pool, r.identity)) == share for r in pool.replicas)
            and pool.leader() is not None
        ),
        timeout=60,
    )
    for m in pool.members():
        pool.wait_phase(m, "Trusted", timeout=60)


def _busiest(pool: Pool) -> int:
    """The replica writing for the most members (it holds some)."""
    counts = {r.index: len(_members_of(pool, r.identity)) for r in pool.replicas}
    index = max(counts, key=lambda i: counts[i])
    assert counts[index] > 0
    return index


# ----- a client creating gated VMs in a loop ---------------------------------------------------
@dataclass
class GatedClient:
    """Creates gated VMs one after another; sorts each answer: accepted, refused by gtvp
    (a trust reason, from its validating webhook), or a webhook call that failed."""

    api: client.ApiClient
    namespace: str
    accepted: int = 0
    refused: list[str] = field(default_factory=list)
    failed: list[tuple[float, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _create(self) -> None:
        vm = {
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachine",
            "metadata": {"name": f"g-{uuid.uuid4().hex[:8]}", "labels": {"gtvp.io/level": "2"}},
            "spec": {
                "running": False,
                "template": {
                    "metadata": {"labels": {"gtvp.io/level": "2"}},
                    "spec": {"domain": {"devices": {}, "memory": {"guest": "64Mi"}}},
                },
            },
        }
        api = client.CustomObjectsApi(self.api)
        try:
            api.create_namespaced_custom_object(
                "kubevirt.io", "v1", self.namespace, "virtualmachines", vm
            )
            self.accepted += 1
        except client.ApiException as exc:
            text = str(exc.body)
            if "denied the request" in text and "webhook" in text:
                self.refused.append(text[:300])
            else:
                self.failed.append((time.time(), f"{exc.status}: {text[:400]}"))

    def _run(self) -> None:
        while not self._stop.is_set():
            with self.lock:
                self._create()
            time.sleep(0.05)

    def __enter__(self) -> GatedClient:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def answered(self) -> int:
        return self.accepted + len(self.refused)


# ----- the faults -------------------------------------------------------------------------------
def test_rolling_restart_answers_every_admission(
    pool: Pool, api: client.ApiClient, namespace: str
) -> None:
    """Each replica in turn gets SIGTERM (unready at once, answering for its shutdown grace,
    Leases handed back), exits, and its replacement turns ready before the next one goes;
    meanwhile every gated VM create is answered and no member loses its verdict."""
    _settle(pool)
    with _members_recorder(api, pool) as members, GatedClient(api, namespace) as gated:
        time.sleep(1)
        pool.rolling_restart(timeout=60)
        time.sleep(2)
    assert gated.failed == [], gated.failed[:3]
    assert gated.answered >= 20, (gated.accepted, gated.refused[:3])
    assert _expired(members.events) == []
    _settle(pool)


def test_kill_9_of_a_shard_holder(pool: Pool, api: client.ApiClient, namespace: str) -> None:
    """A replica holding shards is killed: its members never lose their verdict, its shards
    are the survivor's within duration + retry (+ slack), admissions go on being answered."""
    _settle(pool)
    victim = pool.replicas[_busiest(pool)]
    survivor = next(r for r in pool.replicas if r is not victim)
    shards, orphans = _held(pool, victim.identity), _members_of(pool, victim.identity)
    with _members_recorder(api, pool) as members, GatedClient(api, namespace) as gated:
        time.sleep(1)
        with gated.lock:  # between two creates: a request in flight on the victim dies with
            pool.kill_replica(victim.index)  # it under any L4 Service, a cluster's too
            killed = time.time()
            time.sleep(0.1)
        _wait(
            f"{survivor.identity} to hold {victim.identity}'s shards",
            lambda: shards <= _held(pool, survivor.identity),
            timeout=TIMINGS.failover_bound() + SLACK + 10,
        )
        took = time.time() - killed
        deadline = killed + 2 * TIMINGS.duration + VALID_FOR
        time.sleep(max(deadline - time.time(), 0))
    assert took <= TIMINGS.failover_bound() + SLACK, f"takeover after {took:.1f}s"
    assert _expired(members.events) == [], orphans
    assert gated.failed == [], gated.failed[:3]
    assert gated.answered >= 20
    written = {m: _writer_times(o) for _r, _t, o in members.events for m in [o["metadata"]["name"]]}
    for m in orphans:  # the survivor wrote their verdicts since
        assert written[m].get(survivor.field_manager, 0) >= int(killed), (m, written[m])
    _settle(pool)


def _first_write_after(
    events: list[tuple[int, float, dict[str, Any]]], manager: str, after: float
) -> dict[str, int]:
    """Member -> resourceVersion of the first write by `manager` stamped after `after`."""
    out: dict[str, int] = {}
    for rv, _t, obj in events:
        name = obj["metadata"]["name"]
        if name not in out and _writer_times(obj).get(manager, 0) > after:
            out[name] = rv
    return out


def _holder_at(leases: list[tuple[int, float, dict[str, Any]]], lease: str, rv: int) -> str | None:
    holder = None
    for lrv, _t, obj in leases:
        if obj["metadata"]["name"] == lease and lrv <= rv:
            holder = (obj.get("spec") or {}).get("holderIdentity")
    return holder


def _two_nonces_in_a_cycle(events: list[tuple[int, float, dict[str, Any]]]) -> list[str]:
    """A cycle is one verdict (trust.verifiedAt, verdict, reason); its nonce is the one
    published when the next quote is due. A second nonce before the next verdict is two
    writers at work."""
    seen: dict[tuple[str, str, str, str], str] = {}
    bad = []
    for *_, obj in events:
        st = obj.get("status") or {}
        trust, nonce = st.get("trust") or {}, (st.get("challenge") or {}).get("nonce")
        if not nonce:
            continue
        key = (
            obj["metadata"]["name"],
            str(trust.get("verifiedAt")),
            str(trust.get("verdict")),
            str(trust.get("reason")),
        )
        if seen.setdefault(key, nonce) != nonce:
            bad.append(f"{key}: {seen[key]} then {nonce}")
    return bad


def test_frozen_replica_is_fenced(pool: Pool, api: client.ApiClient) -> None:
    """SIGSTOP longer than the lease: the other replica takes the frozen one's shards; after
    SIGCONT the frozen one writes nothing for a member unless it holds that member's shard
    again first, and no member sees two nonces in one cycle."""
    _settle(pool)
    frozen = pool.replicas[_busiest(pool)]
    other = next(r for r in pool.replicas if r is not frozen)
    shards, orphans = _held(pool, frozen.identity), _members_of(pool, frozen.identity)
    with _members_recorder(api, pool) as members, _leases_recorder(api) as leases:
        time.sleep(1)
        pool.freeze_replica(frozen.index)
        froze = time.time()
        try:
            _wait(
                f"{other.identity} to hold the frozen replica's shards",
                lambda: shards <= _held(pool, other.identity),
                timeout=TIMINGS.failover_bound() + SLACK + 10,
            )
            time.sleep(max(froze + TIMINGS.duration + VALID_FOR / 2 - time.time(), 0))
        finally:
            pool.thaw_replica(frozen.index)
        time.sleep(2 * TIMINGS.duration + 2)
    first = _first_write_after(members.events, frozen.field_manager, froze)
    for m in orphans:
        if m in first:  # only after it took the member's shard back, by the Lease's revision
            lease = f"gtvp-shard-{shard_of(m, TIMINGS.shards):02d}"
            assert _holder_at(leases.events, lease, first[m]) == frozen.identity, (
                f"{frozen.identity} wrote {m} (rv {first[m]}) while not holding {lease}"
            )
    assert _two_nonces_in_a_cycle(members.events) == []
    assert _expired(members.events) == [], (f"froze {froze:.1f}", orphans, frozen.identity)
    _settle(pool)


def test_revoked_credential_steps_down(pool: Pool, api: client.ApiClient) -> None:
    """One replica's ServiceAccount is deleted (401 from then on): it turns unready, the
    other takes its shards, members stay Trusted; restarted with a new credential, it
    rejoins."""
    _settle(pool)
    revoked = pool.replicas[_busiest(pool)]
    other = next(r for r in pool.replicas if r is not revoked)
    shards = _held(pool, revoked.identity)
    with _members_recorder(api, pool) as members:
        pool.revoke_replica(revoked.index)
        # the API server caches a token's authentication for 10 s
        pool.wait_replica_ready(revoked.index, 10 + TIMINGS.duration + SLACK + 10, ready=False)
        _wait(
            f"{other.identity} to hold the revoked replica's shards",
            lambda: shards <= _held(pool, other.identity),
            timeout=TIMINGS.failover_bound() + SLACK + 10,
        )
        time.sleep(TIMINGS.duration)
    assert _expired(members.events) == []
    assert pool.replica_ready(other.index)
    pool.stop_replica(revoked.index)
    pool.start_replica(revoked.index, wait=60)
    _settle(pool)


def _create_vms(pool: Pool, namespace: str, count: int) -> None:
    """`count` running VMs of level 2 (evacuated on Untrusted, `Migrate`)."""
    for i in range(count):
        vm = {
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachine",
            "metadata": {"name": f"vm{i}", "labels": {"gtvp.io/level": "2"}},
            "spec": {
                "running": True,
                "template": {
                    "metadata": {"labels": {"gtvp.io/level": "2"}},
                    "spec": {
                        "domain": {"devices": {}, "memory": {"guest": "64Mi"}},
                        "evictionStrategy": "External",
                    },
                },
            },
        }
        pool.cp.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(vm))


def _vmis(pool: Pool, namespace: str) -> Callable[[], dict[str, str]]:
    def placements() -> dict[str, str]:
        out = json.loads(pool.cp.kubectl("get", "vmi", "-n", namespace, "-o", "json").stdout)
        return {
            i["metadata"]["name"]: (i.get("status") or {}).get("nodeName", "") for i in out["items"]
        }

    return placements


def _evacuations(pool: Pool, namespace: str) -> Callable[[str], list[dict[str, Any]]]:
    def migrations(host: str) -> list[dict[str, Any]]:
        out = json.loads(pool.cp.kubectl("get", "vmim", "-n", namespace, "-o", "json").stdout)
        return [
            m
            for m in out["items"]
            if (m["metadata"].get("labels") or {}).get("gtvp.io/evacuation") == host
        ]

    return migrations


def test_leader_killed_mid_evacuation_starts_each_migration_once(
    pool: Pool, namespace: str
) -> None:
    """A member is tampered with and the leader (the evacuation loop) is killed as soon as
    the first evacuation migration exists: the next leader starts no second migration for
    any VMI. Last in the module: the tampered member stays Untrusted."""
    _settle(pool)
    _create_vms(pool, namespace, 4)
    placements, migrations = _vmis(pool, namespace), _evacuations(pool, namespace)

    _wait("every VM running", lambda: len(p := placements()) == 4 and all(p.values()))
    placed = placements()
    host = max(set(placed.values()), key=list(placed.values()).count)
    on_host = sorted(n for n, node in placed.items() if node == host)
    leader = pool.leader()
    assert leader is not None
    pool.procs.stop("virtsim")  # SIMULATED controller: migrations stay where they are
    pool.extend_pcr(host, 7, b"rootkit")
    _wait("an evacuation migration", lambda: migrations(host), timeout=30, every=0.05)
    pool.kill_replica(pool.replica_index(leader))
    _wait(
        "a new leader",
        lambda: (n := pool.leader()) not in (None, leader) and n,
        timeout=TIMINGS.failover_bound() + SLACK + 10,
    )
    time.sleep(5)  # the new leader plans the evacuation again
    pool.start_virtsim()
    _wait(
        "every VM off the tampered member",
        lambda: all(node and node != host for node in placements().values()),
        timeout=60,
    )
    per_vmi: dict[str, int] = {}
    for m in migrations(host):
        per_vmi[m["spec"]["vmiName"]] = per_vmi.get(m["spec"]["vmiName"], 0) + 1
    assert per_vmi == dict.fromkeys(on_host, 1)
    pool.start_replica(pool.replica_index(leader), wait=60)
