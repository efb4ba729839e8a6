"""Benchmark: how long `gtvp` takes from exec to exit, against a bare interpreter start.

Run: `python -m tests.bench.bench_cli_startup [--runs N]` (or `make bench`). Each command
runs N times as a subprocess, the commands interleaved so that all see the same machine
load. Baseline: `python -c pass` with the same interpreter (the floor: interpreter and
site start-up, the editable install's import hook). Measured: `gtvp --help`, `gtvp
verify-quote --help` and, when swtpm and tpm2-tools are installed, `gtvp verify-quote` on a
real quote made by tpm2-tools (with --golden and --ek-public: every check, YAML included).
Prints median and p90 wall time per command, the median's ratio to the floor's, the
median against the 120 ms target (issue #11), and the median CPU time (user + system) of
the process, which a busy machine inflates less than wall time. Children get a bytecode
cache in a temporary directory (as an installed gtvp has one) unless --env-as-is. Nothing
is asserted: the figures depend on the machine and on what else runs on it (the load
average is printed).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

TARGET_MS = 120.0
NONCE = "c0ffee0123456789"
TOOLS = ("swtpm", "swtpm_setup", "tpm2_createek", "tpm2_createak", "tpm2_quote", "tpm2_pcrread")


def gtvp_command() -> list[str]:
    """The installed `gtvp` script next to this interpreter (what a user runs), else -m."""
    script = Path(sys.executable).parent / "gtvp"
    return [str(script)] if script.exists() else [sys.executable, "-m", "gtvp.cli"]


def _tools(tcti: str, cwd: Path, *argv: str) -> str:
    env = {**os.environ, "TPM2TOOLS_TCTI": tcti, "TSS2_LOG": "all+NONE"}
    out = subprocess.run(
        list(argv), cwd=cwd, env=env, capture_output=True, text=True, check=True, timeout=60
    )
    subprocess.run(["tpm2_flushcontext", "-t"], cwd=cwd, env=env, capture_output=True, check=False)
    return out.stdout


def make_quote(d: Path) -> list[str]:
    """A quote from a fresh swtpm, made with tpm2-tools; `gtvp verify-quote`'s arguments."""
    from gtvp_local.processes import ProcessTable
    from gtvp_local.swtpm import Swtpm, SwtpmCA

    tpm = Swtpm("bench-cli", d / "tpm", ProcessTable(d))
    tpm.manufacture(SwtpmCA(d / "ca").ensure())
    tpm.start()
    try:
        t = tpm.tcti
        _tools(t, d, "tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub")
        ak = ("-C", "ek.ctx", "-c", "ak.ctx", "-G", "ecc", "-g", "sha256", "-s", "ecdsa")
        _tools(t, d, "tpm2_createak", *ak, "-u", "ak.pub", "-n", "ak.name")
        sel = "sha256:0,1,2,3,4,5,6,7"
        files = ("-m", "quote.msg", "-s", "quote.sig", "-o", "quote.pcrs")
        _tools(t, d, "tpm2_quote", "-c", "ak.ctx", "-l", sel, "-q", NONCE, "-g", "sha256", *files)
        (d / "golden.yaml").write_text(_tools(t, d, "tpm2_pcrread", sel))
    finally:
        tpm.stop()
    return [
        "verify-quote",
        *("--ak-public", str(d / "ak.pub"), "--message", str(d / "quote.msg")),
        *("--signature", str(d / "quote.sig"), "--pcrs", str(d / "quote.pcrs")),
        *("--nonce", NONCE, "--golden", str(d / "golden.yaml")),
        *("--ek-public", str(d / "ek.pub")),
    ]


def child_env(pycache: Path | None) -> dict[str, str]:
    """With `pycache`: bytecode cached there (as in an installed gtvp), whatever this
    environment says; without: this environment as it is."""
    env = dict(os.environ)
    if pycache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


def _cpu_ms() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (used.ru_utime + used.ru_stime) * 1000


def measure(argv: Sequence[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall ms from spawn to exit, and the child's CPU ms."""
    cpu = _cpu_ms()
    start = time.perf_counter()
    out = subprocess.run(list(argv), capture_output=True, check=False, timeout=60, env=env)
    elapsed = (time.perf_counter() - start) * 1000
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {out.returncode}: {out.stderr.decode()}")
    return elapsed, _cpu_ms() - cpu


def p90(samples: Sequence[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


def run(runs: int, *, quote: bool = True, env_as_is: bool = False) -> dict[str, dict[str, float]]:
    """Per command: median and p90 wall ms, the median's ratio to the floor's, median CPU ms."""
    gtvp = gtvp_command()
    commands: dict[str, list[str]] = {
        "python -c pass (floor)": [sys.executable, "-c", "pass"],
        "gtvp --help": [*gtvp, "--help"],
        "gtvp verify-quote --help": [*gtvp, "verify-quote", "--help"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        have_tools = all(shutil.which(t) for t in TOOLS)
        if quote and have_tools:
            commands["gtvp verify-quote (real quote)"] = [*gtvp, *make_quote(Path(tmp))]
        env = child_env(None if env_as_is else Path(tmp) / "pycache")
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
        load = os.getloadavg()[0]
        for argv in commands.values():
            measure(argv, env)  # warm the page cache and the bytecode cache
        for _ in range(runs):
            for name, argv in commands.items():
                samples[name].append(measure(argv, env))
    floor = statistics.median(wall for wall, _ in samples["python -c pass (floor)"])
    print(
        f"bench_cli_startup: {runs} runs each, interleaved; {' '.join(gtvp)}; load average "
        f"{load:.1f} before, {os.getloadavg()[0]:.1f} after ({os.cpu_count()} CPUs)"
    )
    if env_as_is:
        dont = os.environ.get("PYTHONDONTWRITEBYTECODE")
        print(f"  environment as it is (PYTHONDONTWRITEBYTECODE={dont or 'unset'})")
    else:
        print("  bytecode cached (PYTHONPYCACHEPREFIX in a temporary directory), as installed")
    if quote and not have_tools:
        print(f"  (no real quote: needs {', '.join(TOOLS)})")
    head = f"{'wall median':>12} {'p90':>8} {'ratio':>6} {'vs ' + str(int(TARGET_MS)) + ' ms':>9}"
    print(f"  {'command':32} {head} {'CPU median':>11}")
    results: dict[str, dict[str, float]] = {}
    for name, got in samples.items():
        walls = [wall for wall, _ in got]
        med, cpu = statistics.median(walls), statistics.median(c for _, c in got)
        results[name] = {"median": med, "p90": p90(walls), "ratio": med / floor, "cpu": cpu}
        verdict = "" if name.endswith("(floor)") else ("under" if med < TARGET_MS else "OVER")
        print(
            f"  {name:32} {med:10.1f}ms {p90(walls):6.1f}ms {med / floor:5.2f}x {verdict:>9} "
            f"{cpu:9.1f}ms"
        )
    print("  ratio: wall median / the floor's (the floor is the interpreter's own start-up)")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--no-quote", action="store_true", help="skip the real verify-quote run")
    p.add_argument(
        "--env-as-is",
        action="store_true",
        help="keep this environment's bytecode settings (PYTHONDONTWRITEBYTECODE=1 compiles "
        "gtvp's own modules on every start)",
    )
    args = p.parse_args(argv)
    run(args.runs, quote=not args.no_quote, env_as_is=args.env_as_is)
    return 0


if __name__ == "__main__":
    sys.exit(main())
