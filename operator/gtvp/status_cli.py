"""`gtvp status`: a readable summary of the trusted pool.

What it shows, and how it is read and rendered, is `gtvp.pool_status` (shared with `gtvp
local`); this module is the command: it reads the cluster in --kubeconfig, else $KUBECONFIG,
else the local pool's (`gtvp local up`) when that exists.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gtvp import local_state, pool_status


def default_kubeconfig() -> str | None:
    env = os.environ.get("KUBECONFIG")
    if env:
        return env
    local = local_state.admin_kubeconfig()
    return str(local) if local.exists() else None


def run(args: argparse.Namespace) -> int:
    kubeconfig = args.kubeconfig or default_kubeconfig()
    if not kubeconfig or not Path(kubeconfig).exists():
        print(
            "gtvp status: no cluster: set KUBECONFIG or start the local pool (gtvp local up)",
            file=sys.stderr,
        )
        return 2
    try:
        text = pool_status.summary(kubeconfig)
    except Exception as exc:  # noqa: BLE001 - one line for any connection problem
        print(f"gtvp status: cannot read the cluster ({kubeconfig}): {exc}", file=sys.stderr)
        return 2
    print(text)
    return 0


def register(p: argparse.ArgumentParser) -> None:
    """`gtvp status`'s arguments (gtvp.cli names the command)."""
    p.add_argument("--kubeconfig", help="default: $KUBECONFIG, else the local pool's")
    p.set_defaults(func=run)
