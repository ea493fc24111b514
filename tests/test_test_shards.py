"""tests/conftest.py's shards (CUFLASH_TEST_SHARD): every test in one, about evenly, files
whole where they fit."""

from __future__ import annotations

import pytest

try:
    import conftest
except ImportError:  # tests/ collected as a package
    from tests import conftest


def _ids():
    """A suite's shape: one large file, some middling ones, many small ones."""
    ids = [f"tests/test_gpu_modifiers.py::test_case[{i}]" for i in range(700)]
    ids += [f"tests/test_gpu_mid{j}.py::test_x[{i}]" for j in range(8) for i in range(150)]
    ids += [f"tests/test_small{j}.py::test_y[{i}]" for j in range(60) for i in range(20)]
    return ids


def test_every_test_falls_in_one_shard_about_evenly():
    ids = _ids()
    for m in (1, 3, 10):
        shards = conftest.shard_of_each(ids, m)
        assert len(shards) == len(ids) and set(shards) <= set(range(1, m + 1))
        counts = [shards.count(k) for k in range(1, m + 1)]
        assert max(counts) <= 1.25 * len(ids) / m, counts  # about even


def test_files_within_a_share_stay_whole_and_shards_are_stable():
    ids = _ids()
    shards = conftest.shard_of_each(ids, 10)
    assert shards == conftest.shard_of_each(list(ids), 10)
    for path in {nodeid.split("::")[0] for nodeid in ids} - {"tests/test_gpu_modifiers.py"}:
        assert len({j for nodeid, j in zip(ids, shards) if nodeid.startswith(path)}) == 1
    big = {j for nodeid, j in zip(ids, shards) if "modifiers" in nodeid}
    assert len(big) == 10  # larger than a share: dealt out test by test


@pytest.mark.parametrize("text", ["3", "0/4", "5/4", "a/b", "1/0", ""])
def test_bad_shards_are_refused_with_the_variable_named(text):
    with pytest.raises(ValueError, match="CUFLASH_TEST_SHARD"):
        conftest.parse_shard(text)


def test_good_shard_parses():
    assert conftest.parse_shard("3/10") == (3, 10)
