"""bench/dev/ordered_turns_model.py, the deterministic backward's dQ turns under a sliding
window (no GPU): cf_mask.cuh's key range of a query tile and the query walk of a key tile
agree, both orders finish under a random scheduler with few blocks resident, and the
descending order (flash_bwd_sm90_ws.cu's for a window) runs at its longest walk where the
ascending one would run as a wavefront."""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "dev"))
import ordered_turns_model as model  # noqa: E402


def test_key_ranges_and_query_walks_agree():
    rng = random.Random(1)
    for _ in range(400):
        case = model.random_case(rng)
        assert model.ranges_agree(*case) is None, case


def test_every_turn_is_given_without_a_hang():
    rng = random.Random(2)
    for _ in range(150):
        case = model.random_case(rng)
        resident, group = rng.randint(1, 12), rng.choice([1, 2, 4])
        for order in ("ascending", "descending"):
            assert model.run(*case, heads=2, resident=resident, order=order, rng=rng,
                             group=group) is None, (order, case, resident, group)


def test_a_wrong_turn_hangs():
    """The model can fail: the ascending turns with the descending block order (the key
    tiles a tile waits for start after it) hang once few blocks are resident."""
    case = (1024, 1024, 256, 0, 64, 128)
    wrong = model.run_mixed(*case, heads=1, resident=1)
    assert wrong is not None and wrong.startswith("hang")


def test_descending_runs_at_the_longest_walk():
    case = (16384, 16384, 4096, 0, 64, 128)
    assert model.lockstep_steps(*case, heads=1, resident=132, order="descending") == 67
    assert model.lockstep_steps(*case, heads=1, resident=132, order="ascending") > 300
