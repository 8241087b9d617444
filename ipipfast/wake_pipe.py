"""A pipe that wakes a thread asleep in poll(): the daemon's main thread
(woken by the route and config threads, and by signal handlers) and the
reader threads (stopped by the main thread). A thread that woke on a timer
instead, only to see whether to stop, would take a CPU from the packet
loops several times a second for nothing.

A signal handler must not take a lock: it runs in the main thread, between
two of its bytecodes, and the lock can be one that thread holds - as a
threading.Event's is while it enters or leaves wait(). Writing a byte
takes none."""
from __future__ import annotations

import os
import select


class WakePipe:
    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def set(self) -> None:
        try:
            os.write(self._w, b"x")
        except BlockingIOError:
            pass  # full: it is set already

    def clear(self) -> None:
        try:
            while os.read(self._r, 4096):
                pass
        except BlockingIOError:
            pass

    def wait(self, timeout: float | None = None) -> bool:
        """Until set (True) or timeout seconds have passed (False)."""
        poll = select.poll()
        poll.register(self._r, select.POLLIN)
        return bool(poll.poll(None if timeout is None else max(0, int(timeout * 1000) + 1)))

    def wait_for(self, fd: int) -> bool:
        """Until fd is readable (True) or this is set (False)."""
        poll = select.poll()
        poll.register(fd, select.POLLIN)
        poll.register(self._r, select.POLLIN)
        return self._r not in {ready for ready, _ in poll.poll()}

    def fileno(self) -> int:
        """The end to poll (POLLIN), readable once set, with a thread's other descriptors."""
        return self._r

    def fileno_write(self) -> int:
        """The end to write, non-blocking: for signal.set_wakeup_fd, whose
        C-level handler then sets this from any thread."""
        return self._w

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)
