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

from gtvp_local.swtpm import Swtpm

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


def _make_quote(tpm: Swtpm, d: Path, bank: str) -> ToolsQuote:
    """EK, ECC AK and a quote over `bank`:0-7 (signed with SHA-256), plus golden files."""
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
        f"{bank}:0,1,2,3,4,5,6,7",
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
    (d / "golden.yaml").write_text(_tools(t, "tpm2_pcrread", f"{bank}:0,1,2,3,4,5,6,7", cwd=d))
    return ToolsQuote(d)


@pytest.fixture(scope="module")
def tools_quote(
    make_tpm: Callable[..., Swtpm], tmp_path_factory: pytest.TempPathFactory
) -> ToolsQuote:
    return _make_quote(make_tpm(), tmp_path_factory.mktemp("tools-quote"), "sha256")


@pytest.fixture(scope="module")
def sha1_quote(
    make_tpm: Callable[..., Swtpm], tmp_path_factory: pytest.TempPathFactory
) -> ToolsQuote:
    """A quote over the SHA-1 bank: allocated with tpm2_pcrallocate, active after a restart."""
    tpm = make_tpm()
    d = tmp_path_factory.mktemp("sha1-quote")
    _tools(tpm.tcti, "tpm2_pcrallocate", "sha1:all+sha256:all", cwd=d)
    tpm.stop()
    tpm.start()
    quote = _make_quote(tpm, d, "sha1")
    (d / "golden-sha256.yaml").write_text(
        _tools(tpm.tcti, "tpm2_pcrread", "sha256:0,1,2,3,4,5,6,7", cwd=d)
    )
    return quote


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


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def test_sha1_bank_quote_is_refused_by_default(sha1_quote: ToolsQuote) -> None:
    """The bank comes from --pcr-selection (sha256:0-7), never from the unsigned --pcrs file."""
    out = _gtvp(*sha1_quote.args())
    assert out.returncode == 1, out.stdout + out.stderr
    line = _one_line(out.stdout)
    assert line.startswith("REJECTED PcrSelectionMismatch: the signed quote covers sha1:[0, 1,")
    assert "--pcr-selection expects sha256:[0, 1, 2, 3, 4, 5, 6, 7]" in line
    assert "--allow-sha1" in line


def test_sha1_bank_quote_is_refused_without_golden_values_too(sha1_quote: ToolsQuote) -> None:
    out = _gtvp(*sha1_quote.args(), "--ek-public", str(sha1_quote.dir / "ek.pub"))
    assert out.returncode == 1
    assert "VERIFIED" not in out.stdout


def test_sha1_selection_needs_allow_sha1(sha1_quote: ToolsQuote) -> None:
    out = _gtvp(*sha1_quote.args(), "--pcr-selection", "sha1:0-7")
    assert out.returncode == 2
    line = _one_line(out.stderr)
    assert "SHA-1" in line
    assert "--allow-sha1" in line
    assert out.stdout == ""


def test_sha1_bank_quote_is_verified_when_asked_for(sha1_quote: ToolsQuote) -> None:
    out = _gtvp(
        *sha1_quote.args(),
        "--pcr-selection",
        "sha1:0-7",
        "--allow-sha1",
        "--golden",
        str(sha1_quote.dir / "golden.yaml"),
        "--ek-public",
        str(sha1_quote.dir / "ek.pub"),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("VERIFIED QuoteVerified: sha1:[0, 1, 2, 3, 4, 5, 6, 7]")
    assert "warning: SHA-1 PCR bank" in out.stdout
    assert "not checked" not in out.stdout


def test_signed_selection_must_be_the_expected_one(tools_quote: ToolsQuote) -> None:
    out = _gtvp(*tools_quote.args(), "--pcr-selection", "sha256:0-3,7")
    assert out.returncode == 1
    assert _one_line(out.stdout) == (
        "REJECTED PcrSelectionMismatch: the signed quote covers sha256:[0, 1, 2, 3, 4, 5, 6, 7], "
        "--pcr-selection expects sha256:[0, 1, 2, 3, 7]"
    )


def test_pcr_selection_takes_tpm2_tools_syntax(tools_quote: ToolsQuote) -> None:
    out = _gtvp(*tools_quote.args(), "--pcr-selection", "sha256:0,1,2,3,4,5,6,7")
    assert out.returncode == 0, out.stdout + out.stderr


def test_pcrs_file_of_another_bank_is_rejected(
    tools_quote: ToolsQuote, sha1_quote: ToolsQuote
) -> None:
    out = _gtvp(*tools_quote.args(**{"--pcrs": str(sha1_quote.dir / "quote.pcrs")}))
    assert out.returncode == 1
    assert _one_line(out.stdout) == (
        "REJECTED PcrSelectionMismatch: --pcrs holds sha1:[0, 1, 2, 3, 4, 5, 6, 7], "
        "the signed quote covers sha256:[0, 1, 2, 3, 4, 5, 6, 7]"
    )


@pytest.mark.parametrize(
    ("golden", "selection", "holds", "wants"),
    [("golden-sha256.yaml", "sha1:0-7", "sha256", "sha1"), ("golden.yaml", None, "sha1", "sha256")],
)
def test_golden_of_another_bank_is_one_line(
    sha1_quote: ToolsQuote,
    tools_quote: ToolsQuote,
    golden: str,
    selection: str | None,
    holds: str,
    wants: str,
) -> None:
    quote = sha1_quote if selection else tools_quote
    extra = ["--pcr-selection", selection, "--allow-sha1"] if selection else []
    out = _gtvp(*quote.args(), *extra, "--golden", str(sha1_quote.dir / golden))
    assert out.returncode == 2, out.stdout + out.stderr
    assert _one_line(out.stderr) == (
        f"gtvp verify-quote: --golden holds {holds} values, not {wants} (the bank of "
        "--pcr-selection)"
    )
    assert "Traceback" not in out.stderr
    assert "invalid literal" not in out.stderr


def test_golden_value_of_another_size_is_one_line(tools_quote: ToolsQuote, tmp_path: Path) -> None:
    (tmp_path / "golden.json").write_text('{"0": "' + "00" * 20 + '"}')
    out = _gtvp(*tools_quote.args(), "--golden", str(tmp_path / "golden.json"))
    assert out.returncode == 2
    assert _one_line(out.stderr) == (
        "gtvp verify-quote: --golden PCR 0 is 20 bytes, a sha256 value is 32"
    )


@pytest.mark.parametrize(
    "selection", ["sha256:0-24", "md5:0-7", "sha256", "sha256:7-3", "sha256:x"]
)
def test_bad_pcr_selection_is_a_usage_error(tools_quote: ToolsQuote, selection: str) -> None:
    out = _gtvp(*tools_quote.args(), "--pcr-selection", selection)
    assert out.returncode == 2
    assert "--pcr-selection" in out.stderr
    assert "Traceback" not in out.stderr
