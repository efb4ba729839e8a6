"""Where gtvp's and KubeVirt's resources live on the API server: group, version, plural, kind.

One place for each coordinate, so that no other module spells `gtvp.io/v1alpha1` or
`kubevirt.io/v1`. Constants only: no I/O, no decisions.
"""

from __future__ import annotations

from dataclasses import dataclass

GTVP_GROUP, GTVP_VERSION = "gtvp.io", "v1alpha1"
KUBEVIRT_GROUP, KUBEVIRT_VERSION = "kubevirt.io", "v1"


@dataclass(frozen=True)
class ApiResource:
    """One resource type: what the custom-objects API and kopf's decorators are called with."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        """`group/version`, as in an object's `apiVersion`."""
        return f"{self.group}/{self.version}"

    @property
    def coordinates(self) -> tuple[str, str, str]:
        """(group, version, plural): the positional arguments of `kopf.on.*`."""
        return (self.group, self.version, self.plural)


GTVP_API_VERSION = f"{GTVP_GROUP}/{GTVP_VERSION}"
KUBEVIRT_API_VERSION = f"{KUBEVIRT_GROUP}/{KUBEVIRT_VERSION}"

MEMBERS = ApiResource(GTVP_GROUP, GTVP_VERSION, "members", "Member", namespaced=False)
SECURITY_POLICIES = ApiResource(
    GTVP_GROUP, GTVP_VERSION, "securitypolicies", "SecurityPolicy", namespaced=False
)
OS_COMPONENTS = ApiResource(
    GTVP_GROUP, GTVP_VERSION, "oscomponents", "OSComponent", namespaced=False
)
LAZY_BOXES = ApiResource(GTVP_GROUP, GTVP_VERSION, "lazyboxes", "LazyBox", namespaced=True)

VIRTUAL_MACHINES = ApiResource(
    KUBEVIRT_GROUP, KUBEVIRT_VERSION, "virtualmachines", "VirtualMachine", namespaced=True
)
VIRTUAL_MACHINE_INSTANCES = ApiResource(
    KUBEVIRT_GROUP,
    KUBEVIRT_VERSION,
    "virtualmachineinstances",
    "VirtualMachineInstance",
    namespaced=True,
)
MIGRATIONS = ApiResource(
    KUBEVIRT_GROUP,
    KUBEVIRT_VERSION,
    "virtualmachineinstancemigrations",
    "VirtualMachineInstanceMigration",
    namespaced=True,
)
