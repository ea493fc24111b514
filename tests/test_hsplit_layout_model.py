"""bench/dev/hsplit_layout_model.py (no GPU): the head-dim split backward's shared-memory
layouts, descriptors, stmatrix stores and epilogue map give NumPy's products for one block
at head_dim 256 and 192, with the descriptor reading checked first on the role split's
measured operands; ordered dQ's key-tile and query-tile ranges are inverses; and swapped
stmatrix row addresses are caught."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "dev"))
import hsplit_layout_model as model  # noqa: E402


def test_products_and_layouts_match_numpy():
    assert model.main() == 0


def test_swapped_row_addresses_are_caught(monkeypatch):
    plain = model.stmatrix_trans

    def swapped(smem, addrs, regs):  # lanes 0 and 1 give each other's row
        plain(smem, [addrs[1], addrs[0], *addrs[2:]], regs)

    monkeypatch.setattr(model, "stmatrix_trans", swapped)
    with pytest.raises(AssertionError, match="P\\^T in shared memory"):
        model.check_hsplit(256, np.random.default_rng(1))


def test_a_turn_range_off_by_one_tile_is_caught(monkeypatch):
    model.check_turn_ranges(200, 200, 80, 64, False, 30, 10)  # the true ranges pass
    monkeypatch.setattr(model, "_cdiv", lambda a, b: -(-a // b) + 1)
    with pytest.raises(AssertionError, match="turns"):
        model.check_turn_ranges(200, 200, 80, 64, False, 30, 10)
