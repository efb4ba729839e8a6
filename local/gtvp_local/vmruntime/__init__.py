"""SIMULATION of KubeVirt's node side (virt-handler / virt-launcher) for the local pool:
members as network namespaces on one bridge, VMs as qemu processes in them, live migration
over the member link. Local pool and tests only; the Helm chart never installs it."""

from gtvp_local.vmruntime.machine import MachineSpec
from gtvp_local.vmruntime.runtime import MigrationResult, Runtime, VmHandle, cleanup, guest_spec

__all__ = ["MachineSpec", "MigrationResult", "Runtime", "VmHandle", "cleanup", "guest_spec"]
