"""Where the DeepSeek-V3 (latent attention, v of its own head_dim) model's bfloat16 logits on
CUDA differ from float32 eager: per padding side, per batch row, with v padded (copies) and on
the pair kernels (CUFLASH_HEAD_DIM_V_NATIVE), beside eager bfloat16's own error and the bound
tests/test_transformers.py::test_cuda_logits_at_valid_positions applies; for the test's
config (a mixture-of-experts layer: a bfloat16 rounding can flip a token's experts) and the
same config with dense layers only.

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


def _cuda_logits(config, impl, ids, mask, dtype):
    model = tt._model(config).to("cuda", dtype)
    return tt._logits(model, impl, ids.cuda(), mask.cuda()).cpu()


def main() -> None:
    for dense in (False, True):
        config = tt.CONFIGS["deepseekv3-mla"]()
        if dense:
            config.first_k_dense_replace = config.num_hidden_layers
        for side in ("left", "right"):
            ids, mask = tt._batch(side)
            valid = mask.bool()
            exact = _cuda_logits(config, "eager", ids, mask, torch.float32)
            top = float(exact[valid].abs().max())
            rows = {"eager bf16": _cuda_logits(config, "eager", ids, mask, torch.bfloat16),
                    "sdpa bf16": _cuda_logits(config, "sdpa", ids, mask, torch.bfloat16)}
            bound = 2 * float((rows["eager bf16"] - exact)[valid].abs().max()) + 1e-2 * top
            print(f"{'dense' if dense else 'moe'} {side}: max |exact| {top:.3g}, "
                  f"bound {bound:.3g}")
            for native in ("0", "1"):
                os.environ["CUFLASH_HEAD_DIM_V_NATIVE"] = native
                rows[f"cufa native={native}"] = _cuda_logits(config, tt.NAME, ids, mask,
                                                             torch.bfloat16)
            for name, got in rows.items():
                per_row = [float((got - exact)[r][valid[r]].abs().max())
                           for r in range(len(ids))]
                print(f"  {name:18s} max {max(per_row):.4f}  rows " +
                      " ".join(f"{e:.4f}" for e in per_row))


if __name__ == "__main__":
    main()
