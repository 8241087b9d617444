"""A tunnel's control socket, as wireguard-go's /var/run/wireguard/wg0.sock:
a UNIX stream socket at /run/ipipfast/<tunnel>.sock, owner-only, removed
at exit. Each request is a JSON object on a line, {"get": WHAT}; each reply
is one line, the answer's object or {"error": TEXT}. A connection may ask
again and again until it closes."""
from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from .wake_pipe import WakePipe

log = logging.getLogger(__name__)

RUN_DIR = Path("/run/ipipfast")
CLIENT_IDLE = 30.0  # seconds a connection may stay silent before the daemon drops it


class NoDaemon(OSError):
    """Nothing answers at the socket's path: no file, or a stale one."""


class ControlError(RuntimeError):
    """The daemon answered with an error."""


def socket_path(tunnel: str, run_dir: Path = RUN_DIR) -> Path:
    return run_dir / f"{tunnel}.sock"


class _Handler(socketserver.StreamRequestHandler):
    server: _Server
    timeout = CLIENT_IDLE

    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(json.dumps(self.server.reply(line)).encode() + b"\n")


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True  # a client that holds its connection open never holds up the exit
    block_on_close = False

    def __init__(self, path: str, answers: Mapping[str, Callable[[], dict]]) -> None:
        self.answers = answers
        super().__init__(path, _Handler)

    def reply(self, line: bytes) -> dict:
        try:
            request = json.loads(line)
        except ValueError as e:
            return {"error": f"not JSON: {e}"}
        what = request.get("get") if isinstance(request, dict) else None
        if what not in self.answers:
            return {"error": f'unknown request {line.decode(errors="replace").strip()}; '
                             f'ask {{"get": WHAT}} with WHAT one of {", ".join(sorted(self.answers))}'}
        try:
            return self.answers[what]()
        except Exception as e:  # a failing answer must not end the connection's thread unanswered
            log.exception("control request %r failed", what)
            return {"error": f"{what} failed: {e}"}

    def handle_error(self, request: object, client_address: object) -> None:
        log.debug("control connection ended", exc_info=True)  # idle or gone: nothing to report


class ControlServer:
    """Claims `path` now (an error if a live daemon answers there; a stale
    file is replaced); answers from serve() on; close() removes it."""

    def __init__(self, path: Path, answers: Mapping[str, Callable[[], dict]]) -> None:
        self.path = path
        if not path.parent.exists():
            path.parent.mkdir(mode=0o700, parents=True)
        if _answers(path):
            raise RuntimeError(f"another ipipfast daemon answers at {path}")
        # Bound under a temporary name and renamed once it is 0600, so that
        # nobody else can connect in between, whatever the umask.
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        self._server = _Server(str(tmp), answers)
        try:
            os.chmod(tmp, 0o600)
            os.rename(tmp, path)
        except BaseException:
            self._server.server_close()
            tmp.unlink(missing_ok=True)
            raise
        self._inode = path.stat().st_ino
        self._thread: threading.Thread | None = None
        self._stop: WakePipe | None = None  # made and closed with the thread

    def serve(self) -> None:
        self._stop = WakePipe()
        self._thread = threading.Thread(target=self._serve, args=(self._stop,), name="ipipfast-control", daemon=True)
        self._thread.start()

    def _serve(self, stop: WakePipe) -> None:
        # Asleep until a client connects or close(): serve_forever() would
        # wake every poll_interval to look for a shutdown.
        while stop.wait_for(self._server.fileno()):
            self._server._handle_request_noblock()  # what serve_forever() calls for a ready socket

    def close(self) -> None:
        if self._thread is not None:
            assert self._stop is not None
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._stop.close()
        self._server.server_close()
        try:
            if self.path.stat().st_ino == self._inode:  # not a successor's socket
                self.path.unlink()
        except FileNotFoundError:
            pass


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
    return True


def request(path: Path, what: str, timeout: float = 5.0) -> dict:
    """Asks the daemon at path; raises NoDaemon, or ControlError for an error reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except FileNotFoundError:
            raise NoDaemon(f"no daemon: {path} does not exist") from None
        except ConnectionRefusedError:
            raise NoDaemon(f"no daemon: nothing answers at {path} (a stale socket)") from None
        s.sendall(json.dumps({"get": what}).encode() + b"\n")
        with s.makefile("rb") as f:
            line = f.readline()
    if not line:
        raise ControlError(f"{path}: the daemon closed the connection without an answer")
    reply = json.loads(line)
    if "error" in reply:
        raise ControlError(reply["error"])
    return reply
