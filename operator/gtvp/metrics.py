"""Prometheus metrics of the operator (`/metrics`).

Members by phase and level, and each member's verdict expiry, are computed at scrape time
from what this replica reported (custom collectors, no counters sprinkled around);
attestation outcomes and verification latency are counted where verification happens.
Every labelled counter is exported at 0 for each label value it can take from the start,
so that its first occurrence is an increase that `increase()`/`rate()` (and the alerts
built on them) see. No `_created` series; `gtvp_build_info` and the process collector's
`process_*` series sit in the same registry. Names and labels are documented in
docs/metrics.md.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gtvp import __version__
from gtvp.core.boxattest import REASONS as BOX_ATTESTATION_REASONS
from gtvp.core.component_checks import COMPONENT_FAILURE_REASONS, COMPONENT_VERIFIED_REASON
from gtvp.core.errors import ALL_REASONS
from gtvp.core.keyrelease import RESULTS as KEY_RELEASE_RESULTS
from gtvp.core.prefetch import REASONS as PREFETCH_REASONS
from gtvp.core.webhook_callers import REFUSALS as WEBHOOK_REFUSALS

disable_created_metrics()  # type: ignore[no-untyped-call] # a `_created` series per counter doubles the series for nothing

ADMISSION_KINDS = (
    "VirtualMachine",
    "VirtualMachineInstance",
    "VirtualMachineInstanceMigration",
    "SecurityPolicy",
)
"""What the admission webhooks judge (`kind` of gtvp_admission_decisions_total)."""
MUTATED_KINDS = ADMISSION_KINDS[:3]
"""The kinds the mutating webhook sees (outcomes `mutated`, `unchanged`)."""
EVACUATION_STATES = ("started", "finished", "aborted", "cancelled", "preempted")
DRAIN_STATES = ("started", "finished", "cancelled")
PLACEMENT_OUTCOMES = ("placed", "pending")


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
        expiry = GaugeMetricFamily(
            "gtvp_member_verdict_expiry_timestamp_seconds",
            "When each member's current verdict expires (Unix time), reported by the replica "
            "holding its shard; no series for a member without an unexpired verdict",
            labels=["member"],
        )
        for name, expires_at in sorted(self.m.expiries.items()):
            expiry.add_metric([name], expires_at)
        yield expiry


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
        self.expiries: dict[str, float] = {}
        self.boxes: dict[str, str] = {}
        self._process_metrics()
        self._attestation_metrics()
        self._admission_and_migration_metrics()
        self._lazybox_metrics()
        self._coordination_metrics()
        self._key_release_metrics()
        self.registry.register(_MemberCollector(self))
        self.registry.register(_BoxCollector(self))

    def _process_metrics(self) -> None:
        """`gtvp_build_info` and the process collector (`process_cpu_seconds_total`,
        `process_resident_memory_bytes`, open fds, start time)."""
        self.build_info = Info(
            "gtvp_build", "gtvp-operator's version and Python", registry=self.registry
        )
        self.build_info.info({"version": __version__, "python": platform.python_version()})
        ProcessCollector(registry=self.registry)
        self.gc_pause_seconds = Histogram(
            "gtvp_gc_pause_seconds",
            "Time the whole process stood still in Python's cyclic garbage collector, by "
            "generation (2: a full collection over every tracked object)",
            ["generation"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )
        for generation in ("0", "1", "2"):
            self.gc_pause_seconds.labels(generation)

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
        for kind in ADMISSION_KINDS:
            for outcome in ("allowed", "denied"):
                self.admissions.labels(kind, outcome)
        for kind in MUTATED_KINDS:
            for outcome in ("mutated", "unchanged"):
                self.admissions.labels(kind, outcome)
        self.webhook_refusals = Counter(
            "gtvp_webhook_requests_refused",
            "Requests to the webhook port refused before any handler read them, by reason "
            "(caller-not-allowed: a client certificate whose name --webhook-client-name does "
            "not list; unknown-webhook: a path that names no gtvp webhook)",
            ["reason"],
            registry=self.registry,
        )
        for reason in WEBHOOK_REFUSALS:
            self.webhook_refusals.labels(reason)
        self.evacuations = Counter(
            "gtvp_evacuation_migrations",
            "Evacuation migrations by state (started, finished, aborted, cancelled; "
            "preempted: a move a box's own evidence caused, deleted for an evacuation of a "
            "member that lost trust; "
            "stopped-unmovable: a VM that cannot live-migrate stopped instead; "
            "stopped-no-policy: a gated VM stopped because no SecurityPolicy is in force)",
            ["state"],
            registry=self.registry,
        )
        self.deadline_stops = Counter(
            "gtvp_evacuation_deadline_stops",
            "Gated VMs stopped because they were not moved off a member that lost trust "
            "within their level's migrateWithin",
            registry=self.registry,
        )
        self.drain_migrations = Counter(
            "gtvp_drain_migrations",
            "Live migrations gtvp started for drained nodes (evacuationNodeName, External), "
            "by state (started, finished, cancelled: its target was cordoned or lost trust before "
            "KubeVirt scheduled it)",
            ["state"],
            registry=self.registry,
        )
        for state in EVACUATION_STATES:
            self.evacuations.labels(state)
        for state in DRAIN_STATES:
            self.drain_migrations.labels(state)
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
        self.components.labels("verified", COMPONENT_VERIFIED_REASON)
        for reason in COMPONENT_FAILURE_REASONS:
            self.components.labels("failed", reason)
        for outcome in PLACEMENT_OUTCOMES:
            self.placements.labels(outcome)
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
        self._prefetch_metrics()

    def _prefetch_metrics(self) -> None:
        self.prefetch_requests = Counter(
            "gtvp_prefetch_requests",
            "Pre-fetch requests gtvp wrote on a Lazy Box's migration target, by reason "
            "(evacuation, drain, balancing)",
            ["reason"],
            registry=self.registry,
        )
        self.prefetch_bytes = Counter(
            "gtvp_prefetch_bytes",
            "Bytes of a box's components missing on its target when gtvp asked it to fetch "
            "them ahead of the migration, counted when the migration starts, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.prefetch_timeouts = Counter(
            "gtvp_prefetch_timeouts",
            "Migrations started although the target had not fetched every component within "
            "the bound, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.prefetch_wait_seconds = Histogram(
            "gtvp_prefetch_wait_seconds",
            "Time a box's migration waited for its target's pre-fetch, by reason",
            ["reason"],
            buckets=(1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 90.0, 120.0, 180.0, 300.0),
            registry=self.registry,
        )
        for reason in PREFETCH_REASONS:
            self.prefetch_requests.labels(reason)
            self.prefetch_bytes.labels(reason)
            self.prefetch_timeouts.labels(reason)
            self.prefetch_wait_seconds.labels(reason)

    def _key_release_metrics(self) -> None:
        self.key_releases = Counter(
            "gtvp_key_releases",
            "Key-release requests of box VMs (docs/keyrelease.md), by result: released, or "
            "the reason of the refusal",
            ["result"],
            registry=self.registry,
        )
        for result in KEY_RELEASE_RESULTS:
            self.key_releases.labels(result)
        self.box_attestations = Counter(
            "gtvp_box_attestations",
            "Box attestation requests (docs/boxattest.md) by result: Enrolling, Bound, "
            "Verified, a mismatch or a refusal's reason",
            ["result"],
            registry=self.registry,
        )
        for result in ("Enrolling", "Bound", *BOX_ATTESTATION_REASONS):
            self.box_attestations.labels(result)

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

    def webhook_refused(self, reason: str) -> None:
        self.webhook_refusals.labels(reason).inc()

    def evacuation(self, state: str) -> None:
        self.evacuations.labels(state).inc()

    def deadline_stop(self) -> None:
        self.deadline_stops.inc()

    def set_coordination(self, shards: int, leading: bool) -> None:
        self.shards_held.set(shards)
        self.leader.set(1 if leading else 0)

    def lease_renewal_failed(self) -> None:
        self.lease_renewal_failures.inc()

    def set_member(
        self, name: str, phase: str, level: int, expires_at: float | None = None
    ) -> None:
        """What this replica, as the holder of the member's shard, last wrote for it:
        phase, level and when its verdict expires (None: it has no current verdict)."""
        self.members[name] = (phase, level)
        if expires_at is None:
            self.expiries.pop(name, None)
        else:
            self.expiries[name] = expires_at

    def forget_member(self, name: str) -> None:
        """The member is gone, or its shard moved to another replica: no series for it."""
        self.members.pop(name, None)
        self.expiries.pop(name, None)


METRICS = Metrics()
