"""A real Linux kernel IPIP peer for interop tests: a stock Debian kernel in QEMU.

The host kernel has no ``ipip`` module, so tests that need a kernel ``tunl0`` on
the other end boot Debian's kernel under QEMU (TCG) with a tiny busybox
initramfs.  The VM's virtio NIC sits on a TAP device inside a network namespace
that the caller owns; nothing touches the root namespace.

Typical use::

    art = ensure_artifacts()                      # KernelVMUnavailable -> skip
    create_tap(ns, tap, "198.18.0.1", 24)
    with KernelVM(ns, tap, "198.18.0.2", 24, artifacts=art) as vm:
        rc, out = vm.sh("uname -r")
        vm.setup_ipip(pod_ip="198.19.2.2",
                      remote_routes=[("198.19.1.0/24", "198.18.0.1")])
        vm.ping("198.19.1.5", src="198.19.2.2")

Command channel: a second serial port (ttyS1) bridged to a unix socket; the
guest runs each command in its own session with a guest-side timeout and sends
back the output (base64) and the exit code.  The kernel console (ttyS0) goes to
``<rundir>/console.log``.
"""

from __future__ import annotations

import base64
import ctypes
import dataclasses
import fcntl
import hashlib
import json
import lzma
import os
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "Artifacts",
    "KernelVM",
    "KernelVMError",
    "KernelVMUnavailable",
    "create_tap",
    "ensure_artifacts",
    "in_netns",
    "netns_socket",
]

HERE = Path(__file__).resolve().parent / "kernelvm"
INIT_TEMPLATE = HERE / "init.sh"
PRELUDE = HERE / "prelude.sh"

#: Modules the guest needs; their dependencies come from modules.dep (for
#: Debian 6.1: virtio_pci_legacy_dev virtio_pci_modern_dev virtio_ring virtio
#: virtio_pci failover net_failover virtio_net tunnel4 ip_tunnel ipip dummy).
GUEST_MODULES = ("virtio_pci", "virtio_net", "ipip", "dummy")

#: host binary -> Debian package that provides it
HOST_TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "busybox": "busybox-static",
    "depmod": "kmod",
    "ip": "iproute2",
    "iperf3": "iperf3",
    "dpkg-deb": "dpkg",
}

#: bump when the initramfs layout changes
_INITRAMFS_FORMAT = 1
XZ_MAGIC = b"\xfd7zXZ\x00"


class KernelVMUnavailable(RuntimeError):
    """QEMU or the guest kernel cannot be had on this machine (tests skip)."""

    @property
    def reason(self) -> str:
        return str(self)


class KernelVMError(RuntimeError):
    """The VM failed to boot, died, or a command channel broke."""


# --------------------------------------------------------------------------
# artifacts


@dataclasses.dataclass(frozen=True)
class Artifacts:
    kernel_version: str
    vmlinux: Path  # uncompressed ELF, booted through PVH
    initramfs: Path  # uncompressed newc cpio
    qemu: Path
    accel: tuple[str, ...]  # QEMU accelerator/CPU arguments


def default_cache_dir() -> Path:
    env = os.environ.get("IPIPFAST_KERNELVM_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "ipipfast" / "kernelvm"


def _run(cmd: Sequence[str], cwd: Path | None = None, timeout: float = 900) -> str:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
    p = subprocess.run(
        list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if p.returncode != 0:
        raise KernelVMUnavailable(
            f"{' '.join(cmd)} failed (rc {p.returncode}): {(p.stderr or p.stdout).strip()[-800:]}"
        )
    return p.stdout


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def _ensure_host_tools() -> dict[str, Path]:
    missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if not _which(tool)})
    if missing:
        if os.geteuid() != 0:
            raise KernelVMUnavailable(f"need Debian packages {missing} and not root to install them")
        if not _which("apt-get"):
            raise KernelVMUnavailable(f"need Debian packages {missing} and no apt-get")
        install = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
        try:
            _run(install)
        except KernelVMUnavailable:
            _run(["apt-get", "update"])
            _run(install)
    tools: dict[str, Path] = {}
    for tool in HOST_TOOLS:
        found = _which(tool)
        if not found:
            raise KernelVMUnavailable(f"{tool} still missing after installing {HOST_TOOLS[tool]}")
        tools[tool] = Path(found)
    return tools


def _kernel_package() -> str:
    def lookup() -> str | None:
        out = subprocess.run(
            ["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True
        ).stdout
        m = re.search(r"Depends:\s*(linux-image-\d\S*)", out)
        return m.group(1) if m else None

    pkg = lookup()
    if pkg is None:
        _run(["apt-get", "update"])
        pkg = lookup()
    if pkg is None:
        raise KernelVMUnavailable("apt-cache finds no versioned package behind linux-image-amd64")
    return pkg


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The uncompressed ELF kernel inside a bzImage whose payload is xz."""
    start = 0
    while (off := bzimage.find(XZ_MAGIC, start)) >= 0:
        start = off + 1
        try:
            data = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[off:])
        except lzma.LZMAError:
            continue
        if data[:4] == b"\x7fELF":
            return data
    raise KernelVMUnavailable("no xz-compressed ELF payload found in the kernel image")


def _parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """module name -> (relative path, [dependency names])"""
    out: dict[str, tuple[str, list[str]]] = {}

    def name(p: str) -> str:
        base = p.rsplit("/", 1)[-1].split(".ko", 1)[0]
        return base.replace("-", "_")

    for line in text.splitlines():
        if ":" not in line:
            continue
        path, deps = line.split(":", 1)
        out[name(path)] = (path, [name(d) for d in deps.split()])
    return out


def _module_load_order(dep: dict[str, tuple[str, list[str]]], wanted: Sequence[str]) -> list[str]:
    order: list[str] = []

    def visit(m: str, stack: tuple[str, ...]) -> None:
        if m in order:
            return
        if m in stack:
            raise KernelVMUnavailable(f"module dependency cycle at {m}")
        if m not in dep:
            raise KernelVMUnavailable(f"module {m} not in modules.dep")
        for d in dep[m][1]:
            visit(d, stack + (m,))
        order.append(m)

    for w in wanted:
        visit(w, ())
    return order


def _fetch_kernel(cache: Path) -> Path:
    """Download + unpack the kernel; returns cache/<version> holding vmlinux,
    modules/*.ko and manifest.json."""
    pkg = _kernel_package()
    version = pkg.removeprefix("linux-image-")
    kdir = cache / version
    if (kdir / "manifest.json").exists():
        return kdir
    work = Path(tempfile.mkdtemp(prefix="fetch-", dir=cache))
    try:
        _run(["apt-get", "download", pkg], cwd=work)
        debs = sorted(work.glob("*.deb"))
        if not debs:
            raise KernelVMUnavailable(f"apt-get download {pkg} produced no .deb")
        tree = work / "tree"
        _run(["dpkg-deb", "-x", str(debs[0]), str(tree)])
        debs[0].unlink()
        mods = next((p for p in (tree / "lib/modules" / version, tree / "usr/lib/modules" / version) if p.is_dir()), None)
        vmlinuz = next((p for p in (tree / "boot" / f"vmlinuz-{version}",) if p.exists()), None)
        if mods is None or vmlinuz is None:
            raise KernelVMUnavailable(f"{pkg} has no modules dir or vmlinuz for {version}")
        _run(["depmod", "-b", str(mods.parent.parent.parent), version])
        dep = _parse_modules_dep((mods / "modules.dep").read_text())
        builtin: set[str] = set()
        if (mods / "modules.builtin").exists():
            builtin = set(_parse_modules_dep(
                "".join(f"{line}:\n" for line in (mods / "modules.builtin").read_text().split())))
        order = _module_load_order(dep, [w for w in GUEST_MODULES if w not in builtin])
        stage = work / "out"
        (stage / "modules").mkdir(parents=True)
        for m in order:
            src = mods / dep[m][0]
            if not src.name.endswith(".ko"):
                raise KernelVMUnavailable(f"compressed module {src.name} not supported")
            shutil.copyfile(src, stage / "modules" / f"{m}.ko")
        (stage / "vmlinux").write_bytes(extract_vmlinux(vmlinuz.read_bytes()))
        (stage / "manifest.json").write_text(
            json.dumps({"version": version, "package": pkg, "modules": order}, indent=1) + "\n"
        )
        if kdir.exists():
            shutil.rmtree(kdir)
        stage.rename(kdir)
        return kdir
    finally:
        shutil.rmtree(work, ignore_errors=True)


class _Cpio:
    """Minimal newc (SVR4, no CRC) archive writer."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.ino = 1
        self.seen: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.lstrip("/")
        if name in self.seen:
            return
        self.seen.add(name)
        nb = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data),
                  0, 0, rdev[0], rdev[1], len(nb), 0]
        self.ino += 1
        hdr = b"070701" + b"".join(b"%08x" % f for f in fields)
        self.parts.append(hdr + nb + b"\0" * (-(len(hdr) + len(nb)) % 4))
        self.parts.append(data + b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self._entry("/".join(parts[:i]), stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.dir(os.path.dirname(name.strip("/")) or ".")
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def to_bytes(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self.parts)


def _shared_libs(binary: Path) -> list[Path]:
    p = subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
    if p.returncode != 0:  # static
        return []
    libs = []
    for line in p.stdout.splitlines():
        m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if m:
            libs.append(Path(m.group(1)))
    return libs


def _build_initramfs(kdir: Path, manifest: dict, tools: dict[str, Path]) -> Path:
    binaries = {"/bin/busybox": tools["busybox"], "/sbin/ip": tools["ip"], "/bin/iperf3": tools["iperf3"]}
    h = hashlib.sha256()
    h.update(f"{_INITRAMFS_FORMAT}\n{json.dumps(manifest, sort_keys=True)}\n".encode())
    h.update(INIT_TEMPLATE.read_bytes() + PRELUDE.read_bytes())
    for dst, src in sorted(binaries.items()):
        st = src.resolve().stat()
        h.update(f"{dst}={src.resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    out = kdir / f"initramfs-{h.hexdigest()[:16]}.cpio"
    if out.exists():
        return out

    c = _Cpio()
    for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "run", "root", "etc/kernelvm", "lib/modules"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3)
    c.file("init", INIT_TEMPLATE.read_bytes(), 0o755)
    c.file("etc/kernelvm/prelude.sh", PRELUDE.read_bytes())
    c.file("etc/kernelvm/modules", ("\n".join(manifest["modules"]) + "\n").encode())
    for m in manifest["modules"]:
        c.file(f"lib/modules/{m}.ko", (kdir / "modules" / f"{m}.ko").read_bytes())
    c.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    c.file("etc/group", b"root:x:0:\n")
    for dst, src in binaries.items():
        c.file(dst, src.resolve().read_bytes(), 0o755)
        for lib in _shared_libs(src):
            c.file(str(lib), lib.resolve().read_bytes(), 0o755)
    applets = subprocess.run([str(tools["busybox"]), "--list"], capture_output=True, text=True).stdout.split()
    for a in applets:
        if f"/bin/{a}" not in binaries and f"/sbin/{a}" not in binaries and a != "busybox":
            c.symlink(f"bin/{a}", "busybox")
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(c.to_bytes())
    for old in kdir.glob("initramfs-*.cpio"):
        old.unlink()
    tmp.rename(out)
    return out


def _accel_args() -> tuple[str, ...]:
    want = os.environ.get("IPIPFAST_KERNELVM_ACCEL", "auto")
    normal_kvm = (
        os.path.exists("/dev/kvm")
        and not os.path.exists("/sys/module/kvm_pvm")  # paravirtual KVM: far slower than TCG
        and re.search(r"\b(vmx|svm)\b", Path("/proc/cpuinfo").read_text()) is not None
    )
    if want == "kvm" or (want == "auto" and normal_kvm):
        return ("-accel", "kvm", "-cpu", "host")
    return ("-accel", "tcg,thread=multi", "-cpu", "max")


def ensure_artifacts(cache_dir: Path | None = None) -> Artifacts:
    """Install QEMU & tools, fetch the Debian kernel, build the initramfs.

    Idempotent; when everything is cached it neither calls apt nor touches the
    network.  Raises KernelVMUnavailable with a reason when impossible."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KernelVMUnavailable(f"cannot create cache dir {cache}: {e}") from e
    try:
        with open(cache / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            tools = _ensure_host_tools()
            cached = sorted(
                (p.parent for p in cache.glob("*/manifest.json")), key=lambda p: p.stat().st_mtime
            )
            kdir = cached[-1] if cached else _fetch_kernel(cache)
            manifest = json.loads((kdir / "manifest.json").read_text())
            initramfs = _build_initramfs(kdir, manifest, tools)
    except (OSError, subprocess.SubprocessError, ValueError, KeyError) as e:
        raise KernelVMUnavailable(f"building kernel VM artifacts failed: {e!r}") from e
    return Artifacts(
        kernel_version=manifest["version"],
        vmlinux=kdir / "vmlinux",
        initramfs=initramfs,
        qemu=tools["qemu-system-x86_64"],
        accel=_accel_args(),
    )


# --------------------------------------------------------------------------
# network namespace helpers (host side)

_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


@contextmanager
def in_netns(netns: str) -> Iterator[None]:
    """Run the calling thread inside /run/netns/<netns> for the block.

    Sockets created inside stay in that namespace after the block ends."""
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(back)
    finally:
        os.close(back)


def netns_socket(netns: str, family: int, type: int, proto: int = 0) -> socket.socket:
    """A socket that lives in the given namespace (usable from any thread)."""
    with in_netns(netns):
        return socket.socket(family, type, proto)


def create_tap(netns: str, ifname: str, address: str | None = None, prefixlen: int = 24,
               mtu: int | None = None) -> int:
    """Create a persistent TAP inside netns (QEMU attaches to it by name), up,
    optionally addressed; also brings the namespace's lo up.  Returns ifindex."""
    from pyroute2 import IPRoute  # only the host side needs pyroute2

    with IPRoute(netns=netns) as ipr:
        ipr.link("add", ifname=ifname, kind="tuntap", mode="tap", no_pi=True)
        idx = ipr.link_lookup(ifname=ifname)[0]
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")
        if mtu is not None:
            ipr.link("set", index=idx, mtu=mtu)
        if address is not None:
            ipr.addr("add", index=idx, address=address, prefixlen=prefixlen)
        ipr.link("set", index=idx, state="up")
        return idx


# --------------------------------------------------------------------------
# the VM


def _pdeathsig() -> None:
    _libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: QEMU dies with us


def _stop(proc: subprocess.Popen, rundir: str | None, keep: bool) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    if rundir and not keep:
        shutil.rmtree(rundir, ignore_errors=True)


class KernelVM:
    """A Debian kernel in QEMU whose eth0 is the TAP ``tap`` in ``netns``.

    Boots on ``start()`` / ``__enter__``; ``close()`` kills QEMU (by PID) and
    removes its run directory.  The TAP itself belongs to the caller (QEMU
    creates a transient one if ``tap`` does not exist in ``netns``).  QEMU gets
    PR_SET_PDEATHSIG, so it also dies with the thread that started it.
    Set IPIPFAST_KERNELVM_KEEP=1 to keep the run directory (console.log,
    qemu.log) for debugging."""

    def __init__(self, netns: str, tap: str, vm_ip: str, prefixlen: int,
                 gateway: str | None = None, *, artifacts: Artifacts | None = None,
                 mac: str | None = None, memory_mb: int = 512, boot_timeout: float = 120,
                 name: str = "kernelvm") -> None:
        self.netns, self.tap, self.vm_ip, self.prefixlen = netns, tap, vm_ip, prefixlen
        self.gateway, self.mac, self.memory_mb = gateway, mac, memory_mb
        self.boot_timeout, self.name = boot_timeout, name
        self.artifacts = artifacts
        self.proc: subprocess.Popen | None = None
        self.rundir: Path | None = None
        self.boot_seconds: float | None = None
        self._sock: socket.socket | None = None
        self._buf = b""
        self._next_id = 1
        self._finalizer: weakref.finalize | None = None

    # -- lifecycle
    def __enter__(self) -> KernelVM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def console_log(self) -> Path | None:
        return self.rundir / "console.log" if self.rundir else None

    def start(self) -> KernelVM:
        if self.proc is not None:
            raise KernelVMError("already started")
        art = self.artifacts or ensure_artifacts()
        self.artifacts = art
        self.rundir = Path(tempfile.mkdtemp(prefix="ipipfast-kvm-"))
        sock_path = self.rundir / "cmd.sock"
        nonce = os.urandom(6).hex()
        append = f"console=ttyS0 quiet panic=-1 ipipfast.ip={self.vm_ip}/{self.prefixlen} ipipfast.name={self.name} ipipfast.nonce={nonce}"
        if self.gateway:
            append += f" ipipfast.gw={self.gateway}"
        if self.mac is None:  # random, so several VMs can share one L2 segment
            self.mac = "52:54:00:" + ":".join(f"{b:02x}" for b in os.urandom(3))
        nic = f"virtio-net-pci,netdev=n0,mac={self.mac}"
        cmd = [
            "ip", "netns", "exec", self.netns,
            str(art.qemu), "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            *art.accel, "-m", str(self.memory_mb), "-smp", "1",
            "-kernel", str(art.vmlinux), "-initrd", str(art.initramfs), "-append", append,
            "-serial", f"file:{self.rundir / 'console.log'}",
            "-chardev", f"socket,id=cmd,path={sock_path},server=on,wait=on",
            "-serial", "chardev:cmd",
            "-netdev", f"tap,id=n0,ifname={self.tap},script=no,downscript=no",
            "-device", nic,
        ]
        t0 = time.monotonic()
        log = open(self.rundir / "qemu.log", "wb")
        try:
            # `ip netns exec` execs QEMU in place: proc.pid is QEMU's PID.
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, preexec_fn=_pdeathsig)
        finally:
            log.close()
        self._finalizer = weakref.finalize(self, _stop, self.proc, str(self.rundir),
                                           bool(os.environ.get("IPIPFAST_KERNELVM_KEEP")))
        try:
            deadline = t0 + self.boot_timeout
            while True:
                self._check_alive()
                if sock_path.exists():
                    try:
                        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                        s.connect(str(sock_path))
                        self._sock = s
                        break
                    except OSError:
                        s.close()
                if time.monotonic() > deadline:
                    raise KernelVMError("QEMU never opened its command socket")
                time.sleep(0.02)
            self._read_until(lambda line: line == f"@@READY {nonce}", deadline, "boot")
            self.boot_seconds = time.monotonic() - t0
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._finalizer is not None:
            self._finalizer()  # kill QEMU by PID, remove the run dir
            self._finalizer = None

    # -- command channel
    def _diag(self) -> str:
        parts = []
        for f in ("qemu.log", "console.log"):
            p = self.rundir / f if self.rundir else None
            if p and p.exists():
                parts.append(f"--- {f} (tail)\n" + p.read_text(errors="replace")[-2000:])
        return "\n".join(parts)

    def _check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            rc = self.proc.returncode if self.proc else None
            raise KernelVMError(f"QEMU exited (rc {rc})\n{self._diag()}")

    def _readline(self, deadline: float, what: str) -> str:
        while b"\n" not in self._buf:
            if self._sock is None:
                raise KernelVMError("VM is closed")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"kernel VM: timed out waiting for {what}\n{self._diag()}")
            r, _, _ = select.select([self._sock], [], [], min(left, 0.5))
            if not r:
                self._check_alive()
                continue
            data = self._sock.recv(65536)
            if not data:
                self._check_alive()
                raise KernelVMError(f"command channel closed\n{self._diag()}")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode(errors="replace").strip("\r")

    def _read_until(self, pred: Callable[[str], bool], deadline: float, what: str) -> str:
        while True:
            line = self._readline(deadline, what)
            if pred(line):
                return line

    def sh(self, cmd: str, timeout: float = 30, check: bool = False) -> tuple[int, str]:
        """Run a busybox-sh script in the VM; returns (exit code, stdout+stderr).

        The guest kills the command's whole session after ``timeout`` s (exit
        code 137).  ``ip`` is the real iproute2; background jobs (``&``) keep
        running after the command returns."""
        if self._sock is None:
            raise KernelVMError("VM is not running")
        cid = self._next_id
        self._next_id += 1
        b64 = base64.b64encode(cmd.encode()).decode()
        if len(b64) > 3500:  # the guest tty reads one line; keep it well under 4 KiB
            raise ValueError("command too long for the serial channel")
        tmo = max(1, int(timeout + 0.999))
        self._sock.sendall(f"{cid} {tmo} {b64}\n".encode())
        deadline = time.monotonic() + tmo + 15
        self._read_until(lambda line: line == f"@@B {cid}", deadline, f"command {cmd!r}")
        chunks = []
        while True:
            line = self._readline(deadline, f"output of {cmd!r}")
            if line.startswith(f"@@E {cid} "):
                rc = int(line.split()[2])
                break
            chunks.append(line.strip())
        out = base64.b64decode("".join(chunks)).decode(errors="replace")
        if check and rc != 0:
            raise KernelVMError(f"VM command {cmd!r} failed with rc {rc}:\n{out}")
        return rc, out

    def run(self, cmd: str, timeout: float = 30) -> str:
        """sh() that raises on non-zero exit; returns the output."""
        return self.sh(cmd, timeout=timeout, check=True)[1]

    def spawn(self, cmd: str) -> int:
        """Start ``cmd`` in the background (output to /tmp/bg.<pid>.log); returns its guest PID."""
        out = self.run(f"({cmd}) >/tmp/bg.log.new 2>&1 </dev/null & p=$!; mv /tmp/bg.log.new /tmp/bg.$p.log; echo $p")
        return int(out.split()[-1])

    def kill(self, pid: int, sig: str = "TERM") -> None:
        self.sh(f"kill -{sig} {pid}")

    # -- conveniences
    def receive_tcp(self, ns: str, dst: str, port: int, data: bytes) -> tuple[int, str]:
        """Sends data from namespace ns to a busybox nc listening in the VM
        on dst:port; returns (bytes received, their md5) as the VM saw them."""
        pid = self.spawn(f"nc -l -p {port} > /tmp/rx")
        deadline = time.monotonic() + 15
        while True:
            s = netns_socket(ns, socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(15)
            try:
                s.connect((dst, port))
                break
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        with s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        rc, out = self.sh(f"while kill -0 {pid} 2>/dev/null; do sleep 0.1; done; wc -c < /tmp/rx; "
                          "md5sum /tmp/rx; rm -f /tmp/rx", timeout=30)
        if rc != 0:
            raise KernelVMError(f"receiving in the VM failed: {out}")
        size, digest = out.split()[:2]
        return int(size), digest

    def ping(self, dst: str, count: int = 1, src: str | None = None, wait: int = 2) -> bool:
        """busybox ping from the VM; True when at least one reply came back."""
        opt = f"-I {src} " if src else ""
        rc, _ = self.sh(f"ping -c {count} -W {wait} {opt}{dst}", timeout=count * wait + 10)
        return rc == 0

    def setup_ipip(self, *, remote_routes: Sequence[tuple[str, str]] = (),
                   pod_ip: str | None = None, tunnel_ip: str | None = None,
                   dev: str = "tunl0", local: str | None = None, remote: str | None = None,
                   ttl: int | str | None = None, tos: int | str | None = None,
                   pmtudisc: bool | None = None, mtu: int | None = None,
                   pod_dev: str = "pod0") -> None:
        """Make the VM a Calico-like IPIP node.

        ``dev="tunl0"`` uses the kernel's fallback device (``remote any local
        any ttl inherit nopmtudisc`` unless options are given); any other name
        creates ``ip tunnel add <dev> mode ipip`` with local/remote/ttl/tos/
        [no]pmtudisc.  ``tunnel_ip`` goes on the tunnel device as a /32 (as
        Calico does); ``pod_ip`` goes as a /32 on a dummy device ``pod_dev`` and
        stands for a pod behind the node.  Each (cidr, node) in
        ``remote_routes`` becomes ``cidr via node dev <dev> onlink``."""
        opts = []
        if local is not None:
            opts.append(f"local {local}")
        if remote is not None:
            opts.append(f"remote {remote}")
        if ttl is not None:
            opts.append(f"ttl {ttl}")
        if tos is not None:
            opts.append(f"tos {tos}")
        if pmtudisc is not None:
            opts.append("pmtudisc" if pmtudisc else "nopmtudisc")
        script = ["set -e", "sysctl -qw net.ipv4.ip_forward=1",
                  "sysctl -qw net.ipv4.conf.all.rp_filter=0",
                  "sysctl -qw net.ipv4.conf.default.rp_filter=0"]
        if dev == "tunl0":
            if opts:
                script.append(f"ip tunnel change tunl0 mode ipip {' '.join(opts)}")
        else:
            verb = f"$(ip link show {dev} >/dev/null 2>&1 && echo change || echo add)"
            script.append(f"ip tunnel {verb} {dev} mode ipip {' '.join(opts)}")
        if mtu is not None:
            script.append(f"ip link set {dev} mtu {mtu}")
        script.append(f"ip link set {dev} up")
        script.append(f"sysctl -qw net.ipv4.conf.{dev}.rp_filter=0")
        if tunnel_ip:
            script.append(f"ip addr replace {tunnel_ip}/32 dev {dev}")
        if pod_ip:
            script.append(f"ip link show {pod_dev} >/dev/null 2>&1 || ip link add {pod_dev} type dummy")
            script.append(f"ip addr replace {pod_ip}/32 dev {pod_dev}")
            script.append(f"ip link set {pod_dev} up")
        for cidr, via in remote_routes:
            script.append(f"ip route replace {cidr} via {via} dev {dev} onlink")
        self.run("\n".join(script))

