"""The package as a user installs it: a plain `pip install` of the checkout
into a fresh venv (the build's requirements from the index, in pip's
isolated build environment), then `ipipfast demo` run from a directory
outside the checkout, so that nothing is imported from the source tree.
The venv reuses this environment's installed packages for the
dependencies, to stay quick; ipipfast itself comes from the venv only."""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.online,
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="the demo needs root for network namespaces, TUN and AF_PACKET"),
    pytest.mark.skipif(shutil.which("git") is None, reason="needs git to list the checkout's files"),
]


def _source(dest: Path) -> Path:
    """The checkout's files as a clone has them (tracked, and new ones not
    ignored), without builds: pip builds in the tree it is given."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=CHECKOUT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        if (CHECKOUT / name).is_file():  # not deleted in the work tree
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(CHECKOUT / name, dest / name)
    return dest


def test_a_plain_install_runs_the_demo(tmp_path: Path) -> None:
    src, venv, elsewhere = _source(tmp_path / "src"), tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env, timeout=120)
    python = venv / "bin" / "python"
    # This environment's packages after the venv's own (a .pth of plain
    # paths: their own .pth files, such as an editable ipipfast's, stay unread).
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True, env=env).stdout.strip()
    reused = [p for p in site.getsitepackages() if Path(p).is_dir()]
    Path(purelib, "_reuse_test_environment.pth").write_text("".join(p + "\n" for p in reused))

    r = subprocess.run([python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", str(src)],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    where = subprocess.run(
        [python, "-c", "import json, ipipfast, ipipfast_lab, ipipfast._datapath, ipipfast_lab.packets as p\n"
                       "print(json.dumps([m.__file__ for m in (ipipfast, ipipfast_lab, ipipfast._datapath, p)]))"],
        capture_output=True, text=True, check=True, cwd=elsewhere, env=env).stdout
    for path in json.loads(where):
        assert Path(path).is_relative_to(purelib), path

    r = subprocess.run([venv / "bin" / "ipipfast", "demo", "--megabytes", "1"], capture_output=True, text=True,
                       cwd=elsewhere, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "the traffic crossed the tunnel both ways" in r.stdout and r.stdout.rstrip().endswith("torn down")
