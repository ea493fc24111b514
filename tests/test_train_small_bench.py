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
    assert all(len(times) == 3 and min(times) >= 0 for _, times in runs.values())
