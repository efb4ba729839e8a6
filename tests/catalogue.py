"""Test catalogues: OSComponent objects signed by a publisher key made for the test run.

`Publisher().component(...)` returns an OSComponent object as `kubectl apply` would send
it, signed over gtvp's canonical encoding; `synthetic(n)` builds a large catalogue with
realistic shape (kernels, rootfs, libraries with version ranges, applications) for the
benchmarks.
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from gtvp.core import component_signing

PUBLISHER = "test-publisher"


def dep_list(items: list[str] | None) -> list[dict[str, str]]:
    """'openssl>=3.0' -> {'name': 'openssl', 'versions': '>=3.0'}; ranges may have commas."""
    out = []
    for item in items or []:
        m = re.match(r"^([a-z0-9][-a-z0-9.]*?)([<>=!].*)?$", item)
        assert m, item
        out.append({"name": m.group(1), "versions": m.group(2) or ""})
    return out


class Publisher:
    def __init__(self, name: str = PUBLISHER) -> None:
        self.name = name
        self.key = ed25519.Ed25519PrivateKey.generate()

    @property
    def private_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def public_pem(self) -> str:
        return (
            self.key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )

    @property
    def keys(self) -> dict[str, str]:
        return {self.name: self.public_pem}

    def component(
        self,
        name: str,
        version: str,
        kind: str = "library",
        *,
        requires: list[str] | None = None,
        provides: list[str] | None = None,
        conflicts: list[str] | None = None,
        size: int = 1_000_000,
        level: int = 3,
        max_uses: int | None = None,
        registry: str = "registry.example.com/gtvp-test",
    ) -> dict[str, Any]:
        digest = "sha256:" + hashlib.sha256(f"{name}-{version}".encode()).hexdigest()
        spec: dict[str, Any] = {
            "componentName": name,
            "version": version,
            "type": kind,
            "image": f"{registry}/{name}@{digest}",
            "digest": digest,
            "sizeBytes": size,
            "requires": dep_list(requires),
            "provides": list(provides or []),
            "conflicts": dep_list(conflicts),
            "level": level,
        }
        if max_uses is not None:
            spec["maxUses"] = max_uses
        spec["signature"] = component_signing.sign(spec, self.private_pem, self.name)
        obj_name = f"{name}-{version}".replace(".", "-").replace("+", "-").lower()
        return {
            "apiVersion": "gtvp.io/v1alpha1",
            "kind": "OSComponent",
            "metadata": {"name": obj_name},
            "spec": spec,
        }

    def web_catalogue(self) -> list[dict[str, Any]]:
        """The shape of crds/samples/oscomponents.yaml, signed by this publisher."""
        c = self.component
        return [
            c("linux", "6.1.112", "kernel", provides=["kernel", "initrd"], size=14_000_000),
            c("linux", "6.6.52", "kernel", provides=["kernel", "initrd"], size=15_500_000),
            c(
                "debian-minimal",
                "12.7.0",
                "rootfs",
                requires=["kernel>=6.1"],
                provides=["rootfs"],
                size=95_000_000,
            ),
            c(
                "alpine-minimal",
                "3.20.3",
                "rootfs",
                requires=["kernel>=6.1"],
                provides=["rootfs"],
                conflicts=["glibc"],
                size=8_000_000,
            ),
            c("glibc", "2.36.0", requires=["rootfs"], provides=["libc"], size=12_000_000),
            c("openssl", "3.0.14", requires=["libc"], size=7_000_000),
            c("openssl", "3.3.2", requires=["libc"], size=7_400_000),
            c("nginx", "1.22.1", "application", requires=["openssl>=3.0", "libc"], size=3_500_000),
            c("nginx", "1.26.2", "application", requires=["openssl>=3.3", "libc"], size=3_700_000),
        ]


def synthetic(publisher: Publisher, n: int, seed: int = 7) -> list[dict[str, Any]]:
    """About `n` components: 4 kernels, 6 rootfs, libraries and applications in versions."""
    rnd = random.Random(seed)  # noqa: S311 - reproducible test data, not secrets
    out = [
        publisher.component(
            "linux",
            f"6.{m}.{rnd.randint(1, 120)}",
            "kernel",
            provides=["kernel", "initrd"],
            size=15_000_000,
        )
        for m in (1, 6, 8, 12)
    ]
    out += [
        publisher.component(
            f"rootfs-{i}",
            "1.0.0",
            "rootfs",
            requires=["kernel>=6.1"],
            provides=["rootfs"],
            size=60_000_000,
        )
        for i in range(6)
    ]
    libs: list[str] = []
    per_name = 4
    while len(out) < n:
        i = len(libs)
        name = f"lib{i}"
        deps = [f"{d}>=1.1" for d in rnd.sample(libs, min(len(libs), 2))] if libs else ["rootfs"]
        for v in range(per_name):
            if len(out) >= n:
                break
            kind = "application" if i % 10 == 9 else "library"
            out.append(
                publisher.component(
                    name, f"1.{v}.0", kind, requires=deps, size=rnd.randint(1, 20) * 1_000_000
                )
            )
        libs.append(name)
    return out
