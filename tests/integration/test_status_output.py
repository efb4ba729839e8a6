"""`gtvp status -o json|yaml` against the real API server: the pool as data for scripts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from gtvp_local.controlplane import ControlPlane

pytestmark = pytest.mark.controlplane


@pytest.mark.parametrize("output", ["json", "yaml"])
def test_status_prints_the_pool_as_json_or_yaml(control_plane: ControlPlane, output: str) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "gtvp.cli",
            "status",
            "-o",
            output,
            "--kubeconfig",
            str(control_plane.admin_kubeconfig),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout) if output == "json" else yaml.safe_load(run.stdout)
    assert set(data) == {
        "members",
        "nodes",
        "gatedVMs",
        "lazyBoxes",
        "migrations",
        "migrationsFinished",
    }
    assert isinstance(data["members"], list)
    assert isinstance(data["migrationsFinished"], int)
