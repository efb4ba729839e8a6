"""Which TPM the agent uses: --tpm, or its node's entry in the per-node map (test rigs with a
swtpm per node, the chart's agent.tpmPerNode), falling back to --tpm, then the device."""

from __future__ import annotations

from pathlib import Path

import pytest

from gtvp_agent.main import DEFAULT_TCTI, choose_tcti, main, read_tpm_map

RIG = {"node-1": "swtpm:host=10.0.0.1,port=2321", "node-2": "swtpm:host=10.0.0.2,port=2321"}


def test_without_a_map_the_agent_uses_tpm_or_the_device() -> None:
    assert choose_tcti("node-1", None, None) == DEFAULT_TCTI == "device:/dev/tpmrm0"
    assert choose_tcti("node-1", None, "mssim:host=h,port=1") == "mssim:host=h,port=1"


def test_each_node_takes_its_own_entry_then_the_default() -> None:
    assert choose_tcti("node-2", RIG, None) == "swtpm:host=10.0.0.2,port=2321"
    assert choose_tcti("node-2", RIG, "device:/dev/tpmrm0") == "swtpm:host=10.0.0.2,port=2321"
    assert choose_tcti("node-3", RIG, "device:/dev/tpmrm0") == "device:/dev/tpmrm0"
    assert choose_tcti("node-3", {**RIG, "node-3": ""}, "swtpm:") == "swtpm:"


def test_a_node_missing_from_the_map_without_a_default_is_named() -> None:
    with pytest.raises(ValueError, match="no TPM for node 'node-3'") as err:
        choose_tcti("node-3", RIG, None)
    assert "node-1, node-2" in str(err.value)
    with pytest.raises(ValueError, match="has none"):
        choose_tcti("node-3", {}, None)


def test_the_map_must_be_a_json_object_of_strings() -> None:
    assert read_tpm_map('{"node-1": "swtpm:"}') == {"node-1": "swtpm:"}
    for bad in ("[]", '{"node-1": 3}', "node-1: swtpm:", '"swtpm:"'):
        with pytest.raises(ValueError, match="JSON"):
            read_tpm_map(bad)


def test_the_agent_stops_naming_its_node_and_the_map(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tpm-per-node.json"
    path.write_text('{"node-1": "swtpm:host=10.0.0.1,port=2321"}')
    assert main(["--node", "node-9", "--tpm-per-node", str(path)]) == 2
    said = capsys.readouterr().err
    assert "no TPM for node 'node-9'" in said
    assert str(path) in said
    path.write_text("not json")
    assert main(["--node", "node-1", "--tpm-per-node", str(path)]) == 2
    assert "cannot read --tpm-per-node" in capsys.readouterr().err
