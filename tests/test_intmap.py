"""IntMap against a dict, through the changes and compactions a mirror sees."""
import random

import pytest

from ipipfast import intmap
from ipipfast.intmap import IntMap


@pytest.mark.parametrize("seed", range(4))
def test_intmap_behaves_as_a_dict(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(intmap, "_COMPACT_AT", 50)  # compact often, so the base is rebuilt mid-way
    rng = random.Random(seed)
    ref = {rng.getrandbits(38): rng.getrandbits(40) for _ in range(500)}
    m = IntMap.of(ref.items())
    keys = list(ref) + [rng.getrandbits(38) for _ in range(200)]
    for step in range(3000):
        key = rng.choice(keys)
        if rng.random() < 0.4:
            assert m.pop(key) == ref.pop(key, None)
        else:
            ref[key] = value = rng.getrandbits(40)
            m[key] = value
        if step % 250 == 0:
            assert list(m.items()) == sorted(ref.items())
        assert m.get(key) == ref.get(key) and (key in m) == (key in ref) and len(m) == len(ref)
    assert list(m.items()) == sorted(ref.items())
    m.compact()
    assert not m.delta and list(zip(m.keys, m.values)) == sorted(ref.items())
    assert m.same(m.keys, m.values)


def test_replace_takes_arrays_as_they_are() -> None:
    m = IntMap.of([(1, 10), (5, 50)])
    other = IntMap.of([(2, 20), (3, 30)])
    m.replace(other.keys, other.values)
    assert list(m.items()) == [(2, 20), (3, 30)] and len(m) == 2
    m.pop(2)
    m[9] = 90
    assert list(m.items()) == [(3, 30), (9, 90)] and list(other.items()) == [(2, 20), (3, 30)]
