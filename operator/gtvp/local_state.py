"""Where gtvp keeps its build cache and where `gtvp local` keeps its pool: paths only.

Shared by `gtvp_local` (which builds into the cache and runs the pool from the state
directory) and `gtvp status` (whose default cluster is the local pool's), so that the command
line finds the local pool without loading any local-cluster code.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where gtvp caches builds and local state (`GTVP_CACHE` overrides)."""
    env = os.environ.get("GTVP_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gtvp"


def state_dir() -> Path:
    """The local pool's state (`GTVP_LOCAL_STATE` overrides; default `<cache>/local`)."""
    env = os.environ.get("GTVP_LOCAL_STATE")
    return Path(env).resolve() if env else cache_dir() / "local"


def admin_kubeconfig() -> Path:
    """The local pool's admin kubeconfig (written by its control plane when it starts)."""
    return state_dir() / "kubeconfig"
