"""`gtvp verify-quote` against quotes that tpm2-tools (an independent producer) made."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from gtvp.localcluster.swtpm import Swtpm

pytestmark = pytest.mark.tpm

NONCE = "c0ffee0123456789"


@dataclass(frozen=True)
class ToolsQuote:
    dir: Path

    def args(self, **overrides: str) -> list[str]:
        files = {
            "--ak-public": str(self.dir / "ak.pub"),
            "--message": str(self.dir / "quote.msg"),
            "--signature": str(self.dir / "quote.sig"),
            "--pcrs": str(self.dir / "quote.pcrs"),
            "--nonce": NONCE,
        } | overrides
        return [a for k, v in files.items() for a in (k, v) if v]


def _tools(tcti: str, *argv: str, cwd: Path) -> str:
    env = {**os.environ, "TPM2TOOLS_TCTI": tcti, "TSS2_LOG": "all+NONE"}
    out = subprocess.run(
        list(argv), cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=60
    )
    assert out.returncode == 0, f"{argv[0]}: {out.stderr}"
    subprocess.run(["tpm2_flushcontext", "-t"], cwd=cwd, env=env, capture_output=True, check=False)
    return out.stdout


@pytest.fixture(scope="module")
def tools_quote(
    make_tpm: Callable[..., Swtpm], tmp_path_factory: pytest.TempPathFactory
) -> ToolsQuote:
    tpm = make_tpm()
    d = tmp_path_factory.mktemp("tools-quote")
    t = tpm.tcti
    _tools(t, "tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub", cwd=d)
    _tools(
        t,
        "tpm2_createak",
        "-C",
        "ek.ctx",
        "-c",
        "ak.ctx",
        "-G",
        "ecc",
        "-g",
        "sha256",
        "-s",
        "ecdsa",
        "-u",
        "ak.pub",
        "-n",
        "ak.name",
        cwd=d,
    )
    _tools(t, "tpm2_readpublic", "-c", "ak.ctx", "-f", "pem", "-o", "ak.pem", cwd=d)
    _tools(
        t,
        "tpm2_quote",
        "-c",
        "ak.ctx",
        "-l",
        "sha256:0,1,2,3,4,5,6,7",
        "-q",
        NONCE,
        "-m",
        "quote.msg",
        "-s",
        "quote.sig",
        "-o",
        "quote.pcrs",
        "-g",
        "sha256",
        cwd=d,
    )
    (d / "golden.yaml").write_text(_tools(t, "tpm2_pcrread", "sha256:0,1,2,3,4,5,6,7", cwd=d))
    return ToolsQuote(d)


def _gtvp(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gtvp.cli", "verify-quote", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_tpm2_tools_quote_is_verified(tools_quote: ToolsQuote) -> None:
    out = _gtvp(
        *tools_quote.args(),
        "--golden",
        str(tools_quote.dir / "golden.yaml"),
        "--ek-public",
        str(tools_quote.dir / "ek.pub"),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("VERIFIED QuoteVerified: sha256:[0, 1, 2, 3, 4, 5, 6, 7]")
    assert "not checked" not in out.stdout


def test_independent_checker_agrees(tools_quote: ToolsQuote) -> None:
    d = tools_quote.dir
    out = subprocess.run(
        [
            "tpm2_checkquote",
            "-u",
            "ak.pub",
            "-m",
            "quote.msg",
            "-s",
            "quote.sig",
            "-f",
            "quote.pcrs",
            "-g",
            "sha256",
            "-q",
            NONCE,
        ],
        cwd=d,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr


def test_what_was_not_checked_is_said(tools_quote: ToolsQuote) -> None:
    out = _gtvp(*tools_quote.args(**{"--ak-public": str(tools_quote.dir / "ak.pem")}))
    assert out.returncode == 0, out.stderr
    assert "not checked: AK attributes" in out.stdout
    assert "not checked: qualifiedSigner" in out.stdout
    assert "not checked: PCR values" in out.stdout


def test_tampered_message_is_rejected_in_one_line(tools_quote: ToolsQuote, tmp_path: Path) -> None:
    msg = bytearray((tools_quote.dir / "quote.msg").read_bytes())
    msg[-3] ^= 0x40
    (tmp_path / "bad.msg").write_bytes(bytes(msg))
    out = _gtvp(*tools_quote.args(**{"--message": str(tmp_path / "bad.msg")}))
    assert out.returncode == 1
    assert out.stdout.startswith("REJECTED BadSignature:")
    assert len(out.stdout.strip().splitlines()) == 1


def test_wrong_nonce_is_rejected(tools_quote: ToolsQuote) -> None:
    out = _gtvp(*tools_quote.args(**{"--nonce": "00" * 8}))
    assert out.returncode == 1
    assert out.stdout.startswith("REJECTED NonceMismatch:")


def test_golden_mismatch_is_rejected(tools_quote: ToolsQuote, tmp_path: Path) -> None:
    import yaml

    doc = yaml.safe_load((tools_quote.dir / "golden.yaml").read_text())
    golden = {str(k): f"{v:064x}" for k, v in doc["sha256"].items()} | {"7": "ab" * 32}
    (tmp_path / "golden.json").write_text(json.dumps(golden))
    out = _gtvp(*tools_quote.args(), "--golden", str(tmp_path / "golden.json"))
    assert out.returncode == 1
    assert out.stdout.startswith("REJECTED PcrMismatch: PCR 7")


def test_pcr_missing_from_golden_is_unexplained(tools_quote: ToolsQuote, tmp_path: Path) -> None:
    (tmp_path / "golden.json").write_text('{"0": "' + "00" * 32 + '"}')
    out = _gtvp(*tools_quote.args(), "--golden", str(tmp_path / "golden.json"))
    assert out.returncode == 1
    assert out.stdout.startswith("REJECTED UnexplainedPcr: PCR 1 ")


def test_pcrs_from_another_read_are_rejected(tools_quote: ToolsQuote, tmp_path: Path) -> None:
    pcrs = bytearray((tools_quote.dir / "quote.pcrs").read_bytes())
    pcrs[4 + 16 * 8 + 4 + 4 + 2] ^= 0x01  # first byte of the first PCR value
    (tmp_path / "bad.pcrs").write_bytes(bytes(pcrs))
    out = _gtvp(*tools_quote.args(**{"--pcrs": str(tmp_path / "bad.pcrs")}))
    assert out.returncode == 1
    assert out.stdout.startswith("REJECTED PcrDigestMismatch:")


def test_missing_file_is_an_input_error(tools_quote: ToolsQuote) -> None:
    out = _gtvp(*tools_quote.args(**{"--signature": "/nonexistent/sig"}))
    assert out.returncode == 2
    assert "cannot read --signature /nonexistent/sig" in out.stderr
    assert "Traceback" not in out.stderr


def test_garbage_message_is_rejected_not_crashed(tools_quote: ToolsQuote, tmp_path: Path) -> None:
    (tmp_path / "garbage").write_bytes(os.urandom(300))
    out = _gtvp(*tools_quote.args(**{"--message": str(tmp_path / "garbage")}))
    assert out.returncode == 1
    assert out.stdout.startswith("REJECTED ")
    assert "Traceback" not in out.stderr
