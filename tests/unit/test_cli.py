"""`gtvp`'s entry point: what it imports, what `--help` lists, how errors come out.

Start-up time itself is measured in tests/bench/bench_cli_startup.py, never asserted here;
these tests pin what start-up depends on: a command loads only its own module, so
`gtvp --help` and `gtvp verify-quote` never load the Kubernetes client, the local-cluster
code or the agent's TPM library.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gtvp import cli
from gtvp.quote_cli import Selection
from gtvp_local.processes import free_port

# heavy for a command line, and none of them needed to print help or verify a quote
NEVER_AT_START = ("kubernetes", "kopf", "tpm2_pytss", "gtvp_local", "gtvp_agent")
COMMAND_MODULES = tuple(module for module, _ in cli.COMMANDS.values())
# input files that do not exist: a run stops at reading them, exit 2
VERIFY_QUOTE_ARGS = ["--ak-public", "a", "--message", "m", "--signature", "s", "--pcrs", "p"]
VERIFY_QUOTE_ARGS += ["--nonce", "00"]


def _loaded_after(code: str, env: dict[str, str] | None = None) -> set[str]:
    """Top-level packages and gtvp modules loaded by `code` in a fresh interpreter."""
    probe = (
        "import json, sys\n"
        f"{code}\n"
        "print(json.dumps(sorted(m for m in sys.modules)), file=sys.__stdout__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env=env,
    )
    return set(json.loads(out.stdout.splitlines()[-1]))


def _packages(loaded: set[str], names: tuple[str, ...]) -> set[str]:
    return {m for m in loaded for n in names if m == n or m.startswith(n + ".")}


def test_the_top_level_parser_loads_no_command_module() -> None:
    loaded = _loaded_after("from gtvp import cli\ncli.parser()")
    assert not _packages(loaded, NEVER_AT_START)
    assert not _packages(loaded, COMMAND_MODULES)
    assert not _packages(loaded, ("yaml", "cryptography", "gtvp.core"))


def test_verify_quote_loads_neither_the_cluster_code_nor_yaml() -> None:
    # --help, and a run that gets as far as reading its (missing) input files
    loaded = _loaded_after("from gtvp import cli\ncli.parser('verify-quote')")
    assert not _packages(loaded, (*NEVER_AT_START, "yaml", "cryptography"))
    run = f"from gtvp import cli\nassert cli.main(['verify-quote', *{VERIFY_QUOTE_ARGS}]) == 2"
    loaded = _loaded_after(run)
    assert "gtvp.quote_cli" in loaded
    assert not _packages(loaded, (*NEVER_AT_START, "yaml"))
    assert not _packages(loaded, tuple(m for m in COMMAND_MODULES if m != "gtvp.quote_cli"))


def test_help_lists_every_command_with_its_one_line_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--help"])
    assert exited.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps long help lines
    assert set(cli.COMMANDS) == {
        "local",
        "verify-quote",
        "component",
        "status",
        "token",
        "policy",
        "eventlog",
    }
    for name, (_, help_text) in cli.COMMANDS.items():
        assert f"{name} {help_text}" in out


@pytest.mark.parametrize(
    ("argv", "func"),
    [
        (["local", "down"], "cmd_down"),
        (["local", "up", "--members", "0"], "cmd_up"),
        (["component", "verify", "x.yaml", "--policy", "p.yaml"], "run_verify"),
        (["status"], "run"),
        (["verify-quote", *VERIFY_QUOTE_ARGS], "run"),
        (["eventlog", "replay", "log.bin"], "run_replay"),
        (["policy", "learn", "--event-log", "log.bin"], "run_learn"),
    ],
)
def test_each_command_registers_its_arguments(argv: list[str], func: str) -> None:
    args = cli.parser(argv[0]).parse_args(argv)
    assert args.func.__module__ == cli.COMMANDS[argv[0]][0]
    assert args.func.__name__ == func
    if argv[0] == "verify-quote":  # the default selection is parsed like a given one
        assert args.pcr_selection == Selection("sha256", tuple(range(8)))


def test_a_local_pool_error_is_one_line(tmp_path: Path) -> None:
    # no pool runs in this state directory (and nothing listens on its API port)
    state = tmp_path / "local"
    state.mkdir()
    ports = {"etcd_client": free_port(), "etcd_peer": free_port(), "apiserver": free_port()}
    (state / "ports.json").write_text(json.dumps(ports))
    out = subprocess.run(
        [sys.executable, "-m", "gtvp.cli", "local", "tamper", "node-1"],
        env=dict(os.environ, GTVP_LOCAL_STATE=str(state)),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr == "gtvp local: the local pool is not running: gtvp local up\n"


def run_without_gtvp_local(*argv: str) -> subprocess.CompletedProcess[str]:
    """`gtvp ARGV` in a Python where gtvp_local cannot be imported (the operator's image)."""
    script = (
        "import importlib.abc, sys\n"
        "class NoLocal(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'gtvp_local':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, NoLocal())\n"
        "from gtvp import cli\n"
        f"sys.exit(cli.main({list(argv)!r}))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=60
    )


def test_gtvp_local_without_the_gtvp_local_distribution_says_how_to_get_it() -> None:
    """The operator's image installs only the gtvp distribution: `gtvp local` says so."""
    out = run_without_gtvp_local("local", "down")
    assert out.returncode == 2
    assert out.stderr.strip() == cli.LOCAL_MISSING
    assert "pip install -e ./local" in out.stderr


def _run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gtvp.cli", *argv],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env=env,
    )


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        ([], "local, verify-quote, component, status, token, policy or eventlog (see gtvp --help)"),
        (
            ["local"],
            "up, build, tamper, down, status, images or regen-gomod (see gtvp local --help)",
        ),
        (["component"], "sign, verify or build (see gtvp component --help)"),
    ],
)
def test_a_missing_command_is_named_in_words(argv: list[str], named: str) -> None:
    out = _run(*argv)
    assert out.returncode == 2
    assert f"error: a command is missing: {named}" in out.stderr
    assert "cmd" not in out.stderr.split("error:")[1]


HELPS = [[], ["local"], ["verify-quote"], ["component"], ["status"]]
HELPS += [["local", c] for c in ("up", "build", "tamper", "down", "status", "regen-gomod")]
HELPS += [["component", "sign"], ["component", "verify"], ["component", "build"]]


@pytest.mark.parametrize("argv", HELPS, ids=lambda a: " ".join(a) or "gtvp")
def test_help_is_plain_text_without_markdown_backticks(argv: list[str]) -> None:
    out = _run(*argv, "--help")
    assert out.returncode == 0, out.stderr
    assert "`" not in out.stdout


@pytest.mark.parametrize("members", ["-1", "-3", "three"])
def test_local_up_refuses_a_negative_or_unreadable_member_count(
    members: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.parser("local").parse_args(["local", "up", "--members", members])
    assert exited.value.code == 2
    assert "--members" in capsys.readouterr().err
    assert cli.parser("local").parse_args(["local", "up", "--members", "0"]).members == 0


def test_status_names_a_kubeconfig_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nope.kubeconfig"
    out = _run("status", "--kubeconfig", str(missing))
    assert out.returncode == 2
    assert out.stderr == f"gtvp status: --kubeconfig {missing}: no such file\n"
    env = dict(os.environ, KUBECONFIG=str(missing))
    out = _run("status", env=env)
    assert out.returncode == 2
    assert out.stderr == f"gtvp status: KUBECONFIG={missing}: no such file\n"


def test_status_output_formats_are_offered() -> None:
    args = cli.parser("status").parse_args(["status", "-o", "json"])
    assert args.output == "json"
    assert cli.parser("status").parse_args(["status", "--output", "yaml"]).output == "yaml"
    assert cli.parser("status").parse_args(["status"]).output == "text"


def test_the_gtvp_that_local_up_prints_runs_from_the_users_shell(tmp_path: Path) -> None:
    """`make demo` runs gtvp from its virtualenv, on no PATH: `gtvp local up` then prints
    the command that works from the user's shell, and that command runs."""
    from gtvp_local.commands import gtvp_command

    mine = Path(sys.executable).parent / "gtvp"
    if not mine.is_file():
        pytest.skip("gtvp is not installed beside this interpreter")
    bare = "/usr/local/bin:/usr/bin:/bin"
    other = tmp_path / "bin"
    other.mkdir()
    (other / "gtvp").write_text("#!/bin/sh\nexit 7\n")  # another installation, first on PATH
    (other / "gtvp").chmod(0o755)
    cases = {
        bare: str(mine),
        f"{mine.parent}:{bare}": "gtvp",
        f"{other}:{mine.parent}:{bare}": str(mine),
    }
    for path, expected in cases.items():
        printed = gtvp_command(path=path)
        assert printed == expected, path
        run = subprocess.run(  # noqa: S602 - as the user's shell runs what was printed
            f"{printed} --version",
            shell=True,
            env=dict(os.environ, PATH=path),
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert run.returncode == 0, (path, run.stderr)
        assert run.stdout.startswith("gtvp ")


def test_a_port_handed_out_is_not_handed_out_again_before_its_server_binds_it() -> None:
    from gtvp_local.processes import reserve_port

    picked = {free_port() for _ in range(300)}
    assert len(picked) == 300  # none bound yet, none repeated
    assert not any(reserve_port(p) for p in picked)
