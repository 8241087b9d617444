"""A real Prometheus server on a testbed host, scraping daemons there:
Debian's `prometheus`, never its service, started by PID inside a namespace
and listening on a testbed address, with its config and TSDB in a per-run
temporary directory that goes with it. Its HTTP API is asked from inside
the same namespace (a short client process per request), since nothing in
the root namespace may talk to the testbed."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

import yaml

from .daemons import wait_until
from .testbed import NsRef, Testbed

PROMETHEUS = "prometheus"
# Runs inside the namespace: GET argv[1], print the body; an HTTP error's
# body is printed too (the API explains itself there), with a non-zero exit.
CLIENT = """
import sys, urllib.error, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy from the environment
try:
    print(opener.open(sys.argv[1], timeout=5).read().decode(), end="")
except urllib.error.HTTPError as e:
    print(e.read().decode(), end="")
    sys.exit(1)
except OSError as e:
    print(e, file=sys.stderr)
    sys.exit(2)
"""


class PrometheusServer:
    """Prometheus in `ns` on `listen` (host:port), scraping `targets`
    (host:port, /metrics) every `interval` as job `job`; use as a context
    manager, or close() it. Stopped and its directory removed at close even
    when the block fails; the testbed kills it at teardown in any case."""

    def __init__(self, tb: Testbed, ns: NsRef, listen: str, targets: list[str], interval: str = "250ms",
                 job: str = "ipipfast") -> None:
        if shutil.which(PROMETHEUS) is None:
            raise FileNotFoundError("prometheus is not installed (Debian package prometheus)")
        self.tb, self.ns, self.listen = tb, ns, listen
        self.dir = Path(tempfile.mkdtemp(prefix=f"{tb.prefix}-prometheus-"))
        config = self.dir / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": interval, "scrape_timeout": interval},
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}],
        }))
        self.log_path = self.dir / "prometheus.log"
        self._log = open(self.log_path, "wb")
        self.proc = tb.popen(ns, [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={self.dir / 'tsdb'}",
                                  f"--web.listen-address={listen}", "--log.level=warn"],
                             stdout=self._log, stderr=subprocess.STDOUT, cwd=self.dir)

    def __enter__(self) -> PrometheusServer:
        try:
            self.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, path: str, **params: str) -> tuple[bool, str]:
        """(whether it answered 2xx, the body) for GET path?params."""
        url = f"http://{self.listen}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        r = self.tb.run(self.ns, [sys.executable, "-c", CLIENT, url], check=False, timeout=30)
        return r.returncode == 0, r.stdout

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited {self.proc.returncode}:\n{self.log()}")
            return self.get("/-/ready")[0]
        wait_until(ready, timeout, "prometheus ready")

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector expr evaluates to now: [{"metric": labels,
        "value": [time, "value"]}, ...]."""
        ok, body = self.get("/api/v1/query", query=expr)
        answer = json.loads(body) if body.startswith("{") else {"error": body}
        if not ok or answer.get("status") != "success":
            raise RuntimeError(f"query {expr!r}: {answer.get('error', body)}")
        return answer["data"]["result"]

    def wait_value(self, expr: str, accept: Any = lambda v: True, timeout: float = 30) -> dict[str, Any]:
        """The first sample of expr once it has one whose value accept() takes."""
        def sample() -> dict[str, Any] | None:
            return next((s for s in self.query(expr) if accept(float(s["value"][1]))), None)
        return wait_until(sample, timeout, f"a value of {expr}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
