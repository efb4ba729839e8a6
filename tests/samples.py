"""The repository's sample objects (crds/samples/), read afresh for each caller to change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

SAMPLES = Path(__file__).parents[1] / "crds" / "samples"


def sample_policy() -> dict[str, Any]:
    """The sample SecurityPolicy document (crds/samples/securitypolicy.yaml)."""
    path = SAMPLES / "securitypolicy.yaml"
    doc: dict[str, Any] = next(d for d in yaml.safe_load_all(path.read_text()) if d)
    return doc


def sample_policy_spec() -> dict[str, Any]:
    """The sample SecurityPolicy's spec."""
    spec: dict[str, Any] = sample_policy()["spec"]
    return spec
