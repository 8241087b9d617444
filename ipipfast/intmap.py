"""IntMap: a map of int keys to int values that is mostly read and sometimes
changed, as the kernel routes mirrored at 100k entries are: a sorted base
in two arrays (16 bytes an entry, where a dict of Python ints takes ~115)
and a dict of the changes since the base was last rebuilt."""
from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterable, Iterator

_COMPACT_AT = 4096  # changes before the base is rebuilt (plus an eighth of its size)


class IntMap:
    __slots__ = ("keys", "values", "delta", "_len")

    def __init__(self, keys: array | None = None, values: array | None = None) -> None:
        """keys: sorted and distinct ('Q'); values: the same length ('Q', below 2**64)."""
        self.keys = keys if keys is not None else array("Q")
        self.values = values if values is not None else array("Q")
        self.delta: dict[int, int | None] = {}  # key -> value, or None: removed
        self._len = len(self.keys)

    @classmethod
    def of(cls, pairs: Iterable[tuple[int, int]]) -> IntMap:
        keys, values = array("Q"), array("Q")
        for k, v in sorted(pairs):
            keys.append(k)
            values.append(v)
        return cls(keys, values)

    def _base(self, key: int) -> int | None:
        i = bisect.bisect_left(self.keys, key)
        return self.values[i] if i < len(self.keys) and self.keys[i] == key else None

    def get(self, key: int) -> int | None:
        if key in self.delta:
            return self.delta[key]
        return self._base(key)

    def __contains__(self, key: int) -> bool:
        return self.get(key) is not None

    def __len__(self) -> int:
        return self._len

    def __setitem__(self, key: int, value: int) -> None:
        if self.get(key) is None:
            self._len += 1
        self.delta[key] = value
        self._maybe_compact()

    def pop(self, key: int) -> int | None:
        old = self.get(key)
        if old is not None:
            self._len -= 1
            if self._base(key) is None:
                del self.delta[key]
            else:
                self.delta[key] = None
                self._maybe_compact()
        return old

    def items(self) -> Iterator[tuple[int, int]]:
        """In key order."""
        if not self.delta:
            yield from zip(self.keys, self.values)
            return
        changes = sorted(self.delta.items())
        keys, values, n = self.keys, self.values, len(self.keys)
        i = 0
        for key, value in changes:
            while i < n and keys[i] < key:
                yield keys[i], values[i]
                i += 1
            if i < n and keys[i] == key:
                i += 1
            if value is not None:
                yield key, value
        while i < n:
            yield keys[i], values[i]
            i += 1

    def compact(self) -> None:
        """Folds the changes into the base."""
        if self.delta:
            keys, values = array("Q"), array("Q")
            for k, v in self.items():
                keys.append(k)
                values.append(v)
            self.keys, self.values, self.delta = keys, values, {}

    def _maybe_compact(self) -> None:
        if len(self.delta) > _COMPACT_AT + len(self.keys) // 8:
            self.compact()

    def replace(self, keys: array, values: array) -> None:
        """Everything at once (sorted, distinct keys)."""
        self.keys, self.values, self.delta, self._len = keys, values, {}, len(keys)

    def same(self, keys: array, values: array) -> bool:
        """Whether this map is exactly these sorted arrays (compares at C speed)."""
        self.compact()
        return self.keys == keys and self.values == values
