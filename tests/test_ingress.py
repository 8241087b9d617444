"""The tc ingress drop's loader: bpf(2)'s number per architecture."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ipipfast import ingress


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc for the C library's SYS_bpf")
def test_the_syscall_number_is_the_c_librarys(tmp_path: Path) -> None:
    """The oracle: SYS_bpf from this machine's own <sys/syscall.h>."""
    src = tmp_path / "nr.c"
    src.write_text('#include <stdio.h>\n#include <sys/syscall.h>\nint main(void) { printf("%d", SYS_bpf); }\n')
    subprocess.run(["gcc", "-o", str(tmp_path / "nr"), str(src)], check=True)
    expected = int(subprocess.run([str(tmp_path / "nr")], capture_output=True, text=True, check=True).stdout)
    assert ingress.bpf_syscall_number() == expected


def test_an_unknown_architecture_is_refused_by_name() -> None:
    with pytest.raises(OSError, match="'sparc64'"):
        ingress.bpf_syscall_number("sparc64")
    assert ingress.bpf_syscall_number("aarch64") == 280  # asm-generic's table, not x86_64's 321
