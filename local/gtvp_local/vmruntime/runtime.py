"""SIMULATION of KubeVirt's virt-handler / virt-launcher for the local pool: VMs as real
qemu processes in their member's network namespace, live-migrated over the member link.

State under `<state>/vmruntime/`: `vms/<vm>.json` (member, generation, machine spec),
`consoles/<vm>.log` (the serial console, one file across migrations), `pids/` and `logs/`
(a ProcessTable of its own, so every qemu carries the mark `<state>/vmruntime` and a
cleanup finds strays by it), and the member network (`network.py`).

A machine with a TPM (`MachineSpec.tpm`: the composed boxes) gets its own vTPM: an swtpm
per qemu process (`<process>.tpm` in the same table, state in `tpm/<process>/`, control
socket beside the QMP socket), manufactured for a fresh start with `swtpm_setup
--create-ek-cert` by the runtime's vTPM CA (`vtpm-ca/`, a `SwtpmCA` of its own, not the
members' CA: `vtpm_ca_pem` is what a SecurityPolicy trusts for box EKs). A migration
target's swtpm starts empty before its qemu: qemu carries the TPM state in the migration
stream; the source's swtpm stops with the source's qemu. Every swtpm stops with its VM.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gtvp_local import swtpm
from gtvp_local.processes import ProcessTable, Tracked, stop_pid, strays
from gtvp_local.vmruntime import guest, names, network
from gtvp_local.vmruntime.machine import QEMU, MachineSpec, in_netns, qemu_argv, tcp_uri
from gtvp_local.vmruntime.qmp import Qmp, QmpError

SUN_PATH_MAX = 107
_IP = shutil.which("ip") or "/usr/sbin/ip"


@dataclass(frozen=True)
class VmHandle:
    vm: str
    member: str
    netns: str
    address: str
    generation: int
    process: Tracked
    qmp: Path
    console: Path


@dataclass(frozen=True)
class MigrationResult:
    status: str  # "completed" or "failed"
    source: str
    target: str
    total_ms: float
    downtime_ms: float | None = None
    ram_bytes: int = 0
    link_bytes: int = 0
    reason: str = ""

    @property
    def completed(self) -> bool:
        return self.status == "completed"


def runtime_dir(state: Path) -> Path:
    return state / "vmruntime"


def socket_dir(state: Path) -> Path:
    """Where QMP sockets live: under the state when the path fits a unix socket address,
    else a short `/tmp/gtvpvm-<hash>` directory named after the state."""
    own = runtime_dir(state) / "qmp"
    if len(str(own)) + 1 + 60 <= SUN_PATH_MAX:
        return own
    digest = hashlib.sha256(str(state.resolve()).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"{names.PREFIX}-{digest}"


def vtpm_ca(state: Path) -> swtpm.SwtpmCA:
    """The CA that certifies the EKs of this runtime's vTPMs (distinct from the members')."""
    return swtpm.SwtpmCA(runtime_dir(state) / "vtpm-ca")


def vtpm_ca_pem(state: Path) -> str:
    """The vTPM CA's issuing intermediate and root, PEM (a SecurityPolicy's vTPM CA bundle);
    the CA is created on first use."""
    ca = vtpm_ca(state).ensure()
    if not (ca.dir / "issuercert.pem").exists():  # swtpm_localca makes its CA on first issue
        swtpm.manufacture(ca.dir / "first-issue", ca, "the vTPM CA's first TPM")
        shutil.rmtree(ca.dir / "first-issue", ignore_errors=True)
    return ca.bundle_pem()


def tpm_process_name(vm: str, generation: int) -> str:
    """The swtpm of one qemu process of `vm`."""
    return f"{names.process_name(vm, generation)}.tpm"


_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def probe_accel(spec: MachineSpec, *, timeout: float = 25.0, binary: str = QEMU) -> str:
    """ "kvm" when a tiny KVM start reaches the guest's init (its console shows GTVP-READY),
    "tcg" otherwise (no /dev/kvm; nested virtualisation may fail at start). The answer is
    cached per boot in `<cache>/vmruntime/accel.json`; GTVP_VM_ACCEL forces one."""
    forced = os.environ.get("GTVP_VM_ACCEL")
    if forced in ("kvm", "tcg"):
        return forced
    if not Path("/dev/kvm").exists():
        return "tcg"
    cache = guest.vm_cache() / "accel.json"
    boot = _BOOT_ID.read_text().strip() if _BOOT_ID.exists() else ""
    with contextlib.suppress(OSError, ValueError, KeyError):
        data = json.loads(cache.read_text())
        if data["boot_id"] == boot and data["accel"] in ("kvm", "tcg"):
            return str(data["accel"])
    accel = "tcg"
    with tempfile.TemporaryDirectory(prefix=f"{names.PREFIX}-probe-") as tmp:
        console, qmp = Path(tmp) / "console", Path(tmp) / "qmp"
        argv = qemu_argv(
            spec, name="gtvpvm-probe", accel="kvm", qmp=qmp, console=console, binary=binary
        )
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and proc.poll() is None:
                if console.exists() and guest.READY in console.read_text(errors="replace"):
                    accel = "kvm"
                    break
                time.sleep(0.1)
        finally:
            proc.kill()
            proc.wait()
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"boot_id": boot, "accel": accel}))
    return accel


def guest_spec(memory_mib: int = 128) -> MachineSpec:
    """The runtime's own test guest (kernel fetched and initramfs built on first use)."""
    return MachineSpec(
        kernel=guest.ensure_kernel(), initrd=guest.ensure_initramfs(), memory_mib=memory_mib
    )


class Runtime:
    def __init__(self, state: Path, *, accel: str | None = None, binary: str = QEMU) -> None:
        self.state = state
        self.dir = runtime_dir(state)
        self.table = ProcessTable(self.dir)
        self.binary = binary
        self._accel = accel

    # --- records -------------------------------------------------------------------------

    def _record_path(self, vm: str) -> Path:
        return self.dir / "vms" / f"{names.sanitize(vm, 60)}.json"

    def _record(self, vm: str) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self._record_path(vm).read_text())
        except (OSError, ValueError) as exc:
            raise KeyError(f"no VM {vm!r} in {self.dir}") from exc
        return data

    def vm_record(self, vm: str) -> dict[str, Any]:
        """The VM's record (member, generation, machine spec as JSON); KeyError without one."""
        return self._record(vm)

    def _write(self, vm: str, record: Mapping[str, Any]) -> None:
        path = self._record_path(vm)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
        tmp.replace(path)

    def _qmp_path(self, vm: str, generation: int) -> Path:
        return socket_dir(self.state) / f"{names.process_name(vm, generation)}.qmp"

    def _tpm_socket(self, vm: str, generation: int) -> Path:
        return socket_dir(self.state) / f"{names.process_name(vm, generation)}.tpm"

    def _tpm_state(self, vm: str, generation: int) -> Path:
        return self.dir / "tpm" / names.process_name(vm, generation)

    def tpm_running(self, vm: str, generation: int) -> bool:
        """Whether the swtpm of `vm`'s qemu process `generation` runs."""
        t = self.table.get(tpm_process_name(vm, generation))
        return t is not None and t.alive()

    def _start_tpm(self, vm: str, generation: int, *, manufacture: bool) -> Path:
        """A fresh swtpm for one qemu process (manufactured by the vTPM CA, or empty for
        a migration target); its control socket."""
        self._stop_tpm(vm, generation)
        state, ctrl = self._tpm_state(vm, generation), self._tpm_socket(vm, generation)
        state.mkdir(parents=True, exist_ok=True)
        if manufacture:
            swtpm.manufacture(state, vtpm_ca(self.state), vm)
        name = tpm_process_name(vm, generation)
        tracked = self.table.start(name, swtpm.vm_tpm_argv(state, ctrl))
        deadline = time.monotonic() + 10
        while not ctrl.exists():
            if not tracked.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the vTPM of {vm} did not start: {self.table.log_tail(name)}")
            time.sleep(0.02)
        return ctrl

    def _stop_tpm(self, vm: str, generation: int) -> bool:
        ran = self.table.stop(tpm_process_name(vm, generation), timeout=5)
        with contextlib.suppress(FileNotFoundError):
            self._tpm_socket(vm, generation).unlink()
        shutil.rmtree(self._tpm_state(vm, generation), ignore_errors=True)
        return ran

    def console_path(self, vm: str) -> Path:
        return self.dir / "consoles" / f"{names.sanitize(vm, 60)}.log"

    def vms(self) -> list[str]:
        found = []
        for p in sorted((self.dir / "vms").glob("*.json")):
            with contextlib.suppress(OSError, ValueError, KeyError):
                found.append(str(json.loads(p.read_text())["vm"]))
        return found

    def accel(self, spec: MachineSpec) -> str:
        if self._accel is None:
            self._accel = probe_accel(spec, binary=self.binary)
        return self._accel

    def handle(self, vm: str) -> VmHandle | None:
        try:
            rec = self._record(vm)
        except KeyError:
            return None
        net = network.member_net(self.state, rec["member"])
        gen = int(rec["generation"])
        tracked = self.table.get(names.process_name(vm, gen))
        if net is None or tracked is None:
            return None
        return VmHandle(
            vm,
            rec["member"],
            net.netns,
            net.address,
            gen,
            tracked,
            self._qmp_path(vm, gen),
            self.console_path(vm),
        )

    # --- lifecycle -----------------------------------------------------------------------

    def _spawn(
        self, vm: str, generation: int, net: network.MemberNet, spec: MachineSpec, accel: str,
        *, incoming: str | None = None,
    ) -> tuple[Tracked, Path]:  # fmt: skip
        qmp = self._qmp_path(vm, generation)
        qmp.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            qmp.unlink()
        console = self.console_path(vm)
        console.parent.mkdir(parents=True, exist_ok=True)
        tpm = self._start_tpm(vm, generation, manufacture=incoming is None) if spec.tpm else None
        argv = qemu_argv(
            spec,
            name=vm,
            accel=accel,
            qmp=qmp,
            console=console,
            incoming=incoming,
            binary=self.binary,
            address=net.address,
            tpm_socket=tpm,
        )
        tracked = self.table.start(
            names.process_name(vm, generation), in_netns(net.netns, argv, ip=_IP)
        )
        return tracked, qmp

    def start(self, vm: str, member: str, spec: MachineSpec) -> VmHandle:
        """Start `vm` on `member` (its qemu in the member's namespace)."""
        current = self.handle(vm)
        if current is not None and current.process.alive():
            raise RuntimeError(f"VM {vm} already runs on {current.member}")
        net = network.ensure_member(self.state, member)
        accel = self.accel(spec)
        generation = 0 if current is None else current.generation + 1
        if current is not None:  # a VM that ended by itself: forget its process
            self.stop(vm)
        with contextlib.suppress(FileNotFoundError):
            self.console_path(vm).unlink()  # a fresh start, a fresh console
        tracked, qmp = self._spawn(vm, generation, net, spec, accel)
        self._write(
            vm,
            {
                "vm": vm,
                "member": member,
                "generation": generation,
                "accel": accel,
                "spec": spec.to_json(),
            },
        )
        try:
            Qmp.connect(qmp, alive=tracked.alive).close()
        except ConnectionError as exc:
            log = self.table.log_tail(names.process_name(vm, generation))
            raise RuntimeError(f"VM {vm} did not start on {member}: {exc}\n{log}") from exc
        handle = self.handle(vm)
        if handle is None:
            raise RuntimeError(f"VM {vm}: its record was removed while it started")
        return handle

    def running(self, vm: str) -> bool:
        h = self.handle(vm)
        return h is not None and h.process.alive()

    def console(self, vm: str) -> str:
        try:
            return self.console_path(vm).read_text(errors="replace")
        except OSError:
            return ""

    def ready(self, vm: str) -> bool:
        """The guest reached its init: the console shows GTVP-READY."""
        return guest.READY in self.console(vm)

    def wait_ready(self, vm: str, timeout: float = 60.0) -> float:
        """Seconds until `ready(vm)`; TimeoutError (with the console's tail) otherwise."""
        t0 = time.monotonic()
        while not self.ready(vm):
            if not self.running(vm):
                raise RuntimeError(f"VM {vm} exited before it was ready:\n{self._tail(vm)}")
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"VM {vm} not ready after {timeout:.0f}s:\n{self._tail(vm)}")
            time.sleep(0.1)
        return time.monotonic() - t0

    def _tail(self, vm: str) -> str:
        return "\n".join(self.console(vm).splitlines()[-10:])

    def qmp(self, vm: str) -> Qmp:
        h = self.handle(vm)
        if h is None or not h.process.alive():
            raise RuntimeError(f"VM {vm} does not run")
        return Qmp.connect(h.qmp, alive=h.process.alive)

    def stop(self, vm: str) -> bool:
        """Stop the VM's qemu (and any half-made migration target); True if it ran."""
        ran = False
        with contextlib.suppress(KeyError):
            gen = int(self._record(vm)["generation"])
            for g in (gen, gen + 1):
                ran = self.table.stop(names.process_name(vm, g), timeout=5) or ran
                with contextlib.suppress(FileNotFoundError):
                    self._qmp_path(vm, g).unlink()
                self._stop_tpm(vm, g)
        with contextlib.suppress(FileNotFoundError):
            self._record_path(vm).unlink()
        return ran

    # --- migration -----------------------------------------------------------------------

    def migrate(
        self,
        vm: str,
        target_member: str,
        timeout: float = 120.0,
        *,
        max_bandwidth: int | None = None,
        on_progress: Callable[[Mapping[str, Any]], None] | None = None,
        spec: MachineSpec | None = None,
    ) -> MigrationResult:
        """Live-migrate `vm` to `target_member` over the member link.

        A target qemu with the same machine starts in the target's namespace and waits
        (`-incoming defer`, then `migrate-incoming tcp:<target ip>:<port>`); the source runs
        `migrate` and is polled with `query-migrate` (each answer goes to `on_progress`).
        Completed: the source is stopped and the target is the VM's process. Failed
        (qemu's error, the target gone, or `timeout` → `migrate_cancel`): the target is
        stopped, the source keeps running, the result carries qemu's reason.
        `max_bandwidth` (bytes/s) limits this migration only. `spec`: the same machine with
        the target's own files (its component cache), else the source's spec.
        """
        h = self.handle(vm)
        if h is None or not h.process.alive():
            raise RuntimeError(f"VM {vm} does not run")
        if target_member == h.member:
            raise ValueError(f"VM {vm} already runs on {target_member}")
        rec = self._record(vm)
        spec = spec or MachineSpec.from_json(rec["spec"])
        source_net = network.ensure_member(self.state, h.member)
        target_net = network.ensure_member(self.state, target_member)
        gen = h.generation + 1
        target_name = names.process_name(vm, gen)
        t0 = time.monotonic()

        def failed(reason: str) -> MigrationResult:
            self.table.stop(target_name, timeout=5)
            with contextlib.suppress(FileNotFoundError):
                self._qmp_path(vm, gen).unlink()
            self._stop_tpm(vm, gen)
            return MigrationResult(
                "failed",
                h.member,
                target_member,
                (time.monotonic() - t0) * 1000,
                reason=reason,
            )

        target, target_qmp = self._spawn(
            vm, gen, target_net, spec, str(rec["accel"]), incoming="defer"
        )
        try:
            with Qmp.connect(target_qmp, alive=target.alive) as tq:
                uri = self._listen(tq, target_net.address, names.migration_port(vm))
        except (ConnectionError, QmpError, OSError) as exc:
            return failed(f"target did not start: {exc}; {self.table.log_tail(target_name, 3)}")

        rx0, _ = source_net.link_bytes()
        try:
            info = self._run_source(h, uri, timeout, max_bandwidth, on_progress)
        except (ConnectionError, OSError, QmpError) as exc:
            alive = "runs" if h.process.alive() else "is gone"
            return failed(f"the source's QMP failed ({exc}); the source {alive}")
        except BaseException:  # on_progress raised, or an interrupt: leave no target behind
            failed("interrupted")
            raise
        rx1, _ = source_net.link_bytes()
        status = info.get("status")
        if status != "completed":
            reason = str(info.get("error-desc") or f"migration {status}")
            if not target.alive():
                reason += " (the target's qemu is gone)"
            return failed(reason)
        self.table.stop(names.process_name(vm, h.generation), timeout=5)
        with contextlib.suppress(FileNotFoundError):
            h.qmp.unlink()
        self._stop_tpm(vm, h.generation)
        rec.update(member=target_member, generation=gen, spec=spec.to_json())
        self._write(vm, rec)
        ram = info.get("ram") or {}
        return MigrationResult(
            "completed",
            h.member,
            target_member,
            float(info.get("total-time", (time.monotonic() - t0) * 1000)),
            downtime_ms=None if info.get("downtime") is None else float(info["downtime"]),
            ram_bytes=int(ram.get("transferred", 0)),
            link_bytes=rx1 - rx0,
        )

    @classmethod
    def _run_source(
        cls,
        h: VmHandle,
        uri: str,
        timeout: float,
        max_bandwidth: int | None,
        on_progress: Callable[[Mapping[str, Any]], None] | None,
    ) -> dict[str, Any]:
        """`migrate` on the source, polled to its end; a completed source is told to quit
        (it is paused in `postmigrate`), a failed one keeps running."""
        with Qmp.connect(h.qmp, alive=h.process.alive) as sq:
            before = sq.execute("query-migrate-parameters")
            if max_bandwidth is not None:
                sq.execute("migrate-set-parameters", {"max-bandwidth": max_bandwidth})
            try:
                sq.execute("migrate", {"uri": uri})
                info = cls._poll(sq, timeout, on_progress)
            finally:
                with contextlib.suppress(QmpError, OSError):
                    sq.execute("migrate-set-parameters", {"max-bandwidth": before["max-bandwidth"]})
            if info.get("status") == "completed":
                with contextlib.suppress(QmpError, OSError):
                    sq.execute("quit")
            return info

    @staticmethod
    def _listen(tq: Qmp, address: str, port: int) -> str:
        """`migrate-incoming` on the first free port from `port` (in the target's netns)."""
        for p in range(port, port + 20):
            uri = tcp_uri(address, p)
            try:
                tq.execute("migrate-incoming", {"uri": uri})
            except QmpError as exc:
                if re.search(r"in use|bind", exc.desc, re.IGNORECASE):
                    continue
                raise
            return uri
        raise ConnectionError(f"no free migration port on {address} from {port}")

    @staticmethod
    def _poll(
        sq: Qmp, timeout: float, on_progress: Callable[[Mapping[str, Any]], None] | None
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        cancelled = False
        while True:
            info: dict[str, Any] = sq.execute("query-migrate")
            if on_progress is not None:
                on_progress(info)
            status = info.get("status")
            if status in ("completed", "failed", "cancelled"):
                if cancelled and status == "cancelled":
                    info["error-desc"] = f"timed out after {timeout:.0f}s (cancelled)"
                return info
            if not cancelled and time.monotonic() > deadline:
                sq.execute("migrate_cancel")
                cancelled = True
            time.sleep(0.05)

    # --- cleanup -------------------------------------------------------------------------

    def cleanup(self) -> list[str]:
        return cleanup(self.state)


def cleanup(state: Path) -> list[str]:
    """Remove every leftover of the runtime under `state`: its qemu processes (tracked or
    strays carrying its mark), QMP sockets, VM records, member namespaces, veths and (once
    unused) the bridge. Returns what it removed."""
    rdir = runtime_dir(state)
    removed: list[str] = []
    table = ProcessTable(rdir)
    for t in table.all():
        if table.stop(t.name, timeout=5):
            removed.append(f"process {t.name}")
    known = {t.pid for t in table.all()}
    if rdir.exists():
        for pid in strays(rdir, known):
            stop_pid(pid, timeout=5)
            removed.append(f"stray pid {pid}")
    sockets = socket_dir(state)
    for pattern in ("*.qmp", "*.tpm"):
        for sock in sockets.glob(pattern) if sockets.is_dir() else ():
            sock.unlink(missing_ok=True)
    shutil.rmtree(rdir / "tpm", ignore_errors=True)
    if sockets.is_dir() and not any(sockets.iterdir()):
        sockets.rmdir()
    for rec in (rdir / "vms").glob("*.json") if (rdir / "vms").is_dir() else ():
        rec.unlink(missing_ok=True)
    removed += network.teardown(state)
    return removed
