"""`gtvp verify-quote`'s option and golden-file parsing (no TPM needed)."""

from __future__ import annotations

import argparse

import pytest

from gtvp.quote_cli import InputError, Selection, load_golden, parse_selection


@pytest.mark.parametrize(
    ("text", "bank", "pcrs"),
    [
        ("sha256:0-7", "sha256", (0, 1, 2, 3, 4, 5, 6, 7)),
        ("sha256:0,1,2,3,4,5,6,7", "sha256", (0, 1, 2, 3, 4, 5, 6, 7)),
        ("SHA384:7,0-2", "sha384", (0, 1, 2, 7)),
        ("sha1:23", "sha1", (23,)),
    ],
)
def test_pcr_selection_syntax(text: str, bank: str, pcrs: tuple[int, ...]) -> None:
    assert parse_selection(text) == Selection(bank, pcrs)


@pytest.mark.parametrize(
    "text", ["sha256", "md5:0-7", "sha256:", "sha256:0-24", "sha256:7-3", "sha256:-1", "x:1"]
)
def test_bad_pcr_selection(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_selection(text)


def test_compact_form_round_trips() -> None:
    sel = parse_selection("sha256:0-3,7,9-10")
    assert sel.compact == "sha256:0-3,7,9-10"
    assert str(sel) == "sha256:[0, 1, 2, 3, 7, 9, 10]"


V1, V2 = "0x" + "AB" * 32, "cd" * 32


@pytest.mark.parametrize(
    "doc",
    [
        f"sha256:\n  0 : {V1}\n  1 : {V2}\n",  # tpm2_pcrread
        f"sha1:\n  0 : 0x{'00' * 20}\nsha256:\n  0 : {V1}\n  1 : {V2}\n",
        f'{{"0": "{V1}", "1": "{V2}"}}',
        f"pcrs:\n  sha256:\n    0: {V1}\n    1: {V2}\n",
    ],
)
def test_golden_shapes(doc: str) -> None:
    assert load_golden(doc.encode(), "sha256") == {0: b"\xab" * 32, 1: b"\xcd" * 32}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (f"sha1:\n  0 : 0x{'00' * 20}\n", "--golden holds sha1 values, not sha256"),
        (f"0: 0x{'00' * 20}\n", "--golden PCR 0 is 20 bytes, a sha256 value is 32"),
        ("0: zz\n", "--golden PCR 0 is not a hex value"),
        (f"first: {V1}\n", "--golden entry 'first' is not a PCR index with a hex value"),
        ("- 1\n- 2\n", "--golden must map PCR indices to values"),
        ("{", "--golden is not YAML or JSON"),
    ],
)
def test_golden_errors_say_what_is_wrong(doc: str, message: str) -> None:
    with pytest.raises(InputError, match="^" + message.replace("(", r"\(")):
        load_golden(doc.encode(), "sha256")
