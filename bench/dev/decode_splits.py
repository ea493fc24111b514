"""Decode bandwidth by key-split count at the GQA rows (#16: 0.95-0.97x cuDNN there), the
selection's count marked, cuDNN beside: whether another count would close the gap.

    python bench/dev/decode_splits.py [--reps 20] [--fused]

--fused: with decode.FUSED_COMBINE (the split kernel merges the splits itself), whose
cheaper merge may move the best count.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import decode as bench  # noqa: E402  (bench/decode.py: inputs, graphs, timing)

ROWS = [(1, 32768, 8), (8, 8192, 8), (64, 2048, 8)]
SPLITS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--fused", action="store_true", help="decode.FUSED_COMBINE on")
    args = ap.parse_args()
    import torch

    import cuflash
    from cuflash import decode

    decode.FUSED_COMBINE = args.fused or decode.FUSED_COMBINE
    print(f"decode.FUSED_COMBINE = {decode.FUSED_COMBINE}")

    for batch, cache, heads_kv in ROWS:
        q, k, v = bench._inputs(torch, batch, cache, heads_kv)
        kv_bytes = 2 * batch * cache * heads_kv * bench.HEAD_DIM * 2
        shape = decode.DecodeShape(batch, 1, cache, bench.HEADS, heads_kv, bench.HEAD_DIM,
                                   "bfloat16")
        chosen = decode.decode_plan(shape, None, torch.cuda.current_device()).num_splits
        want = cuflash.attention_with_kvcache(q, k, v)
        cudnn = bench._time(torch, bench._sdpa_impls(torch, q, k, v, True)["sdpa_cudnn"], want,
                            kv_bytes, args.reps)
        cells = []
        for n in SPLITS:
            if n > cache // 256:
                continue
            r = bench._time(torch, lambda n=n: cuflash.attention_with_kvcache(q, k, v,
                                                                              num_splits=n),
                            want, kv_bytes, args.reps)
            mark = "*" if n == chosen else ""
            cells.append(f"{n}{mark}: {r.get('tb_s', float('nan')):.2f}")
        print(f"({batch}, {cache}, {heads_kv}) cuDNN {cudnn.get('tb_s', float('nan')):.2f} TB/s | "
              + "  ".join(cells), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
