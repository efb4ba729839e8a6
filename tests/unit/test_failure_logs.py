"""A failed test's report carries the tails of its pool's operator and stand-in logs."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

from gtvp_local.polling import wait_for
from gtvp_local.processes import ProcessTable
from tests.conftest import FAILURE_LOG_LINES, pool_logs


def _run(procs: ProcessTable, name: str, lines: int) -> None:
    code = f"for i in range({lines}): print('{name} line', i)"
    tracked = procs.start(name, [sys.executable, "-c", code])
    wait_for(f"{name} to end", lambda: not tracked.alive(), 10, 0.05)


def test_the_operator_and_stand_in_logs_are_shown_and_nothing_else(tmp_path: Path) -> None:
    procs = ProcessTable(tmp_path)
    _run(procs, "operator-0", 100)
    _run(procs, "virtsim", 3)
    _run(procs, "agent-a", 3)  # an agent's log is not what explains a failure
    got = dict(pool_logs(SimpleNamespace(procs=procs)))
    assert sorted(got) == [
        f"pool log: operator-0 (last {FAILURE_LOG_LINES} lines)",
        f"pool log: virtsim (last {FAILURE_LOG_LINES} lines)",
    ]
    operator = got[f"pool log: operator-0 (last {FAILURE_LOG_LINES} lines)"].splitlines()
    assert len(operator) == FAILURE_LOG_LINES
    assert operator[-1] == "operator-0 line 99"  # the end of the log, where it failed
    assert got[f"pool log: virtsim (last {FAILURE_LOG_LINES} lines)"].endswith("virtsim line 2")


def test_a_test_without_a_pool_gets_nothing_added() -> None:
    assert pool_logs(None) == []
    assert pool_logs(SimpleNamespace(procs="not a process table")) == []
