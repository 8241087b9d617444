"""Builds the Cython datapath.

Switches (as uvloop's build_ext): IPIPFAST_DEBUG=1 builds with -O0 -g and
Cython's bounds checks on; IPIPFAST_ANNOTATE=1 writes the HTML annotation
next to the .pyx (a yellow line there is Python in the hot path).
"""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("IPIPFAST_DEBUG") == "1"
ANNOTATE = os.environ.get("IPIPFAST_ANNOTATE") == "1"

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": False,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
}

ext = Extension(
    "ipipfast._datapath",
    ["ipipfast/_datapath.pyx"],
    include_dirs=["ipipfast/includes"],
    extra_compile_args=["-O0", "-g"] if DEBUG else ["-O2", "-Wall", "-Wno-unused-function"],
    depends=[os.path.join("ipipfast/includes", f) for f in os.listdir("ipipfast/includes")],
)

setup(ext_modules=cythonize([ext], compiler_directives=directives, annotate=ANNOTATE))
