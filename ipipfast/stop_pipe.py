"""A thread's way out of poll(): the reader threads of the kernel's
notifications and of the config's directory sleep in poll() on their own fd
and on this pipe, which stop() writes to."""
from __future__ import annotations

import os
import select


class StopPipe:
    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_CLOEXEC)

    def wait(self, fd: int) -> bool:
        """Blocks until fd is readable (True) or stop() was called (False)."""
        poll = select.poll()
        poll.register(fd, select.POLLIN)
        poll.register(self._r, select.POLLIN)
        return self._r not in {ready for ready, _ in poll.poll()}

    def stop(self) -> None:
        os.write(self._w, b"x")

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)
