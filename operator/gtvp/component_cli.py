"""`gtvp component sign|verify`: for publishers of OS components.

    gtvp component sign tool.yaml --key publisher.pem --publisher acme > tool.signed.yaml
    gtvp component verify tool.signed.yaml --publisher-key acme=publisher.pub
    gtvp component verify crds/samples/oscomponents.yaml --policy crds/samples/securitypolicy.yaml

`sign` reads one or more OSComponent manifests (YAML, `-` for stdin), signs each over
gtvp's canonical encoding with an Ed25519 or ECDSA P-256 private key (PEM, unencrypted)
and prints the manifests with `spec.signature` filled in. `verify` checks each manifest
exactly as the operator does, against publisher keys given one by one or taken from a
SecurityPolicy manifest. Exit codes: 0 all verified, 1 a component failed, 2 unusable input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from gtvp.core.component_checks import check_component
from gtvp.core.component_signing import ComponentSignatureError, sign


class InputError(Exception):
    """A file or argument that cannot be used; the message names it."""


def _read(path: str) -> list[dict[str, Any]]:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        docs = [d for d in yaml.safe_load_all(text) if d]
    except yaml.YAMLError as exc:
        raise InputError(f"{path} is not YAML: {exc}") from exc
    comps = [d for d in docs if isinstance(d, dict) and d.get("kind") == "OSComponent"]
    if not comps:
        raise InputError(f"{path} holds no OSComponent manifest")
    return comps


def _keys(args: argparse.Namespace) -> dict[str, str]:
    keys: dict[str, str] = {}
    for item in args.publisher_key or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--publisher-key {item!r}: expected NAME=PATH")
        try:
            keys[name] = Path(path).read_text()
        except OSError as exc:
            raise InputError(f"cannot read publisher key {path}: {exc.strerror}") from exc
    if args.policy:
        try:
            docs = list(yaml.safe_load_all(Path(args.policy).read_text()))
        except (OSError, yaml.YAMLError) as exc:
            raise InputError(f"cannot read policy {args.policy}: {exc}") from exc
        for doc in docs:
            if isinstance(doc, dict) and doc.get("kind") == "SecurityPolicy":
                for pk in (doc.get("spec") or {}).get("publisherKeys") or []:
                    keys[str(pk.get("name"))] = str(pk.get("publicKey"))
    if not keys:
        raise InputError("no publisher keys: give --publisher-key NAME=PATH or --policy FILE")
    return keys


def run_sign(args: argparse.Namespace) -> int:
    try:
        comps = _read(args.manifest)
        try:
            pem = Path(args.key).read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read key {args.key}: {exc.strerror}") from exc
        for obj in comps:
            spec = obj.setdefault("spec", {})
            spec.pop("signature", None)
            spec["signature"] = sign(spec, pem, args.publisher)
    except (InputError, ComponentSignatureError) as exc:
        print(f"gtvp component sign: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(yaml.safe_dump_all(comps, sort_keys=False))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    try:
        comps = _read(args.manifest)
        keys = _keys(args)
    except InputError as exc:
        print(f"gtvp component verify: {exc}", file=sys.stderr)
        return 2
    failed = 0
    for obj in comps:
        check = check_component(obj, keys)
        spec = obj.get("spec") or {}
        name = (obj.get("metadata") or {}).get("name")
        what = f"{name} ({spec.get('componentName')} {spec.get('version')})"
        if check.ok:
            print(f"{what}: Verified, {check.message}")
        else:
            failed += 1
            print(f"{what}: Failed: {check.reason}: {check.message}")
    return 1 if failed else 0


def register(p: argparse.ArgumentParser) -> None:
    """`gtvp component`'s sub-commands and arguments (gtvp.cli names the command)."""
    p.description = __doc__.replace("`", "")  # --help is plain text, not Markdown
    p.formatter_class = argparse.RawDescriptionHelpFormatter  # the examples, line by line
    csub = p.add_subparsers(dest="component_cmd", required=True)
    s = csub.add_parser("sign", help="sign OSComponent manifests with a publisher key")
    s.add_argument("manifest", help="YAML file with OSComponent manifests, - for stdin")
    s.add_argument("--key", required=True, help="private key, PEM (Ed25519 or ECDSA P-256)")
    s.add_argument("--publisher", required=True, help="publisher name, as in the SecurityPolicy")
    s.set_defaults(func=run_sign)
    v = csub.add_parser("verify", help="verify OSComponent manifests as the operator does")
    v.add_argument("manifest", help="YAML file with OSComponent manifests, - for stdin")
    v.add_argument(
        "--publisher-key", action="append", metavar="NAME=PATH", help="a trusted public key"
    )
    v.add_argument("--policy", help="take the trusted keys from a SecurityPolicy manifest")
    v.set_defaults(func=run_verify)
