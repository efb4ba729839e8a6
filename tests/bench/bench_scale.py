"""Benchmark: the operator at 1,000 (and 10,000) members, interval 60 s.

Run: `python -m tests.bench.bench_scale --members 1000 [--cycles 3 --interval 60 --real 8]`.
Members are simulated at the API level by a load generator: one watch on every Member, and
for each member gtvp-agent's own decision code (`gtvp_agent.agent.Agent`, fed by that
watch instead of a watch of its own) over a TPM. `--real` members (8 by default) quote
with a real swtpm each; every other member holds its keys in software (`tests/softtpm.py`:
an ECC P-256 EK certified by a software CA, an AK under it, ActivateCredential and
TPM2_Quote implemented in software). The operator cannot tell them apart: each member has
an EK of its own (`allowSharedEk` stays off), enrols through the same path (EK certificate
path to the policy's bundle, which holds the pool's swtpm CA and, for this run only, the
software CA; credential activation; quotes), and writes what the agent writes, in the same
format. Everything else is real: the API server, etcd, the operator process(es).

Reported: evidence-to-verdict latency (the load generator's evidence write until it sees the
verdict for that nonce) p50/p99; operator CPU (cores, over the measured cycles, every
operator process) and peak RSS (per process); Member status writes per member per cycle
(per verdict), counted at the API server (`apiserver_request_total`), against the design's
3 (the operator publishes each nonce when its quote is due, the agent answers, the operator
writes the verdict); also per member per interval, which is a little higher because the
jittered schedule quotes up to 10 % early. Baseline, same run: the load generator's evidence
write until its own watch delivers that write back (the API server's floor for any round
trip), as a ratio to evidence-to-verdict. Also printed: the load average before and after,
and the CPU the load generator, the API server and etcd took in the window, since all of
them share this machine with the operator.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import os
import queue
import ssl
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

from gtvp_agent.agent import Agent, AgentConfig
from gtvp_agent.tpm import Enrolment, LoadedKeys, Quote, Tpm
from gtvp_local.controlplane import ControlPlane, ephemeral_control_plane
from gtvp_local.pool import Pool, pool_policy
from gtvp_local.replicas import LeaseTimings
from tests.softtpm import SoftCA, SoftTpm

G, V, P = "gtvp.io", "v1alpha1", "members"


def _api(pool: Pool) -> Any:
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=str(pool.cp.admin_kubeconfig))
    api.configuration.connection_pool_maxsize = 32
    return client.CustomObjectsApi(api)


def _patch_count(cp: ControlPlane) -> float:
    ctx = ssl.create_default_context(cafile=str(cp.pki_dir / "ca.crt"))
    users = cp.pki_dir / "users"
    ctx.load_cert_chain(str(users / "admin.crt"), str(users / "admin.key"))
    with urllib.request.urlopen(f"{cp.server}/metrics", context=ctx, timeout=10) as r:  # noqa: S310
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if (
            line.startswith("apiserver_request_total{")
            and 'resource="members"' in line
            and 'subresource="status"' in line
            and ('verb="PATCH"' in line or 'verb="UPDATE"' in line)
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _member_sizes(api: Any, sample: int = 50) -> tuple[float, float]:
    """Mean size in KiB of a Member as the API server serves it (JSON), and of its
    metadata.managedFields, over the first `sample` members: what every write and every
    watch event carries."""
    items = api.list_cluster_custom_object(G, V, P, limit=sample)["items"]
    whole = sum(len(json.dumps(i, separators=(",", ":"))) for i in items)
    managed = sum(
        len(json.dumps(i["metadata"].get("managedFields") or [], separators=(",", ":")))
        for i in items
    )
    n = max(len(items), 1)
    return whole / n / 1024, managed / n / 1024


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0.0
    for line in lines:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


class _OpenTpm:
    """A real TPM as the agent's code uses it, its EK and AK loaded once (a `Tpm.session`)."""

    def __init__(self, enrolment: Enrolment, keys: LoadedKeys) -> None:
        self._enrolment = enrolment
        self._keys = keys

    def enrolment(self) -> Enrolment:
        return self._enrolment

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        return self._keys.activate_credential(credential_blob, encrypted_secret)

    def quote(self, nonce: bytes, bank: str, pcrs: list[int]) -> Quote:
        return self._keys.quote(nonce, bank, pcrs)


class SimulatedAgent(Agent):
    """gtvp-agent for one member, fed by the load generator's watch: `_get` returns the
    latest body the shared watch delivered, and every write goes through the agent's own
    `_patch` (with the API client of the worker thread that runs the step)."""

    def __init__(self, lg: LoadGenerator, name: str, tpm: object) -> None:
        config = AgentConfig(
            node=name, tcti="loadgen", state_dir=Path("/nonexistent"), event_log=None
        )
        super().__init__(api=None, config=config, tpm_opener=self._tpm)
        self.lg = lg
        self.tpm = tpm
        self.body: Mapping[str, Any] | None = None

    @contextlib.contextmanager
    def _tpm(self) -> Iterator[Tpm]:
        yield cast(Tpm, self.tpm)

    def _get(self) -> Mapping[str, Any] | None:
        return self.body

    def _patch(self, agent_part: dict[str, Any]) -> None:
        evidence = agent_part.get("evidence")
        if evidence:  # the clock starts as the write is sent (conservative: the watch may
            self.lg.sending(str(evidence["nonce"]))  # deliver the verdict before it returns)
        super()._patch(agent_part)


class LoadGenerator:
    """Every member's agent: `real` of them over a swtpm each, the others over a SoftTpm."""

    def __init__(self, pool: Pool, real: int, soft_workers: int = 4) -> None:
        self.pool = pool
        self.real = real
        self.soft_workers = soft_workers
        self.ca = SoftCA()
        self.agents: dict[str, SimulatedAgent] = {}
        self.real_queues: dict[str, queue.Queue[str]] = {}
        self.soft_queue: queue.Queue[str] = queue.Queue()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self._waiting: set[str] = set()  # queued, not yet taken by a worker
        self._running: set[str] = set()
        self._again: set[str] = set()  # woken while running: step once more
        self._due: list[tuple[float, str]] = []
        self.sent: dict[str, float] = {}  # nonce -> time evidence was written
        self.latencies: list[float] = []
        self.echoes: list[float] = []  # evidence write until the watch delivers it back
        self._echoed: set[str] = set()
        self.phases: dict[str, str] = {}  # every member's phase, from the watch
        self.errors = 0

    def tpm_name(self, i: int) -> str:
        return f"tpm{i}"

    def add(self, name: str, index: int) -> None:
        """The agent of member `name`; the first `real` members get a swtpm each."""
        if index < self.real:
            agent = SimulatedAgent(self, name, None)  # its TPM is opened by its worker
            self.real_queues[name] = queue.Queue()
        else:
            agent = SimulatedAgent(self, name, SoftTpm(self.ca, model="gtvp-bench"))
        self.agents[name] = agent

    def trusted(self) -> int:
        return sum(1 for p in list(self.phases.values()) if p == "Trusted")

    # ----- the workers ----------------------------------------------------------------------
    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        threads = [
            threading.Thread(target=self._real_worker, args=(i, name), daemon=True)
            for i, name in enumerate(self.real_queues)
        ]
        threads += [
            threading.Thread(target=self._soft_worker, daemon=True)
            for _ in range(self.soft_workers)
        ]
        for t in threads:
            t.start()
        try:
            yield
        finally:
            self.stop.set()
            for t in threads:
                t.join(timeout=10)

    def _real_worker(self, i: int, name: str) -> None:
        api = _api(self.pool)
        swtpm = self.pool.tpm(self.tpm_name(i))
        state = self.pool.dir / "lg" / name
        with Tpm.open(swtpm.tcti, state) as t:
            enrolment = t.enrolment()
            with t.session() as keys:
                self.agents[name].tpm = _OpenTpm(enrolment, keys)
                self._serve(self.real_queues[name], api)

    def _soft_worker(self) -> None:
        self._serve(self.soft_queue, _api(self.pool))

    def _serve(self, work: queue.Queue[str], api: Any) -> None:
        while not self.stop.is_set():
            try:
                name = work.get(timeout=0.2)
            except queue.Empty:
                continue
            with self.lock:
                self._waiting.discard(name)
                if name in self._running:
                    self._again.add(name)
                    continue
                self._running.add(name)
            agent = self.agents[name]
            agent.api = api
            try:
                wait = agent.step()
            except Exception:  # noqa: BLE001 - an API hiccup: the agent tries again shortly
                self.errors += 1
                wait = 2.0
            with self.lock:
                self._running.discard(name)
                again = name in self._again
                self._again.discard(name)
                # as gtvp-agent does: step again after `wait` (its watch times out) whether
                # or not anything changes meanwhile
                heapq.heappush(self._due, (time.time() + wait, name))
            if again:
                self.wake(name)

    def wake(self, name: str) -> None:
        with self.lock:
            if name in self._waiting:
                return
            self._waiting.add(name)
        self.real_queues.get(name, self.soft_queue).put(name)

    def release(self) -> None:
        """Wake the agents whose next quote is due (answerAfter has passed)."""
        now = time.time()
        due = []
        with self.lock:
            while self._due and self._due[0][0] <= now:
                due.append(heapq.heappop(self._due)[1])
        for name in due:
            self.wake(name)

    # ----- what the watch delivers ----------------------------------------------------------
    def sending(self, nonce: str) -> None:
        with self.lock:
            self.sent[nonce] = time.perf_counter()

    def observe(self, member: Mapping[str, Any]) -> None:
        name = member["metadata"]["name"]
        agent = self.agents.get(name)
        if agent is None:
            return
        agent.body = member
        st = member.get("status") or {}
        self.phases[name] = str(st.get("phase", ""))
        self._measure(st)
        self.wake(name)  # the agent decides whether anything is to be written

    def _measure(self, st: Mapping[str, Any]) -> None:
        ch = st.get("challenge") or {}
        trust = st.get("trust") or {}
        answered = ((st.get("agent") or {}).get("evidence") or {}).get("nonce")
        if not answered:
            return
        if trust.get("verifiedAt") and ch.get("nonce") != answered:
            # a verdict for a nonce we answered: latency
            with self.lock:
                sent = self.sent.pop(answered, None)
            if sent is not None:
                self.latencies.append(time.perf_counter() - sent)
        elif ch.get("nonce") == answered and answered not in self._echoed:
            # our evidence, not yet judged: the baseline (API write -> watch delivery)
            with self.lock:
                sent = self.sent.get(answered)
            if sent is not None:
                self._echoed.add(answered)
                self.echoes.append(time.perf_counter() - sent)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))] if s else float("nan")


def create_members(api: Any, lg: LoadGenerator, members: int) -> None:
    """Members at the API level, each with its agent in the load generator (which publishes
    the enrolment from its TPM once its watch sees the Member, as gtvp-agent does)."""

    def create(i: int) -> None:
        name = f"m-{i}"
        lg.add(name, i)
        api.create_cluster_custom_object(
            G,
            V,
            P,
            {
                "apiVersion": f"{G}/{V}",
                "kind": "Member",
                "metadata": {"name": name},
                "spec": {"identity": 2},
            },
        )

    with ThreadPoolExecutor(8) as ex:
        list(ex.map(create, range(members)))


@contextlib.contextmanager
def load_generator_pool(
    real: int, *, kubevirt: bool, **policy: Any
) -> Iterator[tuple[Pool, LoadGenerator]]:
    """A throwaway control plane and a pool without agents: the load generator answers for
    every member, `real` of them with a swtpm each, the others with software-held keys
    whose CA this run's policy (`pool_policy` with `policy`) trusts beside the pool's swtpm
    CA. Members are created by the caller (`create_members`)."""
    with (
        tempfile.TemporaryDirectory() as d,
        ephemeral_control_plane(Path(d) / "cp", kubevirt=kubevirt) as cp,
    ):
        pool = Pool(cp, Path(d) / "pool")
        try:
            pool.install_access()
            lg = LoadGenerator(pool, real)
            for i in range(real):
                tpm = pool.tpm(lg.tpm_name(i))
                tpm.manufacture(pool.ca.ensure())
                tpm.start()
            obj = pool_policy(pool.ca.ensure(), name=pool.policy_name, **policy)
            # this run's software EK CA, beside the swtpm CA; no other policy ever holds it
            obj["spec"]["ekTrust"]["caBundle"] += lg.ca.bundle_pem()
            pool.put(obj)
            yield pool, lg
        finally:
            pool.stop()


def answer(
    lg: LoadGenerator, api: Any, stop: threading.Event, tick: Callable[[], None] | None = None
) -> None:
    """List Members once, then watch them and hand every change to its agent until `stop`.

    Like an informer: the watch resumes from the last resourceVersion (bookmarks keep it
    fresh) and only an expired one (410) costs a new list, which at 10,000 members is tens
    of megabytes. `tick` runs between watch requests.
    """
    from kubernetes import watch
    from kubernetes.client.exceptions import ApiException

    rv: str | None = None
    while not stop.is_set():
        if rv is None:
            listing = api.list_cluster_custom_object(G, V, P)
            rv = listing["metadata"]["resourceVersion"]
            for obj in listing["items"]:
                lg.observe(obj)
        w = watch.Watch()
        try:
            for ev in w.stream(
                api.list_cluster_custom_object,
                G,
                V,
                P,
                resource_version=rv,
                timeout_seconds=2,
                allow_watch_bookmarks=True,
            ):
                obj = ev["object"]
                rv = obj["metadata"]["resourceVersion"]
                if ev["type"] != "BOOKMARK":
                    lg.observe(obj)
                lg.release()
                if stop.is_set():
                    break
        except ApiException as exc:
            if exc.status == 410:
                rv = None  # too old: list again
        except Exception:  # noqa: BLE001, S110 - a dropped watch resumes from rv
            pass
        lg.release()
        if tick is not None:
            tick()


def _operators(pool: Pool) -> list[int]:
    """The pids of every operator process the pool started (one, or one per replica)."""
    return [t.pid for t in pool.procs.all() if t.name.startswith("operator") and t.alive()]


def _control_plane_pids(cp: ControlPlane) -> list[int]:
    found = (cp.procs.get(n) for n in ("etcd", "kube-apiserver"))
    return [t.pid for t in found if t is not None]


def _gc_pauses(pool: Pool) -> tuple[float, float]:
    """Full (generation 2) collections so far over every replica: their count and their
    summed pause in seconds (`gtvp_gc_pause_seconds`, scraped from each replica's /metrics)."""
    count = total = 0.0
    for replica in pool.replicas:
        url = f"http://127.0.0.1:{replica.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        for line in text.splitlines():
            if line.startswith('gtvp_gc_pause_seconds_count{generation="2"}'):
                count += float(line.split()[-1])
            elif line.startswith('gtvp_gc_pause_seconds_sum{generation="2"}'):
                total += float(line.split()[-1])
    return count, total


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


class _Window:
    """The measured cycles: they start once every member is Trusted and last `seconds`;
    API server write counts and the CPU of every process involved, at both ends."""

    def __init__(self, pool: Pool, lg: LoadGenerator, members: int, seconds: float) -> None:
        self.pool, self.lg, self.members, self.seconds = pool, lg, members, seconds
        self.operators = _operators(pool)
        if not self.operators:
            raise RuntimeError("no operator process runs")
        self.started = time.perf_counter()
        self.ramp_timeout = max(600.0, members * 0.2)  # enrolment, before the window opens
        self.start: dict[str, float] = {}

    def cpu(self) -> dict[str, float]:
        return {
            "operator": sum(_cpu_seconds(p) for p in self.operators),
            "load generator": _cpu_seconds(os.getpid()),
            "etcd+apiserver": sum(_cpu_seconds(p) for p in _control_plane_pids(self.pool.cp)),
        }

    def tick(self, stop: threading.Event) -> None:
        trusted = self.lg.trusted()
        ramp = time.perf_counter() - self.started
        if not self.start and (trusted >= self.members or ramp > self.ramp_timeout):
            print(
                f"  all {self.members} Trusted after {ramp:.0f}s (enrolment included)"
                if trusted >= self.members
                else f"  only {trusted} of {self.members} Trusted after {ramp:.0f}s: the "
                "machine cannot carry this many members at this interval; measuring anyway",
                flush=True,
            )
            self.lg.latencies.clear()
            self.lg.echoes.clear()
            self.start = {"at": time.perf_counter(), "patches": _patch_count(self.pool.cp)}
            self.start["gc:count"], self.start["gc:seconds"] = _gc_pauses(self.pool)
            self.start.update({f"cpu:{k}": v for k, v in self.cpu().items()})
        if self.start and time.perf_counter() >= self.start["at"] + self.seconds:
            stop.set()

    def close(self) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.start["at"]
        gc_count, gc_seconds = _gc_pauses(self.pool)
        return {
            "full_gcs": (gc_count - self.start["gc:count"], gc_seconds - self.start["gc:seconds"]),
            "sizes": _member_sizes(_api(self.pool)),
            "elapsed": elapsed,
            "patches": _patch_count(self.pool.cp) - self.start["patches"],
            "cpu": {k: (v - self.start[f"cpu:{k}"]) / elapsed for k, v in self.cpu().items()},
            "rss": max(_rss_mb(p) for p in self.operators),
            "replicas": len(self.operators),
        }


def run(
    members: int,
    cycles: int,
    real: int = 8,
    interval: int = 60,
    soft_workers: int = 4,
    replicas: int = 1,
) -> dict[str, float]:
    load_before = _load()
    print(f"bench_scale: load average before (1/5/15 min): {load_before}", flush=True)
    with load_generator_pool(
        real,
        kubevirt=False,
        interval=f"{interval}s",
        valid_for=f"{interval * 3}s",
        max_uses=100,
    ) as (pool, lg):
        lg.soft_workers = soft_workers
        # the operator's own lease timing (the chart's), not the local pool's short one
        pool.replica_count, pool.timings = replicas, LeaseTimings(15, 10, 2)
        api = _api(pool)
        started = time.perf_counter()
        create_members(api, lg, members)
        print(
            f"bench_scale: {members} members created in {time.perf_counter() - started:.0f}s "
            f"({min(real, members)} with a swtpm each, {max(members - real, 0)} with "
            "software-held keys)",
            flush=True,
        )
        pool.start_operator()
        window = _Window(pool, lg, members, cycles * interval)
        window.started = started
        stop = threading.Event()
        with lg.running():
            answer(lg, api, stop, lambda: window.tick(stop))
        measured = window.close()
    return _report(
        members=members, interval=interval, lg=lg, loads=(load_before, _load()), **measured
    )


def _report(
    *,
    members: int,
    interval: int,
    elapsed: float,
    patches: float,
    cpu: dict[str, float],
    rss: float,
    replicas: int,
    lg: LoadGenerator,
    loads: tuple[str, str],
    sizes: tuple[float, float],
    full_gcs: tuple[float, float],
) -> dict[str, float]:
    # a cycle is one verdict: members quote up to 10 % early (the jittered schedule), so they
    # complete slightly more cycles than elapsed / interval; count the cycles themselves
    per_member_cycle = patches / max(len(lg.latencies), 1)
    per_member_interval = patches / (members * elapsed / interval)
    result = {
        "p50": pct(lg.latencies, 0.5),
        "p99": pct(lg.latencies, 0.99),
        "cpu": cpu["operator"],
        "rss": rss,
        "writes": per_member_cycle,
        "writes_per_interval": per_member_interval,
        "echo_p50": pct(lg.echoes, 0.5),
        "echo_p99": pct(lg.echoes, 0.99),
    }
    print(f"  members Trusted at the end: {lg.trusted()} of {members}")
    print(
        f"  evidence-to-verdict over {len(lg.latencies)} verdicts: p50 "
        f"{result['p50'] * 1000:.0f} ms, p99 {result['p99'] * 1000:.0f} ms (target p99 < 1 s)"
    )
    print(
        f"  baseline, same run: evidence write until the watch delivers it back, p50 "
        f"{result['echo_p50'] * 1000:.0f} ms, p99 {result['echo_p99'] * 1000:.0f} ms; ratio "
        f"{result['p50'] / result['echo_p50']:.1f}x / {result['p99'] / result['echo_p99']:.1f}x"
    )
    print(
        f"  operator CPU {cpu['operator']:.2f} cores over {replicas} process(es) (target <= 1), "
        f"peak RSS {rss:.0f} MiB (target <= 400 per replica)"
    )
    print(
        f"  Member status writes per member per cycle: {per_member_cycle:.2f} "
        f"(design: 3: the nonce when due, the evidence, the verdict); per member per "
        f"{interval} s interval: "
        f"{per_member_interval:.2f} (cycles per interval: "
        f"{len(lg.latencies) / (members * elapsed / interval):.2f})"
    )
    print(
        f"  full garbage collections in the operator: {full_gcs[0]:.0f}, "
        f"{full_gcs[1] * 1000:.0f} ms of pause in all"
        + (f" ({full_gcs[1] / full_gcs[0] * 1000:.0f} ms each)" if full_gcs[0] else "")
    )
    print(
        f"  a Member as served: {sizes[0]:.1f} KiB of JSON, {sizes[1]:.1f} KiB of it "
        "metadata.managedFields"
    )
    print(
        f"  same machine, same window: load generator {cpu['load generator']:.2f} cores, "
        f"etcd + kube-apiserver {cpu['etcd+apiserver']:.2f} cores; load generator retries: "
        f"{lg.errors}; load average before {loads[0]}, after {loads[1]} ({os.cpu_count()} CPUs)"
    )
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--members", type=int, default=1000)
    p.add_argument("--cycles", type=int, default=2)
    p.add_argument("--interval", type=int, default=60)
    p.add_argument("--real", type=int, default=8, help="members that quote with a swtpm each")
    p.add_argument("--workers", type=int, default=4, help="load generator threads (soft TPMs)")
    p.add_argument(
        "--replicas", type=int, default=1, help="gtvp-operator processes sharing the pool"
    )
    args = p.parse_args(argv)
    run(
        args.members,
        args.cycles,
        real=args.real,
        interval=args.interval,
        soft_workers=args.workers,
        replicas=args.replicas,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
