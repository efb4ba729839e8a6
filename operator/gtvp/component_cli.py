"""`gtvp component sign|verify|build`: for publishers of OS components.

    gtvp component sign tool.yaml --key publisher.pem --publisher acme > tool.signed.yaml
    gtvp component verify tool.signed.yaml --publisher-key acme=publisher.pub
    gtvp component verify crds/samples/oscomponents.yaml --policy crds/samples/securitypolicy.yaml
    gtvp component build --out oci --registry registry.example.com/gtvp > components.yaml

`sign` reads one or more OSComponent manifests (YAML, `-` for stdin), signs each over
gtvp's canonical encoding with an Ed25519 or ECDSA P-256 private key (PEM, unencrypted)
and prints the manifests with `spec.signature` filled in. `verify` checks each manifest
exactly as the operator does, against publisher keys given one by one or taken from a
SecurityPolicy manifest. Exit codes: 0 all verified, 1 a component failed, 2 unusable input.

`build` (needs gtvp-local, the development distribution, and umoci) builds gtvp's real
guest components reproducibly (the Debian cloud kernel with gtvp's box init, the
busybox-base root filesystem, the glibc library layer from Debian's libc6 and libc-bin, the
hello-web application), packages each as a KubeVirt
containerDisk OCI image layout under --out (the kernel as a kernel-boot container), prints
their OSComponent manifests (signed when --key is given) pinning each image by its
manifest's digest in --registry and its disk file by `diskDigest`, with the disk file's
chunk digest list (`spec.chunks`, 1 MiB chunks, covered by the signature: what a member
fetching it from several peers checks each chunk against), and says how to push the
layouts there with skopeo (which keeps the digests).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

import yaml

from gtvp.core.component_checks import check_component
from gtvp.core.component_signing import ComponentSignatureError, sign
from gtvp.core.policy import PolicyError, PublisherScope, publisher_scopes, revoked_components


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


def _keys(
    args: argparse.Namespace,
) -> tuple[dict[str, str], dict[str, PublisherScope], frozenset[str]]:
    """The publisher keys to verify with, what each may sign (a policy's scopes) and the
    component digests a policy revokes."""
    keys: dict[str, str] = {}
    scopes: dict[str, PublisherScope] = {}
    revoked: set[str] = set()
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
                listed = (doc.get("spec") or {}).get("publisherKeys") or []
                for pk in listed:
                    keys[str(pk.get("name"))] = str(pk.get("publicKey"))
                try:
                    scopes.update(publisher_scopes(listed))
                    revoked |= revoked_components(doc["spec"].get("revokedComponents") or [])
                except PolicyError as exc:
                    raise InputError(f"policy {args.policy}: {exc}") from exc
    if not keys:
        raise InputError("no publisher keys: give --publisher-key NAME=PATH or --policy FILE")
    return keys, scopes, frozenset(revoked)


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
        keys, scopes, revoked = _keys(args)
    except InputError as exc:
        print(f"gtvp component verify: {exc}", file=sys.stderr)
        return 2
    failed = 0
    for obj in comps:
        check = check_component(obj, keys, scopes, revoked)
        spec = obj.get("spec") or {}
        name = (obj.get("metadata") or {}).get("name")
        what = f"{name} ({spec.get('componentName')} {spec.get('version')})"
        if check.ok:
            print(f"{what}: Verified, {check.message}")
        else:
            failed += 1
            print(f"{what}: Failed: {check.reason}: {check.message}")
    return 1 if failed else 0


BUILD_MODULE = "gtvp_local.guest.containerdisk"  # by name: gtvp never imports gtvp_local
BUILD_MISSING = (
    "gtvp component build: not installed here (it builds with gtvp-local, a distribution of "
    "its own, which the operator's image leaves out); from a clone of the gtvp repository: "
    "pip install -e ./local"
)


def run_build(args: argparse.Namespace) -> int:
    if bool(args.key) != bool(args.publisher):
        print("gtvp component build: --key and --publisher go together", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(BUILD_MODULE)
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("gtvp_local"):
            raise
        print(BUILD_MISSING, file=sys.stderr)
        return 2
    rc: int = module.run_build(args)
    return rc


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
    b = csub.add_parser(
        "build",
        help="build gtvp's guest components as containerDisk images (gtvp-local)",
        description=__doc__.split("\n\n")[-1].replace("`", ""),
    )
    b.add_argument("--out", metavar="DIR", help="where the OCI layouts go (default: the cache)")
    b.add_argument(
        "--registry",
        metavar="REPO",
        help="repository the images are pushed to (default: registry.gtvp.local/gtvp-components)",
    )
    b.add_argument("--key", metavar="PEM", help="sign the manifests with this private key")
    b.add_argument("--publisher", metavar="NAME", help="publisher name, as in the SecurityPolicy")
    b.add_argument(
        "--level", type=int, default=3, choices=range(1, 10), metavar="1-9",
        help="the highest box level the components are cleared for (default 3)",
    )  # fmt: skip
    b.set_defaults(func=run_build)
