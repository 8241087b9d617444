"""Builds the Cython extensions: ipipfast._datapath, the node's datapath, and
ipipfast_lab.packets, the tests' and micro benchmarks' entry points into the
same C (it cimports what _datapath exports and includes the same headers).

Switches (as uvloop's build_ext): IPIPFAST_DEBUG=1 builds with -O0 -g and
Cython's bounds checks on; IPIPFAST_ANNOTATE=1 writes the HTML annotation
next to the .pyx (a yellow line there is Python in the hot path).
"""
import os
from glob import glob

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("IPIPFAST_DEBUG") == "1"
ANNOTATE = os.environ.get("IPIPFAST_ANNOTATE") == "1"
INCLUDES = "ipipfast/includes"

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": False,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
}


def extension(name: str, source: str, *depends: str) -> Extension:
    return Extension(
        name, [source], include_dirs=[INCLUDES],
        extra_compile_args=["-O0", "-g"] if DEBUG else ["-O2", "-Wall", "-Wno-unused-function"],
        depends=[*glob(f"{INCLUDES}/*"), "ipipfast/_datapath.pxd", *depends],
    )


setup(ext_modules=cythonize(
    [extension("ipipfast._datapath", "ipipfast/_datapath.pyx", *glob("ipipfast/datapath/*.pyx")),
     extension("ipipfast_lab.packets", "ipipfast_lab/packets.pyx")],
    compiler_directives=directives, annotate=ANNOTATE))
