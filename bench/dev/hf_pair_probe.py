"""Where the DeepSeek-V3 (latent attention, v of its own head_dim) model's bfloat16 logits on
CUDA differ from float32 eager: per padding side, per batch row, with v padded (copies) and on
the pair kernels (CUFLASH_HEAD_DIM_V_NATIVE), beside eager bfloat16's own error and the bound
tests/test_transformers.py::test_cuda_logits_at_valid_positions applies.

    python bench/dev/hf_pair_probe.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

root = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(root), str(root / "tests")]

import torch  # noqa: E402

import test_transformers as tt  # noqa: E402


def main() -> None:
    which = "deepseekv3-mla"
    for side in ("left", "right"):
        ids, mask = tt._batch(side)
        valid = mask.bool()
        exact = tt._cuda_logits(which, "eager", ids, mask, torch.float32)
        naive = tt._cuda_logits(which, "eager", ids, mask, torch.bfloat16)
        sdpa = tt._cuda_logits(which, "sdpa", ids, mask, torch.bfloat16)
        top = float(exact[valid].abs().max())
        bound = 2 * float((naive - exact)[valid].abs().max()) + 1e-2 * top
        print(f"{side}: max |exact| {top:.3g}, bound {bound:.3g}")
        rows = {"eager bf16": naive, "sdpa bf16": sdpa}
        for native in ("0", "1"):
            os.environ["CUFLASH_HEAD_DIM_V_NATIVE"] = native
            rows[f"cufa native={native}"] = tt._cuda_logits(which, tt.NAME, ids, mask,
                                                            torch.bfloat16)
        for name, got in rows.items():
            per_row = [float((got - exact)[r][valid[r]].abs().max()) for r in range(len(ids))]
            print(f"  {name:18s} max {max(per_row):.4f}  rows " +
                  " ".join(f"{e:.4f}" for e in per_row))


if __name__ == "__main__":
    main()
