"""Where the repository's manifests are, for commands run from a clone.

`gtvp local` is a development and demonstration tool: it installs the CRDs and samples
from the checkout the package was installed from (editable install). `GTVP_REPO`
points elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path


class LayoutError(RuntimeError):
    """The repository files gtvp local needs are not where expected."""


def repo_root() -> Path:
    env = os.environ.get("GTVP_REPO")
    root = Path(env).resolve() if env else Path(__file__).resolve().parents[2]
    if not (root / "crds" / "member.yaml").is_file():
        raise LayoutError(
            f"gtvp's manifests were not found under {root}/crds. `gtvp local` runs from a clone "
            "of the gtvp repository (pip install -e . -e ./local); set GTVP_REPO to the "
            "clone's path."
        )
    return root


def gtvp_crds() -> list[Path]:
    crds = repo_root() / "crds"
    return [
        crds / f for f in ("member.yaml", "securitypolicy.yaml", "oscomponent.yaml", "lazybox.yaml")
    ]


def kubevirt_crds() -> list[Path]:
    return sorted((repo_root() / "crds" / "kubevirt").glob("*.yaml"))


def samples() -> list[Path]:
    return sorted((repo_root() / "crds" / "samples").glob("*.yaml"))
