"""Prometheus metrics of the operator (`/metrics`).

Members by phase and level are computed at scrape time from the operator's view (a custom
collector, no counters sprinkled around); attestation outcomes and verification latency
are counted where verification happens. Names and labels are documented in
docs/metrics.md.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gtvp.core.errors import ALL_REASONS


class _MemberCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily(
            "gtvp_members", "Members by phase and effective level", labels=["phase", "level"]
        )
        counts: dict[tuple[str, str], int] = {}
        for phase, level in self.m.members.values():
            key = (phase, str(level))
            counts[key] = counts.get(key, 0) + 1
        for (phase_label, level_label), n in sorted(counts.items()):
            g.add_metric([phase_label, level_label], n)
        yield g


class _BoxCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily("gtvp_lazyboxes", "Lazy Boxes by phase", labels=["phase"])
        counts: dict[str, int] = {}
        for phase in self.m.boxes.values():
            counts[phase] = counts.get(phase, 0) + 1
        for phase, n in sorted(counts.items()):
            g.add_metric([phase], n)
        yield g


class Metrics:
    """The operator's metrics, registered in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.members: dict[str, tuple[str, int]] = {}
        self.boxes: dict[str, str] = {}
        self._attestation_metrics()
        self._admission_and_migration_metrics()
        self._lazybox_metrics()
        self._coordination_metrics()
        self.registry.register(_MemberCollector(self))
        self.registry.register(_BoxCollector(self))

    def _attestation_metrics(self) -> None:
        self.attestations = Counter(
            "gtvp_attestations",
            "Evidence judged by the verifier, by result and reason",
            ["result", "reason"],
            registry=self.registry,
        )
        self.verification_seconds = Histogram(
            "gtvp_verification_seconds",
            "Time to verify one member's evidence",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        for reason in ALL_REASONS:  # every reason is visible from the start, at 0
            self.attestations.labels("failed", reason)
        self.attestations.labels("verified", "QuoteVerified")

    def _admission_and_migration_metrics(self) -> None:
        self.admissions = Counter(
            "gtvp_admission_decisions",
            "Admission decisions by kind and outcome",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self.evacuations = Counter(
            "gtvp_evacuation_migrations",
            "Evacuation migrations by state (started, finished, aborted)",
            ["state"],
            registry=self.registry,
        )
        self.drain_migrations = Counter(
            "gtvp_drain_migrations",
            "Live migrations gtvp started for drained nodes (evacuationNodeName, External), "
            "by state (started, finished)",
            ["state"],
            registry=self.registry,
        )
        self.drain_waiting = Gauge(
            "gtvp_drain_waiting",
            "VMIs of a node being drained that no Trusted, schedulable member can take yet",
            registry=self.registry,
        )

    def _lazybox_metrics(self) -> None:
        self.components = Counter(
            "gtvp_component_verifications",
            "OSComponent verifications by result and reason",
            ["result", "reason"],
            registry=self.registry,
        )
        self.placements = Counter(
            "gtvp_lazybox_placements",
            "Lazy Box placement decisions by outcome (placed, pending)",
            ["outcome"],
            registry=self.registry,
        )
        self.placement_cached_ratio = Histogram(
            "gtvp_lazybox_placement_cached_ratio",
            "Share of a placed box's component bytes already cached on the chosen member",
            buckets=(0.0, 0.25, 0.5, 0.75, 0.9, 1.0),
            registry=self.registry,
        )
        self.balancing_moves = Counter(
            "gtvp_balancing_migrations",
            "Live migrations the balancer started to relieve overloaded members",
            registry=self.registry,
        )
        self.overloaded = Gauge(
            "gtvp_members_overloaded",
            "Trusted members above the policy's high watermark (balancing.highWatermark)",
            registry=self.registry,
        )

    def _coordination_metrics(self) -> None:
        self.shards_held = Gauge(
            "gtvp_shards_held",
            "Member shards this replica writes for (challenges, verdicts, Node labels)",
            registry=self.registry,
        )
        self.leader = Gauge(
            "gtvp_leader",
            "1 on the replica running the singleton loops (evacuation, boxes, balancing, "
            "drains), else 0",
            registry=self.registry,
        )
        self.lease_renewal_failures = Counter(
            "gtvp_lease_renewal_failures",
            "Presence Lease renewals that failed (past the renew deadline the replica "
            "writes nothing and reports unready)",
            registry=self.registry,
        )

    def observe_attestation(self, outcome: str, seconds: float) -> None:
        if outcome == "Verified":
            self.attestations.labels("verified", "QuoteVerified").inc()
        else:
            self.attestations.labels("failed", outcome).inc()
        self.verification_seconds.observe(seconds)

    def admission(self, kind: str, outcome: str) -> None:
        self.admissions.labels(kind, outcome).inc()

    def evacuation(self, state: str) -> None:
        self.evacuations.labels(state).inc()

    def set_coordination(self, shards: int, leading: bool) -> None:
        self.shards_held.set(shards)
        self.leader.set(1 if leading else 0)

    def lease_renewal_failed(self) -> None:
        self.lease_renewal_failures.inc()

    def set_member(self, name: str, phase: str, level: int) -> None:
        self.members[name] = (phase, level)

    def forget_member(self, name: str) -> None:
        self.members.pop(name, None)


METRICS = Metrics()
