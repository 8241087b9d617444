"""The command line: check-config, and tunnel options overriding the file."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ipipfast.config import ConfigError, load_config

GOOD = """\
node: {ip: 198.18.0.10/24, interface: eth0}
tunnel: {name: t0, mode: CrossSubnet}
routes:
  - {cidr: 198.19.1.0/24, via: 198.18.0.11}
  - {cidr: 198.19.2.0/24, via: 198.18.7.12}
"""
BAD = GOOD.replace("198.19.2.0/24", "198.19.2.5/24")


def ipipfast(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ipipfast", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def write(tmp_path: Path):
    def _write(text: str) -> str:
        p = tmp_path / "node.yaml"
        p.write_text(text)
        return str(p)
    return _write


def test_check_config_ok(write):
    r = ipipfast("check-config", write(GOOD))
    assert r.returncode == 0
    assert "2 routes: 1 encapsulated, 1 direct" in r.stdout and "CrossSubnet" in r.stdout


def test_check_config_names_the_line(write):
    path = write(BAD)
    r = ipipfast("check-config", path)
    assert r.returncode == 1
    assert r.stderr.startswith(f"{path}:5: ") and "198.19.2.0/24" in r.stderr  # the suggestion


def test_check_config_missing_file(tmp_path):
    r = ipipfast("check-config", str(tmp_path / "nope.yaml"))
    assert r.returncode == 1 and "nope.yaml" in r.stderr


OVERRIDES = [
    ("ttl fixed sets pmtudisc", {"ttl": 33}, {"ttl": 33, "pmtudisc": True}),
    ("tos inherit", {"tos": "inherit"}, {"tos": None}),
    ("workers and offload", {"workers": 2, "offload": False}, {"workers": 2, "offload": False}),
    ("ignore_df", {"ignore_df": True}, {"ignore_df": True}),
    ("coalescing off", {"coalesce_us": 0}, {"coalesce_us": 0}),
    ("a bigger receive ring", {"ring_frames": 16384}, {"ring_frames": 16384}),
]


@pytest.mark.parametrize("name,given,want", OVERRIDES, ids=[o[0] for o in OVERRIDES])
def test_command_line_overrides(write, name, given, want):
    tunnel = load_config(write(GOOD), given).tunnel
    assert {k: getattr(tunnel, k) for k in want} == want
    assert tunnel.name == "t0"  # the rest of the section stays


def test_conflicting_override_is_refused(write):
    with pytest.raises(ConfigError, match="conflicts with a fixed ttl"):
        load_config(write(GOOD), {"ttl": 33, "pmtudisc": False})


def test_run_refuses_a_bad_file_before_touching_anything(write):
    path = write(BAD)
    r = ipipfast("run", "--config", path)
    assert r.returncode == 1 and r.stderr.startswith(f"{path}:5: ")
