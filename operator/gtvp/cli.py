"""`gtvp`: the administrator's command line.

Each sub-command lives in the module that owns its domain and registers itself here;
this module only parses arguments and turns known errors into one-line messages with a
non-zero exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gtvp import __version__, component_cli, quote_cli, status_cli
from gtvp.localcluster import commands as local_commands


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gtvp", description=__doc__.splitlines()[0].strip("`"))
    p.add_argument("--version", action="version", version=f"gtvp {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    local_commands.register(sub)
    quote_cli.register(sub)
    component_cli.register(sub)
    status_cli.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        rc: int = args.func(args)
    except local_commands.ERRORS as exc:
        return local_commands.fail(exc)
    except KeyboardInterrupt:
        print("gtvp: interrupted", file=sys.stderr)
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
