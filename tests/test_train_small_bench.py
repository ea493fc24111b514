"""bench/train_small.py's torch timing loop: every model sees every batch, in rotating order."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import train_small  # noqa: E402


def test_interleaved_steps_rotate_and_see_every_batch():
    order = []

    def step_of(name):
        def step(tokens):
            order.append((name, tokens))
            return 10.0 * tokens + (1 if name == "b" else 0)
        return step

    runs = train_small.train_torch_interleaved({"a": step_of("a"), "b": step_of("b")},
                                               [1, 2, 3], "cpu")
    # batch 0: a then b; batch 1: b then a; batch 2: a then b
    assert order == [("a", 1), ("b", 1), ("b", 2), ("a", 2), ("a", 3), ("b", 3)]
    assert runs["a"][0] == [10.0, 20.0, 30.0]
    assert runs["b"][0] == [11.0, 21.0, 31.0]
    assert all(len(times) == 3 and min(times) >= 0 for _, times, _ in runs.values())
    assert all(opens == [True, True, True] for _, _, opens in runs.values())


def test_blocks_keep_a_models_steps_together_and_rotate():
    order = []

    def step_of(name):
        def step(tokens):
            order.append((name, tokens))
            return float(tokens)
        return step

    runs = train_small.train_torch_interleaved({"a": step_of("a"), "b": step_of("b")},
                                               [1, 2, 3, 4, 5], "cpu", block=2)
    # block 0 (batches 1, 2): a, then b; block 1 (3, 4): b, then a; block 2 (5): a, then b
    assert order == [("a", 1), ("a", 2), ("b", 1), ("b", 2), ("b", 3), ("b", 4),
                     ("a", 3), ("a", 4), ("a", 5), ("b", 5)]
    assert runs["a"][0] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert runs["a"][2] == [True, False, True, False, True]
    summary = train_small.step_summary([9.0, 1.0, 5.0, 2.0, 6.0], runs["a"][2])
    assert summary["median_step_ms"] == 3.5  # 1, 5, 2, 6
    assert summary["median_steady_step_ms"] == 1.5  # 1, 2
    paired = train_small.paired_difference([9.0, 1.0, 5.0], [0.0, 2.0, 4.0])
    assert paired == {"median_ms": 0.0, "slower_fraction": 0.5}


def test_pipelined_blocks_alternate_and_cycle_the_batches():
    order = []

    def step_of(name):
        def step(tokens):
            order.append((name, tokens))
        return step

    out = train_small.train_torch_pipelined({"a": step_of("a"), "b": step_of("b")},
                                            [1, 2], "cpu", block=3, rounds=2)
    # round 0: a's block, then b's; round 1: b first; each block cycles the batches
    assert order == [("a", 1), ("a", 2), ("a", 1), ("b", 1), ("b", 2), ("b", 1),
                     ("b", 1), ("b", 2), ("b", 1), ("a", 1), ("a", 2), ("a", 1)]
    assert set(out) == {"a", "b"} and all(len(t) == 2 and min(t) >= 0 for t in out.values())
