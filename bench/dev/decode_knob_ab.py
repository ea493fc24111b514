"""Decode with one of cuflash.decode's selection knobs on against off, cuDNN in the same
process: ``PDL`` (the combine launched as the split's programmatic dependent, CF_DECODE_PDL,
cuflash/pdl.py) or ``FUSED_COMBINE`` (the split kernel's last block of a row tile merges the
splits, CF_FUSED_COMBINE; no combine kernel).

    python bench/dev/decode_knob_ab.py --knob FUSED_COMBINE [--rounds 3] [--reps 20]
        [--q-lens 1 8] [--out decode_fused.json]

bench/decode.py's main rows (bf16, head_dim 128, 32 query heads, MHA and 8 kv heads, q_len 1)
and the other q_lens at the GQA rows (causal): K+V TB/s by CUDA-event medians of CUDA-graph
replays (and eager calls), the knob off and on alternating round by round (medians over
rounds). Each output with the knob is checked against the selection's: bit for bit for PDL
(the same kernels, launched differently), within bench/decode.py's 2e-2 for the fused merge
(its sums run in another order). Only rows with more than one split can move.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from decode import HEAD_DIM, HEADS, ROWS, _inputs, _sdpa_impls, _time  # noqa: E402


KNOBS = ("PDL", "FUSED_COMBINE")
TOLERANCE = 2e-2  # bench/decode.py's check of every implementation against cuflash's


def _with(knob: str, on: bool) -> None:
    from cuflash import decode

    setattr(decode, knob, on)
    decode.forget_plans()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--knob", choices=KNOBS, default="PDL")
    ap.add_argument("--q-lens", type=int, nargs="+", default=[1, 8],
                    help="q_len 1 at every row; the others at the GQA rows")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    import torch

    import cuflash
    from cuflash import decode

    rows = [(b, n, h, 1) for b, n, h in ROWS] + [
        (b, n, h, q) for q in args.q_lens if q != 1 for b, n, h in ROWS if h != HEADS]
    knob = args.knob
    results = []
    for batch, cache, heads_kv, q_len in rows:
        q, k, v = _inputs(torch, batch, cache, heads_kv, q_len)
        kv_bytes = 2 * batch * cache * heads_kv * HEAD_DIM * 2
        call = lambda: cuflash.attention_with_kvcache(q, k, v, causal=q_len > 1)  # noqa: E731
        _with(knob, False)
        want = call()
        plan = decode.decode_plan(decode.DecodeShape(batch, q_len, cache, HEADS, heads_kv,
                                                     HEAD_DIM, "bfloat16"), None, 0)
        row = {"batch": batch, "cache": cache, "heads_kv": heads_kv, "q_len": q_len,
               "splits": plan.num_splits, "spec": plan.spec.name, "off": [], "on": []}
        _with(knob, True)
        got = call()
        row["bitwise"] = bool(torch.equal(got.view(torch.int16), want.view(torch.int16)))
        row["max_diff"] = float((got.float() - want.float()).abs().nan_to_num(1e9).max())
        row["fuses"] = decode.decode_plan(decode.DecodeShape(
            batch, q_len, cache, HEADS, heads_kv, HEAD_DIM, "bfloat16"), None, 0).fuses
        row["ok"] = row["bitwise"] if knob == "PDL" else row["max_diff"] <= TOLERANCE
        for r in range(args.rounds):
            for on in ((False, True) if r % 2 == 0 else (True, False)):
                _with(knob, on)
                row["on" if on else "off"].append(_time(torch, call, want, kv_bytes, args.reps))
        _with(knob, False)
        if q_len == 1:
            row["cudnn"] = _time(torch, _sdpa_impls(torch, q, k, v, heads_kv != HEADS)[
                "sdpa_cudnn"], want, kv_bytes, args.reps)
        for key in ("off", "on"):
            rates = [t["tb_s"] for t in row[key] if "tb_s" in t]
            row[f"{key}_tb_s"] = statistics.median(rates) if rates else None
        cudnn = row.get("cudnn", {}).get("tb_s")
        print(f"({batch}, {cache}, {heads_kv}) q_len {q_len} splits {row['splits']:3d}: "
              f"off {row['off_tb_s'] or 0:.3f}  on {row['on_tb_s'] or 0:.3f} TB/s"
              + (f"  cuDNN {cudnn:.3f}" if cudnn else "")
              + ("  fused" if row["fuses"] else "")
              + (f"  max |diff| {row['max_diff']:.2g}" if knob != "PDL" else "")
              + ("" if row["ok"] else "  WRONG" if knob != "PDL" else "  NOT BITWISE"),
              flush=True)
        results.append(row)
        torch.cuda.empty_cache()
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "knob": knob,
                                        "rows": results}, indent=1))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
