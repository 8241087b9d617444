"""inotify(7) through ctypes, and a watcher that tells when a config file
may have changed.

The watch is on the file's directory, not the file: editors save by
writing a new file and renaming it over the old one (the old inode, and a
watch on it, go away), and a Kubernetes ConfigMap volume swaps a `..data`
symlink. Any of those names changing wakes the daemon, which re-reads the
file and compares its digest, so a false alarm costs one read.
"""
from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Callable
from pathlib import Path

from .wake_pipe import WakePipe

IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
# A write is over at IN_CLOSE_WRITE; a rename or a new symlink lands whole.
CHANGED = IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_ATTRIB
_EVENT = struct.Struct("=iIII")  # wd, mask, cookie, len (then the name, NUL-padded)

_libc = ctypes.CDLL(None, use_errno=True)


class Inotify:
    def __init__(self) -> None:
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd = fd

    def watch(self, path: str | os.PathLike[str], mask: int) -> int:
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch {path}: {os.strerror(err)}")
        return wd

    def read(self) -> list[tuple[int, int, str]]:
        """(watch, mask, name) of each event queued now."""
        try:
            data = os.read(self.fd, 64 * 1024)
        except BlockingIOError:
            return []
        out, off = [], 0
        while off + _EVENT.size <= len(data):
            wd, mask, _, length = _EVENT.unpack_from(data, off)
            name = data[off + _EVENT.size:off + _EVENT.size + length].split(b"\0", 1)[0]
            out.append((wd, mask, os.fsdecode(name)))
            off += _EVENT.size + length
        return out

    def close(self) -> None:
        os.close(self.fd)


class ConfigWatcher:
    """Calls changed() when the config file (or what its name points to) may
    have changed; run() is a thread's body until stop()."""

    def __init__(self, path: str | os.PathLike[str], changed: Callable[[], None]) -> None:
        self.path = Path(path)
        self.changed = changed
        self.inotify = Inotify()
        self.inotify.watch(self.path.parent, CHANGED)
        self._stop = WakePipe()

    def _ours(self, name: str) -> bool:
        return name == self.path.name or name.startswith("..")  # ..data: a ConfigMap's swap

    def run(self) -> None:
        while self._stop.wait_for(self.inotify.fd):
            if any(self._ours(name) for _, _, name in self.inotify.read()):
                self.changed()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.inotify.close()
        self._stop.close()
