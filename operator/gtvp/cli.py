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
    "component": (
        "gtvp.component_cli",
        "sign or verify OSComponent manifests, build gtvp's guest components",
    ),
    "status": ("gtvp.status_cli", "a readable summary of the trusted pool"),
    "token": ("gtvp.token_cli", "verify, show or rotate the signed verdict tokens (EAR)"),
    "policy": (
        "gtvp.policy_cli",
        "propose a measured-boot reference set (learn); judge the live policy (check)",
    ),
    "eventlog": ("gtvp.eventlog_cli", "replay a TCG event log and print its PCRs and events"),
}


def _command_in(argv: Sequence[str]) -> str | None:
    """The sub-command `argv` names: its first word that is not an option (no top-level
    option takes a value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def plain(doc: str) -> str:
    """A docstring as `--help` shows it: Markdown's backticks dropped."""
    return doc.replace("`", "")


def _name_missing_commands(p: argparse.ArgumentParser) -> None:
    """A parser with sub-commands, run without one, says so in words, naming them
    (argparse's own message names the internal `dest`); the same for nested ones."""
    for action in p._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        action.required = False  # our default below answers instead of argparse's message
        names = list(action.choices)
        listed = ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]

        def missing(
            _args: argparse.Namespace, p: argparse.ArgumentParser = p, listed: str = listed
        ) -> int:
            p.error(f"a command is missing: {listed} (see {p.prog} --help)")

        p.set_defaults(func=missing)
        for child in action.choices.values():
            _name_missing_commands(child)


def parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, complete for `command` (its module imported and its arguments added);
    the other sub-commands carry only their name and help."""
    p = argparse.ArgumentParser(prog="gtvp", description=plain(__doc__.splitlines()[0]))
    p.add_argument("--version", action="version", version=f"gtvp {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="{" + ",".join(COMMANDS) + "}")
    for name, (module, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text)
        if name == command:
            register: Callable[[argparse.ArgumentParser], None]
            register = importlib.import_module(module).register
            register(cmd)
    _name_missing_commands(p)
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
