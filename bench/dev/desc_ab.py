"""The Hopper kernels with their wgmma descriptors built by one add a k-step (CF_DESC_ADD=1,
cf_sm90.cuh) against the masked form, one process, alternating rounds.

    python bench/dev/desc_ab.py [--head-dims 64,128,192,256] [--rounds 3] [--out FILE]
                                [--fwd-knobs CF_FWD_OVERLAP=3]

Every fwd90 / bwd90 spec the selectors return runs with and without the knob (cuflash.fastpath's
selector_patched, which also forgets the planned calls). The knob changes how a descriptor
is computed, not its bits, so o, m, l, dk and dv must be bit for bit the same (each row
prints what differed; dq is added by atomics in no fixed order, so it may differ by rounding). Rows: bf16, 16 heads, 16k
tokens a batch at seqlen 4k and 16k, causal and not; the forward and the backward timed
apart (CUDA-event medians, bench/dev/devtools.time_ms), TFLOP/s by 4 B H S^2 D (halved
causal), 2.5x that for the backward.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from devtools import time_ms  # noqa: E402

KNOB = "CF_DESC_ADD"


FWD_KNOBS: dict = {}  # --fwd-knobs: more defines for the forward's 8-warp specs, both arms


def _with(value: int):
    def knob(spec):
        if spec.kind not in ("fwd90", "bwd90"):
            return spec
        if spec.kind == "fwd90" and FWD_KNOBS and spec.warps == 8:
            spec = spec.with_knobs(**FWD_KNOBS)
        spec = spec.without_knob(KNOB)
        return spec.with_knobs(**{KNOB: 1}) if value else spec
    return knob


def _precompile(rows) -> None:
    """The rows' forward and backward main kernels, both values, on a thread pool (NVRTC runs
    outside the GIL; at first call they would compile one by one)."""
    from concurrent.futures import ThreadPoolExecutor

    from cuflash import compiler, launch, specs

    facts, work = launch.device_facts(0), set()
    for d, _s, causal in rows:
        for spec in (specs.select_forward(facts, "bfloat16", d, causal),
                     specs.select_backward(facts, "bfloat16", d, causal, False)):
            work |= {_with(value)(spec) for value in (0, 1)}
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda spec: compiler.get_kernel(spec, 0), work))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--head-dims", default="64,128,192,256")
    ap.add_argument("--seqlens", default="4096,16384")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--fwd-knobs", default="", metavar="NAME=V,...",
                    help="defines for the 8-warp forward in both arms, e.g. CF_FWD_OVERLAP=3")
    args = ap.parse_args()
    FWD_KNOBS.update((kv.split("=")[0], int(kv.split("=")[1]))
                     for kv in args.fwd_knobs.split(",") if kv)
    import torch

    import cuflash
    from cuflash import fastpath

    rows = [(d, s, c) for d in (int(x) for x in args.head_dims.split(","))
            for s in (int(x) for x in args.seqlens.split(",")) for c in (False, True)]
    torch.manual_seed(0)
    data = {}
    for d, s, _c in rows:
        if (d, s) not in data:
            b = 16384 // s
            q, k, v, do = (torch.randn(b, s, 16, d, device="cuda", dtype=torch.bfloat16)
                           for _ in range(4))
            data[d, s] = (q, k, v, do)
    _precompile(rows)
    times = {(r, part): {0: [], 1: []} for r in rows for part in ("fwd", "bwd")}
    outputs = {}
    for rnd in range(args.rounds):
        for value in ((0, 1) if rnd % 2 == 0 else (1, 0)):
            with fastpath.selector_patched("select_forward", _with(value)), \
                    fastpath.selector_patched("select_backward", _with(value)):
                for d, s, c in rows:
                    q, k, v, do = data[d, s]
                    o, lse = cuflash.attention_forward(q, k, v, causal=c)
                    grads = cuflash.attention_backward(do, q, k, v, o, lse, causal=c)
                    result = (o, lse.m, lse.l, *grads)
                    if rnd == 0:
                        outputs.setdefault((d, s, c), {})[value] = [x.clone() for x in result]
                    times[(d, s, c), "fwd"][value].append(time_ms(
                        lambda: cuflash.attention_forward(q, k, v, causal=c), reps=20, warmup=3))
                    times[(d, s, c), "bwd"][value].append(time_ms(
                        lambda: cuflash.attention_backward(do, q, k, v, o, lse, causal=c),
                        reps=10, warmup=2))
    print(f"{torch.cuda.get_device_name()}, bf16, TFLOP/s (median of {args.rounds} rounds), "
          f"{KNOB} 0 -> 1")
    out = {"device": torch.cuda.get_device_name(), "rows": {}}
    for d, s, c in rows:
        pair = outputs[d, s, c]
        # o, m, l and dk, dv bit for bit; dq is added by atomics in no fixed order
        names = ("o", "m", "l", "dq", "dk", "dv")
        differ = [n for n, a, b in zip(names, pair[0], pair[1]) if not torch.equal(a, b)]
        dq_diff = (pair[0][3].float() - pair[1][3].float()).abs().max().item()
        same = not [n for n in differ if n != "dq"]
        flops = 4 * (16384 // s) * 16 * s * s * d / (2 if c else 1)
        cells = []
        for part, scale in (("fwd", 1.0), ("bwd", 2.5)):
            med = {v: statistics.median(times[(d, s, c), part][v]) for v in (0, 1)}
            cells.append(f"{part} {scale * flops / med[0] / 1e9:6.1f} -> "
                         f"{scale * flops / med[1] / 1e9:6.1f} ({med[0] / med[1]:.3f}x)")
            out["rows"][f"d{d} {s} {'causal' if c else 'full'} {part}"] = {
                "ms": {str(v): times[(d, s, c), part][v] for v in (0, 1)}, "flops": scale * flops}
        label = f"d{d} {s // 1024}k{' causal' if c else ''}"
        print(f"{label:16s} {'  '.join(cells)}  differ: {','.join(differ) or 'none'} "
              f"(dq max |diff| {dq_diff:.2g})")
        out["rows"][f"d{d} {s} {'causal' if c else 'full'} same"] = same
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
