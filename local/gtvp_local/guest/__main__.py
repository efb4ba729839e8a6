"""`python -m gtvp_local.guest build|boot`.

build [--manifests] [--key PEM --publisher NAME]   build the components, print digests
                                                    (or their OSComponent manifests,
                                                    signed when a key is given)
boot [--box NAME] [--port PORT] [--seconds N]       compose a box from them (hello-web
     [--app-version V]                              at V, else its newest), boot it under
                                                    qemu, show its console
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

from gtvp.core.component_signing import sign
from gtvp.local_state import cache_dir
from gtvp_local.guest.box import compose_box, resolver
from gtvp_local.guest.build import BuildError, build_catalogue, component_manifest, guest_cache
from gtvp_local.guest.initscript import READY_MARKER
from gtvp_local.guest.qemu import Boot, QemuOptions, probe_accel, qemu_argv


def _build(args: argparse.Namespace) -> int:
    catalogue = build_catalogue(cache_dir())
    if not args.manifests:
        for a in catalogue.values():
            print(f"{a.name:14} {a.version:10} {a.type:12} {a.digest} {a.size:>10}  {a.path}")
            for inner, path in sorted(a.files.items()):
                print(f"{'':14} {'':10} {'':12}   {inner} {path}")
        return 0
    key = Path(args.key).read_bytes() if args.key else None
    docs = []
    for a in catalogue.values():
        doc = component_manifest(a)
        if key is not None:
            doc["spec"]["signature"] = sign(doc["spec"], key, args.publisher)
        docs.append(doc)
    sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False))
    return 0


def _boot(args: argparse.Namespace) -> int:
    catalogue = build_catalogue(cache_dir())
    work = guest_cache(cache_dir())
    accel = probe_accel()
    console = work / f"{args.box}.console"
    vm = compose_box(catalogue, box=args.box, app_version=args.app_version)
    opts = QemuOptions(console=console, accel=accel, hostfwd=[(args.port, 8080)])
    argv = qemu_argv(vm, resolver(catalogue), opts)
    print(f"accel {accel}; console {console}\n{' '.join(argv)}", file=sys.stderr)
    with Boot(argv, console) as boot:
        ready = boot.wait_for(READY_MARKER, 60)
        if ready is not None:
            print(
                f"{READY_MARKER} after {ready:.1f}s; http://127.0.0.1:{args.port}/", file=sys.stderr
            )
            time.sleep(args.seconds)
        print(boot.text())
    return 0 if ready is not None else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gtvp_local.guest")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the components and print their digests")
    b.add_argument("--manifests", action="store_true", help="print OSComponent manifests")
    b.add_argument("--key", help="sign the manifests with this PEM private key")
    b.add_argument("--publisher", default="gtvp-demo-publisher")
    r = sub.add_parser("boot", help="compose a box from the components and boot it")
    r.add_argument("--box", default="hello")
    r.add_argument("--port", type=int, default=18080)
    r.add_argument("--seconds", type=float, default=5, help="keep it running this long")
    r.add_argument("--app-version", help="the hello-web version to boot (default: newest)")
    args = parser.parse_args(argv)
    if args.key and not args.manifests:
        parser.error("--key signs manifests: add --manifests")
    try:
        return _build(args) if args.command == "build" else _boot(args)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
