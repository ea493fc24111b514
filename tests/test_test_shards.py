"""tests/conftest.py's shards (CUFLASH_TEST_SHARD): every test in exactly one, about evenly."""

from __future__ import annotations

import pytest

try:
    import conftest
except ImportError:  # tests/ collected as a package
    from tests import conftest


def test_every_test_falls_in_exactly_one_shard():
    ids = [f"tests/test_gpu_modifiers.py::test_case[{i}-bfloat16]" for i in range(3000)]
    for m in (1, 3, 10):
        counts = [sum(conftest.in_shard(t, k, m) for t in ids) for k in range(1, m + 1)]
        assert sum(counts) == len(ids)
        assert all(sum(conftest.in_shard(t, k, m) for k in range(1, m + 1)) == 1 for t in ids)
        assert max(counts) <= 1.2 * len(ids) / m, counts  # about even


@pytest.mark.parametrize("text", ["3", "0/4", "5/4", "a/b", "1/0", ""])
def test_bad_shards_are_refused_with_the_variable_named(text):
    with pytest.raises(ValueError, match="CUFLASH_TEST_SHARD"):
        conftest.parse_shard(text)


def test_good_shard_parses():
    assert conftest.parse_shard("3/10") == (3, 10)
