"""Benchmark: gtvp's balancer against the real Kubernetes descheduler on recorded load traces.

Run: `python -m tests.bench.bench_balance_trace [--trace synthetic|day|all] [--seeds 7,1,3]
[--interval 10]` (`--seeds`: the `day` trace drawn with each seed, one replay pair each).

Real: kube-apiserver + etcd with KubeVirt's CRDs, the Kubernetes descheduler v0.36.0 built
from its Go module (`toolchain.descheduler()`), run as a process every `--interval` seconds
with LowNodeUtilization on cpu, memory and pods (`gtvp_local.trace_descheduler`: under the
low watermark a target, over the high one a source, `EvictionsInBackground` on as KubeVirt
asks). SIMULATED: KubeVirt (the stand-in, `gtvp_local.virtsim` in phases mode, with a
virt-launcher pod per VMI and virt-api's eviction webhook, `gtvp_local.launcherpods`; it
places VMIs and migration targets as kube-scheduler would, `launcherpods.NodeLoad`: where
the requests fit, least allocated first, each decision counted before the next), and
the members: plain Node objects with allocatable room, Ready as written (no kwok, no
kubelet), labelled Trusted (gtvp's trust labels) from the start or, for a member that
joins, `trust_after` seconds after it joins (as attestation would); a member that leaves is
cordoned and drained (the stand-in evacuates its LiveMigrate VMIs in both runs).

gtvp's side runs gtvp's balancing planner (`gtvp.core.balance.plan_balance`, the function
the operator runs every 5 s) every 2 s from the API server's objects, every VMI counted as a
box of level 1, and creates the migrations it returns as the operator would; the operator's
admission webhooks, attestation and pre-fetch are not running (no Members, no components:
no component bytes move in phases mode, so bytes moved are the moved VMs' memory).

Each trace is replayed twice on fresh Nodes: gtvp's balancer alone, then the descheduler
alone. Measured from the API server: migrations started (balancing ones; evacuations of a
leaving member counted apart), migrations that could not reach a Trusted member (Failed, or
never scheduled), for each overload episode the seconds from the event that began it until
every present member stays at or under the high watermark (sampled every 0.5 s; an episode
open at the end did not converge), VMs moved twice within the cool-down,
bytes moved. Baseline: `gtvp_local.trace.hindsight`, the fewest migrations that keep every
member under the high watermark knowing the whole trace. Times are compressed (seconds for
minutes): sustainFor 4 s, cool-down 60 s.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gtvp.core.balance import BALANCE_LABEL, PlacedBox, plan_balance
from gtvp.core.evacuation import HOSTNAME_LABEL, migration_view
from gtvp.core.phases import MemberPhase
from gtvp.core.placement import Host
from gtvp.core.policy import Balancing, MigrationLimits
from gtvp.core.quantity import cpu_millis, memory_bytes
from gtvp.core.trust import TRUSTED_LABEL, trust_selector
from gtvp_local import toolchain, trace_descheduler
from gtvp_local.controlplane import ControlPlane, ephemeral_control_plane
from gtvp_local.launcherpods import EvictionWebhook, LauncherPods
from gtvp_local.trace import GI, Event, Trace, day, hindsight, synthetic
from gtvp_local.virtsim import EVACUATION_ANNOTATION, VirtSim

KV = ("kubevirt.io", "v1")
POOL_LABEL = "gtvp.io/bench-pool"
HIGH, LOW = 85, 60
SUSTAIN = dt.timedelta(seconds=4)
COOLDOWN = dt.timedelta(seconds=60)
GTVP_PERIOD = 2.0
SAMPLE = 0.5


@dataclass
class Result:
    system: str
    migrations: int = 0
    evacuations: int = 0
    refused: int = 0
    converge: list[float] = field(default_factory=list)
    unconverged: int = 0
    moved_twice: int = 0
    bytes_moved: int = 0
    moves: list[str] = field(default_factory=list)  # "vm source>target phase", for the log


class Clients:
    def __init__(self, cp: ControlPlane) -> None:
        from kubernetes import client, config

        api_client = config.new_client_from_config(config_file=str(cp.admin_kubeconfig))
        self.api = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)


def _vmi(e: Event, pool: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": e.vm},
        "spec": {
            "evictionStrategy": "LiveMigrate",
            "nodeSelector": {POOL_LABEL: pool, **trust_selector(1)},
            "affinity": {
                "nodeAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {
                            "weight": 100,
                            "preference": {
                                "matchExpressions": [
                                    {
                                        "key": HOSTNAME_LABEL,
                                        "operator": "In",
                                        "values": [f"{pool}-{e.member}"],
                                    }
                                ]
                            },
                        }
                    ]
                }
            },
            "domain": {
                "devices": {},
                "resources": {
                    "requests": {
                        "cpu": f"{e.cpu_millis}m",
                        "memory": str(e.memory_bytes),
                    }
                },
            },
        },
    }


def _add_node(c: Clients, t: Trace, pool: str, member: str, *, trusted: bool) -> None:
    name = f"{pool}-{member}"
    labels = {POOL_LABEL: pool, HOSTNAME_LABEL: name}
    if trusted:
        labels.update(trust_selector(1))
    room = {"cpu": f"{t.cpu_millis}m", "memory": str(t.memory_bytes), "pods": "110"}
    c.core.create_node({"metadata": {"name": name, "labels": labels}})
    c.core.patch_node_status(
        name,
        {
            "status": {
                "allocatable": room,
                "capacity": room,
                "conditions": [{"type": "Ready", "status": "True", "reason": "Bench"}],
            }
        },
    )


class Replay:
    """One replay of a trace on fresh Nodes and a fresh namespace."""

    def __init__(self, c: Clients, t: Trace, system: str) -> None:
        self.c, self.t, self.system = c, t, system
        self.pool = f"b{uuid.uuid4().hex[:6]}"
        self.ns = self.pool
        self.left: dict[str, float] = {}  # node -> when it left (seconds into the trace)
        self.present = {f"{self.pool}-{m}" for m in t.members}
        self.samples: list[tuple[float, float]] = []  # (seconds, highest member load)
        self.over_since: dict[str, dt.datetime] = {}
        self.t0 = 0.0

    # -- the pool's objects -------------------------------------------------------------
    def setup(self) -> None:
        self.c.core.create_namespace({"metadata": {"name": self.ns}})
        for m in self.t.members:
            _add_node(self.c, self.t, self.pool, m, trusted=True)

    def teardown(self) -> None:
        from kubernetes.client.rest import ApiException

        for v in self._vmis():
            with contextlib.suppress(ApiException):
                self.c.api.delete_namespaced_custom_object(
                    *KV, self.ns, "virtualmachineinstances", v["metadata"]["name"]
                )
        time.sleep(2.0)  # the stand-in deletes the pods
        for n in self._nodes():
            self.c.core.delete_node(n["metadata"]["name"])

    def _vmis(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.c.api.list_namespaced_custom_object(
            *KV, self.ns, "virtualmachineinstances"
        )["items"]
        return items

    def _migrations(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.c.api.list_namespaced_custom_object(
            *KV, self.ns, "virtualmachineinstancemigrations"
        )["items"]
        return items

    def _nodes(self) -> list[dict[str, Any]]:
        return [
            n.to_dict()
            for n in self.c.core.list_node(label_selector=f"{POOL_LABEL}={self.pool}").items
        ]

    def apply(self, e: Event) -> None:
        if e.kind == "create":
            self.c.api.create_namespaced_custom_object(
                *KV, self.ns, "virtualmachineinstances", _vmi(e, self.pool)
            )
        elif e.kind == "delete":
            self.c.api.delete_namespaced_custom_object(
                *KV, self.ns, "virtualmachineinstances", e.vm
            )
        elif e.kind == "join":
            _add_node(self.c, self.t, self.pool, e.member, trusted=False)
            self.present.add(f"{self.pool}-{e.member}")
            name = f"{self.pool}-{e.member}"
            threading.Timer(
                self.t.trust_after,
                lambda: self.c.core.patch_node(name, {"metadata": {"labels": trust_selector(1)}}),
            ).start()
        elif e.kind == "leave":
            name = f"{self.pool}-{e.member}"
            self.c.core.patch_node(name, {"spec": {"unschedulable": True}})  # drained
            self.left[name] = e.at
            self.present.discard(name)

    # -- loads -----------------------------------------------------------------------------
    def loads(self) -> dict[str, float]:
        """Each present member's load (the larger of CPU and memory commitment)."""
        used: dict[str, list[int]] = {n: [0, 0] for n in self.present}
        for v in self._vmis():
            node = (v.get("status") or {}).get("nodeName")
            if node in used:
                cpu, mem = _requests(v)
                used[node][0] += cpu
                used[node][1] += mem
        return {
            n: max(c / self.t.cpu_millis, m / self.t.memory_bytes) for n, (c, m) in used.items()
        }

    # -- gtvp's balancer -------------------------------------------------------------------
    def gtvp_round(self) -> None:
        now = dt.datetime.now(dt.UTC)
        # migrations before VMIs: one that ends between the two reads then shows its VMI on
        # the target already, never still at its source with the migration finished
        migrations = self._migrations()
        nodes, vmis = self._nodes(), self._vmis()
        boxes, used = [], {n["metadata"]["name"]: [0, 0] for n in nodes}
        for v in vmis:
            status = v.get("status") or {}
            node = status.get("nodeName")
            if status.get("phase") != "Running" or node not in used:
                continue
            cpu, mem = _requests(v)
            used[node][0] += cpu
            used[node][1] += mem
            boxes.append(PlacedBox(self.ns, v["metadata"]["name"], str(node), 1, cpu, mem))
        hosts = []
        for n in nodes:
            name = n["metadata"]["name"]
            trusted = (n["metadata"].get("labels") or {}).get(TRUSTED_LABEL)
            cordoned = bool((n.get("spec") or {}).get("unschedulable"))
            alloc = (n.get("status") or {}).get("allocatable") or {}
            hosts.append(
                Host(
                    name=name,
                    usable=bool(trusted) and not cordoned,
                    phase=MemberPhase.TRUSTED if trusted else MemberPhase.PENDING,
                    level=1 if trusted else 0,
                    cpu_millis=cpu_millis(alloc.get("cpu", "0")),
                    memory_bytes=memory_bytes(alloc.get("memory", "0")),
                    cpu_used=used[name][0],
                    memory_used=used[name][1],
                    images=frozenset(),
                )
            )
        last: dict[tuple[str, str], dt.datetime] = {}
        for m in migrations:
            if BALANCE_LABEL in (m["metadata"].get("labels") or {}):
                at = dt.datetime.fromisoformat(m["metadata"]["creationTimestamp"])
                key = (self.ns, m["spec"]["vmiName"])
                last[key] = max(at, last.get(key, at))
        plan = plan_balance(
            hosts=hosts,
            boxes=boxes,
            migrations=[migration_view(m) for m in migrations],
            last_moved=last,
            over_since=self.over_since,
            settings=Balancing(True, HIGH, LOW, SUSTAIN, COOLDOWN),
            limits=MigrationLimits(),
            now=now,
        )
        self.over_since = plan.over_since
        for move in plan.moves:
            self.c.api.create_namespaced_custom_object(
                *KV, self.ns, "virtualmachineinstancemigrations", move.migration
            )

    # -- the run ---------------------------------------------------------------------------
    def run(self, descheduler: Path | None, interval: float, workdir: Path) -> Result:
        self.setup()
        proc = None
        stop = threading.Event()
        if descheduler is not None:
            body = trace_descheduler.policy(
                f"{POOL_LABEL}={self.pool}", trace_descheduler.Thresholds(LOW, HIGH)
            )
            policy = trace_descheduler.write_policy(workdir / self.pool, body)
            log = (workdir / f"{self.pool}-descheduler.log").open("w")
            proc = subprocess.Popen(
                trace_descheduler.command(
                    descheduler, self.c_kubeconfig, policy, interval_s=interval
                ),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.t0 = time.monotonic()
        loops = [threading.Thread(target=self._sample, args=(stop,), daemon=True)]
        if descheduler is None:
            loops.append(threading.Thread(target=self._balance, args=(stop,), daemon=True))
        for th in loops:
            th.start()
        try:
            for e in self.t.events:
                _sleep_until(self.t0 + e.at)
                self.apply(e)
            _sleep_until(self.t0 + self.t.duration)
        finally:
            stop.set()
            for th in loops:
                th.join(5)
            if proc is not None:
                proc.terminate()
                proc.wait(10)
        result = self.measure()
        self.teardown()
        return result

    c_kubeconfig: Path = Path()

    def _balance(self, stop: threading.Event) -> None:
        while not stop.wait(GTVP_PERIOD):
            try:
                self.gtvp_round()
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                print(f"  gtvp round failed: {exc}", file=sys.stderr)

    def _sample(self, stop: threading.Event) -> None:
        while not stop.wait(SAMPLE):
            try:
                loads = self.loads()
            except Exception:  # noqa: BLE001, S112 - a missed sample
                continue
            self.samples.append((time.monotonic() - self.t0, max(loads.values(), default=0.0)))

    def measure(self) -> Result:
        r = Result(self.system)
        size = {e.vm: e.memory_bytes for e in self.t.events if e.kind == "create"}
        starts: dict[str, list[float]] = {}
        for m in self._migrations():
            meta, status = m["metadata"], m.get("status") or {}
            node = (meta.get("annotations") or {}).get(EVACUATION_ANNOTATION)
            at = dt.datetime.fromisoformat(meta["creationTimestamp"]).timestamp()
            if node in self.left:
                r.evacuations += 1
                continue
            r.migrations += 1
            phase = status.get("phase")
            state = status.get("migrationState") or {}
            r.moves.append(f"{m['spec']['vmiName']} {state.get('sourceNode', '?')}>"
                           f"{state.get('targetNode', '?')} {phase}")  # fmt: skip
            unscheduled = phase in (None, "", "Pending", "Scheduling") and time.time() - at > 10
            if phase == "Failed" or unscheduled:  # no Trusted member took it
                r.refused += 1
            if phase == "Succeeded":
                r.bytes_moved += size.get(m["spec"]["vmiName"], 0)
            starts.setdefault(m["spec"]["vmiName"], []).append(at)
        for times in starts.values():
            times.sort()
            if any(b - a < COOLDOWN.total_seconds() for a, b in itertools.pairwise(times)):
                r.moved_twice += 1
        self._convergence(r)
        return r

    def _convergence(self, r: Result) -> None:
        """Overload episodes: from the disturbing event (a VM created, a member joining or
        leaving) at or before the first sample above the high watermark, until the first
        sample from which every member stays at or under it for 2 s; an episode still open
        when the trace ends did not converge."""
        marks = sorted({e.at for e in self.t.events if e.disturbs})
        start: float | None = None
        calm: float | None = None
        for s, v in self.samples:
            if v > HIGH / 100:
                if start is None:
                    start = max((m for m in marks if m <= s), default=0.0)
                calm = None
            elif start is not None:
                calm = s if calm is None else calm
                if s - calm >= 2.0:
                    r.converge.append(calm - start)
                    start = calm = None
        if start is not None:
            r.unconverged += 1


def _requests(v: dict[str, Any]) -> tuple[int, int]:
    req = (((v.get("spec") or {}).get("domain") or {}).get("resources") or {}).get("requests") or {}
    return cpu_millis(req.get("cpu", "0")), memory_bytes(req.get("memory", "0"))


def _sleep_until(at: float) -> None:
    while (left := at - time.monotonic()) > 0:
        time.sleep(min(left, 0.5))


def _standin(c: Clients, workdir: Path) -> tuple[EvictionWebhook, Callable[[], None]]:
    webhook = EvictionWebhook(c.api, c.core, workdir / "virt-api-pki")
    webhook.start()
    sim = VirtSim(c.api, c.core, step_delay=0.3, pods=LauncherPods(c.core))
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(0.25):
            try:
                sim.tick()
            except Exception as exc:  # noqa: BLE001 - as the stand-in's own loop
                print(f"  stand-in tick failed: {exc}", file=sys.stderr)

    threading.Thread(target=loop, daemon=True).start()
    return webhook, stop.set


def _row(r: Result, base: int) -> str:
    conv = f"{statistics.median(r.converge):.1f} / {max(r.converge):.1f}" if r.converge else "-"
    ratio = f"{r.migrations / base:.2f}x" if base else "-"
    return (
        f"| {r.system} | {r.migrations} ({ratio}) | {r.refused} | {conv} | {r.unconverged} | "
        f"{r.moved_twice} | {r.bytes_moved / GI:.0f} GiB | {r.evacuations} |"
    )


def run(traces: list[Trace], interval: float) -> int:
    binary = toolchain.descheduler()
    totals: dict[str, Result] = {}
    with tempfile.TemporaryDirectory(prefix="gtvp-bench-balance-") as tmp:
        workdir = Path(tmp)
        with ephemeral_control_plane(workdir / "cp") as cp:
            c = Clients(cp)
            webhook, stop = _standin(c, workdir)
            try:
                for t in traces:
                    base = hindsight(t, high=HIGH / 100, sustain_for=SUSTAIN.total_seconds())
                    results = []
                    for system in ("gtvp", "descheduler"):
                        print(f"[{t.name}] replaying with {system} ({t.duration:.0f} s)",
                              file=sys.stderr, flush=True)  # fmt: skip
                        replay = Replay(c, t, system)
                        replay.c_kubeconfig = cp.admin_kubeconfig
                        results.append(
                            replay.run(binary if system == "descheduler" else None, interval,
                                       workdir)
                        )  # fmt: skip
                        print(f"  moves: {', '.join(sorted(results[-1].moves)) or 'none'}",
                              file=sys.stderr, flush=True)  # fmt: skip
                    _print(t, base.migrations, base.bytes_moved, results, interval)
                    for r in results:
                        _add(totals.setdefault(r.system, Result(r.system)), r)
            finally:
                stop()
                webhook.stop()
    if len(traces) > 1:
        _print_totals(len(traces), totals["gtvp"], totals["descheduler"])
    return 0


def _add(into: Result, r: Result) -> None:
    into.migrations += r.migrations
    into.evacuations += r.evacuations
    into.refused += r.refused
    into.moved_twice += r.moved_twice
    into.unconverged += r.unconverged
    into.bytes_moved += r.bytes_moved
    into.converge += r.converge


def _print_totals(n: int, gtvp: Result, desch: Result) -> None:
    """Over every trace replayed: balancing migrations, and every migration started (with
    the evacuations of leaving members, whose number depends on where balancing sent VMs)."""
    print(f"\n### all {n} traces")
    print("| system | balancing migrations | bytes | + evacuations = migrations started |")
    print("| --- | --- | --- | --- |")
    for r in (gtvp, desch):
        print(
            f"| {r.system} | {r.migrations} | {r.bytes_moved / GI:.0f} GiB | "
            f"{r.migrations + r.evacuations} |"
        )


def _print(t: Trace, base: int, base_bytes: int, results: list[Result], interval: float) -> None:
    gtvp, desch = results
    print(
        f"\n### trace `{t.name}` ({len(t.events)} events, {t.duration:.0f} s; hindsight "
        f"minimum {base} migrations, {base_bytes / GI:.0f} GiB; descheduler every {interval:g} s)"
    )
    print(
        "| system | migrations (x hindsight) | trust-refused | converge s median / max | "
        "not converged | moved twice in cool-down | bytes moved | evacuations |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(_row(r, base))

    def ratio(a: int, b: int) -> str:
        return f"{a / b:.2f}" if b else "-"

    def met(ok: bool) -> str:
        return "met" if ok else "MISSED"

    fewer = gtvp.migrations < desch.migrations and gtvp.bytes_moved < desch.bytes_moved
    print(
        f"gtvp/descheduler: migrations {ratio(gtvp.migrations, desch.migrations)}, bytes "
        f"{ratio(gtvp.bytes_moved, desch.bytes_moved)}; targets: gtvp <= 1.2x hindsight "
        f"({met(gtvp.migrations <= 1.2 * base)}), no VM moved twice in the cool-down "
        f"({met(gtvp.moved_twice == 0)}), fewer migrations and bytes than the descheduler "
        f"({met(fewer)}), zero trust-refused ({met(gtvp.refused == 0)})"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--trace", choices=("synthetic", "day", "all"), default="all")
    p.add_argument("--seeds", default="7", help="the day trace's seeds, comma-separated")
    p.add_argument("--interval", type=float, default=10.0, help="descheduler interval (s)")
    args = p.parse_args(argv)
    days = [day(int(seed)) for seed in args.seeds.split(",")]
    traces = {"synthetic": [synthetic()], "day": days, "all": [synthetic(), *days]}
    return run(traces[args.trace], args.interval)


if __name__ == "__main__":
    sys.exit(main())
