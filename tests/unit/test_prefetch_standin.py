"""The local pool's stand-in acts on pre-fetch requests like a kubelet pulling a pre-pull
pod's images: only references pinned by a digest, only what the member's cache lacks, and
off its main loop (the launcher's worker threads; here a recorder in its place)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from gtvp.core.prefetch import ANNOTATION
from gtvp_local.virtsim import VirtSim
from gtvp_local.vmruntime import cache

PINNED = "registry.gtvp.local/gtvp-components/linux@sha256:" + "a" * 64
HELD = "registry.gtvp.local/gtvp-components/base@sha256:" + "b" * 64


class _Runtime:
    def __init__(self, state: Path) -> None:
        self.state = state


class _Recorder:
    """Records the fetches the stand-in hands to the launcher's worker threads."""

    def __init__(self, state: Path) -> None:
        self.runtime = _Runtime(state)
        self.asked: list[tuple[str, list[str], str]] = []

    def prefetch(self, member: str, images: list[str], why: str) -> bool:
        self.asked.append((member, list(images), why))
        return True


def _node(name: str, requests: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": name, "annotations": {ANNOTATION: json.dumps(requests)}}}


def _request(*images: str) -> dict[str, Any]:
    return {"images": list(images), "bytes": 1, "requestedAt": "2026-12-02T01:00:00Z",
            "reason": "evacuation"}  # fmt: skip


def test_only_what_the_cache_lacks_is_fetched(tmp_path: Path) -> None:
    d = cache.ensure(tmp_path, "node-2")
    (d / cache.digest_hex(HELD)).write_bytes(b"x")
    (d / f"{cache.digest_hex(HELD)}.json").write_text(json.dumps(cache.Record(HELD, 1).to_json()))
    launcher = _Recorder(tmp_path)
    sim = VirtSim(None, None)
    sim._serve_prefetches(launcher, [_node("node-2", {"apps/web": _request(PINNED, HELD)})])  # type: ignore[arg-type]
    assert launcher.asked == [("node-2", [PINNED], "apps/web")]


def test_a_reference_without_a_digest_is_refused_and_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Attacker: whoever could write the annotation must not make a member fetch a
    mutable tag (the mirror serves by digest; gtvp only ever asks for pinned ones)."""
    launcher = _Recorder(tmp_path)
    sim = VirtSim(None, None)
    nodes = [_node("node-2", {"apps/evil": _request("evil.example.com/miner:latest", PINNED)})]
    with caplog.at_level(logging.WARNING, logger="gtvp.virtsim"):
        for _ in range(3):
            sim._serve_prefetches(launcher, nodes)  # type: ignore[arg-type]
    assert launcher.asked == []
    refused = [r for r in caplog.records if "pre-fetch for apps/evil refused" in r.getMessage()]
    assert len(refused) == 1
    assert "pins no sha256 digest" in refused[0].getMessage()


def test_an_unreadable_annotation_fetches_nothing(tmp_path: Path) -> None:
    launcher = _Recorder(tmp_path)
    node = {"metadata": {"name": "node-2", "annotations": {ANNOTATION: "{not json"}}}
    VirtSim(None, None)._serve_prefetches(launcher, [node])  # type: ignore[arg-type]
    assert launcher.asked == []
