"""`gtvp-agent`: command line of the node agent (one per node, DaemonSet or process)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from gtvp_agent.agent import EVENT_LOG, Agent, AgentConfig


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gtvp-agent", description=__doc__)
    p.add_argument(
        "--node", default=os.environ.get("NODE_NAME"), help="this node's name (default: $NODE_NAME)"
    )
    p.add_argument(
        "--tpm",
        default=os.environ.get("GTVP_TPM"),
        help=f"TCTI: {DEFAULT_TCTI} (default without --tpm-per-node) or "
        "swtpm:host=127.0.0.1,port=N",
    )
    p.add_argument(
        "--tpm-per-node",
        type=Path,
        default=os.environ.get("GTVP_TPM_PER_NODE"),
        help="JSON object node name -> TCTI (test rigs with a swtpm per node): this node's "
        "entry, else --tpm; no entry and no --tpm is an error",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=Path(os.environ.get("GTVP_AGENT_STATE", "/var/lib/gtvp-agent")),
        help="where the AK blobs are kept (TPM-wrapped, safe at rest)",
    )
    p.add_argument(
        "--kubeconfig",
        default=os.environ.get("KUBECONFIG"),
        help="kubeconfig (default: in-cluster service account)",
    )
    p.add_argument("--ek", choices=["rsa", "ecc"], default="rsa", help="EK type (default rsa)")
    p.add_argument(
        "--ak",
        choices=["ecc", "rsa"],
        default="ecc",
        help="AK type: ECC P-256 (default) or RSA-2048",
    )
    p.add_argument(
        "--event-log",
        type=Path,
        default=EVENT_LOG,
        help=f"UEFI event log to send with quotes (default {EVENT_LOG})",
    )
    p.add_argument("--no-event-log", action="store_true", help="send no event log")
    p.add_argument("--log-level", default="INFO")
    return p


DEFAULT_TCTI = "device:/dev/tpmrm0"


def choose_tcti(node: str, per_node: Mapping[str, str] | None, default: str | None) -> str:
    """This node's TPM: its entry in the per-node map, else the default (--tpm), else (with
    no map) the TPM device. ValueError naming the node when the map has no entry for it and
    there is no default."""
    if per_node is not None:
        tcti = per_node.get(node)
        if tcti:
            return tcti
        if default:
            return default
        raise ValueError(
            f"no TPM for node {node!r}: the per-node TPM map has no entry for it "
            f"(it has {', '.join(sorted(per_node)) or 'none'}) and no --tpm default is given"
        )
    return default or DEFAULT_TCTI


def read_tpm_map(text: str) -> dict[str, str]:
    """The per-node TPM map (a JSON object of strings); ValueError on anything else."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise ValueError("not a JSON object of node name -> TCTI strings")
    return data


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not args.node:
        print("gtvp-agent: --node (or $NODE_NAME) is required", file=sys.stderr)
        return 2
    try:
        per_node = (
            None if args.tpm_per_node is None else read_tpm_map(args.tpm_per_node.read_text())
        )
    except (OSError, ValueError) as exc:
        print(f"gtvp-agent: cannot read --tpm-per-node {args.tpm_per_node}: {exc}", file=sys.stderr)
        return 2
    try:
        tcti = choose_tcti(args.node, per_node, args.tpm)
    except ValueError as exc:
        print(f"gtvp-agent: {exc} ({args.tpm_per_node})", file=sys.stderr)
        return 2
    from kubernetes import client, config

    try:
        if args.kubeconfig:
            api_client = config.new_client_from_config(config_file=args.kubeconfig)
        else:
            config.load_incluster_config()
            api_client = client.ApiClient()
    except Exception as exc:  # noqa: BLE001 - report any config problem in one line
        print(f"gtvp-agent: cannot configure the API client: {exc}", file=sys.stderr)
        return 2
    cfg = AgentConfig(
        node=args.node,
        tcti=tcti,
        state_dir=args.state_dir / args.node,
        ek_type=args.ek,
        ak_type=args.ak,
        event_log=None if args.no_event_log else args.event_log,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    Agent(client.CustomObjectsApi(api_client), cfg).run(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
