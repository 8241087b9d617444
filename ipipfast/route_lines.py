"""The routes section of a config read line by line, when it is written in
the forms yaml.safe_dump and people write:

    routes:                                      routes:
      - {cidr: 198.19.1.0/24, via: 198.18.0.11}  - cidr: 198.19.1.0/24
                                                   via: 198.18.0.11

(either key first, dotted quads as ipaddress takes them, comments after a
space, blank and comment lines). libyaml's events alone take ~7 us a route
(six events, each a Python object with two marks); this reads 100k routes
in a fraction of that, converting the addresses in bulk. Anything else in
the section - another form, a tab, a value out of range - and the caller
reads the file through YAML as a whole. The caller also reads the rest of
the file through YAML, with the section blanked to `routes: []` (line
numbers kept), and checks that it is the top-level block mapping's `routes`
key: only then are these the routes YAML would read.
"""
from __future__ import annotations

import re
import socket
import sys
from array import array
from typing import NamedTuple

from .routes import key_of, loop_problem, mask_of, unicast_problem

_OCTET = r"(?:0|[1-9][0-9]?|1[0-9][0-9]|2[0-4][0-9]|25[0-5])"
_ADDR = rf"({_OCTET}(?:\.{_OCTET}){{3}})"
_CIDR = rf"{_ADDR}(?:/([0-9]|[12][0-9]|3[0-2]))?"
_END = r"(?: +#.*)? *"  # a comment needs a space before its '#': "1.2.3.4#x" is one scalar
_HEADS = re.compile(r"^routes:" + _END + "$", re.M)
_SKIP = re.compile(r" *(?:#.*)?")
# Groups: indent, then address and prefix length of the cidr, and the via, in the order written.
_FLOW_CV = re.compile(rf"( *)- +\{{ *cidr: +{_CIDR} *, *via: +{_ADDR} *\}}{_END}")
_FLOW_VC = re.compile(rf"( *)- +\{{ *via: +{_ADDR} *, *cidr: +{_CIDR} *\}}{_END}")
_FIRST_C = re.compile(rf"( *)- +cidr: +{_CIDR}{_END}")
_FIRST_V = re.compile(rf"( *)- +via: +{_ADDR}{_END}")
_SECOND_C = re.compile(rf"( *)cidr: +{_CIDR}{_END}")
_SECOND_V = re.compile(rf"( *)via: +{_ADDR}{_END}")


CHUNK = 4096  # routes whose addresses are converted together: few strings alive at once


class Cut(NamedTuple):
    remainder: str  # the text with the section blanked to `routes: []`
    line: int       # of the `routes:` key (1-based)
    keys: array
    vias: array
    lines: array      # each route's cidr line
    via_lines: array


def _ints(addresses: list[str]) -> array:
    """Dotted quads (already checked by the regexes) as host-order ints, at C speed."""
    out = array("I")
    out.frombytes(b"".join(map(socket.inet_aton, addresses)))
    if sys.byteorder == "little":
        out.byteswap()
    return out


def _key_column(line: str) -> int:
    """Where the first key of "  - key: ..." starts: the second key must start there too."""
    return len(line) - len(line.lstrip(" -"))


class _Reader:
    """The section's lines one at a time (a list of 200k lines, or of their
    values, would be 200k small objects at once, spread over the allocator's
    arenas for good)."""

    def __init__(self, text: str, pos: int, line: int) -> None:
        self.text, self.pos, self.line = text, pos, line  # line: 0-based number of the line at pos

    def peek(self, skip: int = 0) -> str | None:
        pos = self.pos
        for _ in range(skip):
            pos = self.text.find("\n", pos)
            if pos < 0:
                return None
            pos += 1
        if pos >= len(self.text):
            return None
        end = self.text.find("\n", pos)
        return self.text[pos:] if end < 0 else self.text[pos:end]

    def advance(self, lines: int) -> None:
        for _ in range(lines):
            end = self.text.find("\n", self.pos)
            self.pos = len(self.text) if end < 0 else end + 1
            self.line += 1


def cut(text: str) -> Cut | None:
    if "\t" in text or "\r" in text:
        return None
    heads = list(_HEADS.finditer(text))
    if len(heads) != 1:
        return None
    head = heads[0]
    head_line = text.count("\n", 0, head.start())
    r = _Reader(text, head.end() + 1, head_line + 1)
    keys, via_ints = array("Q"), array("I")
    cidr_lines, via_lines = array("Q"), array("I")
    nets: list[str] = []
    plens: list[str] = []
    vias: list[str] = []
    distinct: dict[str, int] = {}
    indent = -1
    while (line := r.peek()) is not None:
        if line and line[0] not in " -#":
            break  # the next top-level key: the section ends
        at = r.line
        if m := _FLOW_CV.fullmatch(line):
            net, plen, via, via_at, step = m[2], m[3], m[4], at, 1
        elif m := _FLOW_VC.fullmatch(line):
            via, net, plen, via_at, step = m[2], m[3], m[4], at, 1
        elif (m := _FIRST_C.fullmatch(line)) and (m2 := _SECOND_V.fullmatch(r.peek(1) or "")) \
                and len(m2[1]) == _key_column(line):  # the second key in the column of the first
            net, plen, via, via_at, step = m[2], m[3], m2[2], at + 1, 2
        elif (m := _FIRST_V.fullmatch(line)) and (m2 := _SECOND_C.fullmatch(r.peek(1) or "")) \
                and len(m2[1]) == _key_column(line):
            via, net, plen, via_at, at, step = m[2], m2[2], m2[3], at, at + 1, 2
        elif _SKIP.fullmatch(line):
            r.advance(1)
            continue
        else:
            return None
        if indent != len(m[1]):
            if indent >= 0:
                return None  # entries of one sequence share their indentation
            indent = len(m[1])
        nets.append(net)
        plens.append(plen or "32")
        vias.append(via)
        cidr_lines.append(at + 1)
        via_lines.append(via_at + 1)
        r.advance(step)
        if len(nets) == CHUNK:
            if not _convert(nets, plens, vias, distinct, keys, via_ints):
                return None
    if not _convert(nets, plens, vias, distinct, keys, via_ints) or not keys:
        return None
    blank = "\n" * (r.line - head_line - 1)
    remainder = text[:head.start()] + "routes: []\n" + blank + text[r.pos:]
    return Cut(remainder, head_line + 1, keys, via_ints, cidr_lines, via_lines)


def _convert(nets: list[str], plens: list[str], vias: list[str], distinct: dict[str, int],
             keys: array, via_ints: array) -> bool:
    """Appends a chunk's routes to keys and via_ints, and empties the lists;
    False if a route is one the config refuses (host bits, a via that is
    not unicast or inside its CIDR): YAML's reader has the words for it."""
    new = [v for v in set(vias) if v not in distinct]
    distinct.update(zip(new, _ints(new)))
    if any(unicast_problem(distinct[v], "via") for v in new):
        return False
    chunk = array("I", map(distinct.__getitem__, vias))
    for net, plen, via in zip(_ints(nets), map(int, plens), chunk):
        if net & mask_of(plen) != net or loop_problem(net, plen, via):
            return False
        keys.append(key_of(net, plen))
    via_ints.extend(chunk)
    nets.clear()
    plens.clear()
    vias.clear()
    return True
