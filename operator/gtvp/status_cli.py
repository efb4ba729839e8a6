"""`gtvp status`: a readable summary of the trusted pool (`-o json|yaml`: the same as data).

What it shows, and how it is read and rendered, is `gtvp.pool_status` (shared with `gtvp
local`); this module is the command: it reads the cluster in --kubeconfig, else $KUBECONFIG,
else the local pool's (`gtvp local up`) when that exists.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import Any

from gtvp import local_state, pool_status


def default_kubeconfig() -> str | None:
    env = os.environ.get("KUBECONFIG")
    if env:
        return env
    local = local_state.admin_kubeconfig()
    return str(local) if local.exists() else None


def _kubeconfig_problem(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """The kubeconfig to read, or why there is none (naming where it was looked for)."""
    kubeconfig: str | None = args.kubeconfig
    if kubeconfig:
        source = f"--kubeconfig {kubeconfig}"
    elif os.environ.get("KUBECONFIG"):
        kubeconfig = os.environ["KUBECONFIG"]
        source = f"KUBECONFIG={kubeconfig}"
    else:
        kubeconfig = default_kubeconfig()
        source = str(kubeconfig)
    if kubeconfig is None:
        return None, "no cluster: set KUBECONFIG or start the local pool (gtvp local up)"
    if not Path(kubeconfig).is_file():
        return None, f"{source}: no such file"
    return kubeconfig, None


def _render(objs: dict[str, list[dict[str, Any]]], output: str) -> str:
    if output == "text":
        return pool_status.render(now=dt.datetime.now(dt.UTC), **objs)
    data = pool_status.report(**objs)
    if output == "json":
        return json.dumps(data, indent=2)
    import yaml

    return yaml.safe_dump(data, sort_keys=False).rstrip()


def run(args: argparse.Namespace) -> int:
    kubeconfig, problem = _kubeconfig_problem(args)
    if kubeconfig is None:
        print(f"gtvp status: {problem}", file=sys.stderr)
        return 2
    try:
        objs = pool_status.collect(kubeconfig)
    except Exception as exc:  # noqa: BLE001 - one line for any connection problem
        print(f"gtvp status: cannot read the cluster ({kubeconfig}): {exc}", file=sys.stderr)
        return 2
    print(_render(objs, args.output))
    return 0


def register(p: argparse.ArgumentParser) -> None:
    """`gtvp status`'s arguments (gtvp.cli names the command)."""
    p.add_argument("--kubeconfig", help="default: $KUBECONFIG, else the local pool's")
    p.add_argument(
        "-o",
        "--output",
        choices=("text", "json", "yaml"),
        default="text",
        help="text (default), or the same as JSON or YAML for scripts",
    )
    p.set_defaults(func=run)
