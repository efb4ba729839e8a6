"""`gtvp`: the administrator's command line.

Each sub-command lives in the module that owns its domain, which adds the sub-command's
arguments (`register(parser)`); this module only names the sub-commands, parses arguments
and turns known errors into one-line messages with a non-zero exit code.

Start-up stays cheap: only the module of the sub-command being run is imported (while its
arguments are parsed), so `gtvp --help` imports none of them, and `gtvp verify-quote` never
imports the local-cluster code or the Kubernetes client (nor YAML, unless --golden asks for
it). tests/unit/test_cli.py checks what is imported; tests/bench/bench_cli_startup.py
measures the time.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from gtvp import __version__

# name -> (module that registers its arguments and runs it, one-line help for `gtvp --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "local": (
        "gtvp_local.commands",
        "run a local trusted pool (real control plane on loopback)",
    ),
    "verify-quote": ("gtvp.quote_cli", "verify a tpm2-tools quote with gtvp's verifier"),
    "component": ("gtvp.component_cli", "sign or verify OSComponent manifests"),
    "status": ("gtvp.status_cli", "a readable summary of the trusted pool"),
}


def _command_in(argv: Sequence[str]) -> str | None:
    """The sub-command `argv` names: its first word that is not an option (no top-level
    option takes a value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, complete for `command` (its module imported and its arguments added);
    the other sub-commands carry only their name and help."""
    p = argparse.ArgumentParser(prog="gtvp", description=__doc__.splitlines()[0].replace("`", ""))
    p.add_argument("--version", action="version", version=f"gtvp {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, (module, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text)
        if name == command:
            register: Callable[[argparse.ArgumentParser], None]
            register = importlib.import_module(module).register
            register(cmd)
    return p


LOCAL_MISSING = (
    "gtvp local: not installed here (it is a distribution of its own, gtvp-local, which the "
    "operator's image leaves out); from a clone of the gtvp repository: pip install -e ./local"
)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        p = parser(_command_in(argv))
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("gtvp_local"):
            raise
        print(LOCAL_MISSING, file=sys.stderr)
        return 2
    args = p.parse_args(argv)
    try:
        rc: int = args.func(args)
    except KeyboardInterrupt:
        print("gtvp: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # the local pool's errors become one line; its module is loaded only when `gtvp
        # local` runs, so other commands (and the operator's image, which leaves the
        # local-cluster code out) never need it
        local_commands = sys.modules.get(COMMANDS["local"][0])
        if local_commands is not None and isinstance(exc, local_commands.ERRORS):
            failed: int = local_commands.fail(exc)
            return failed
        raise
    return rc


if __name__ == "__main__":
    sys.exit(main())
