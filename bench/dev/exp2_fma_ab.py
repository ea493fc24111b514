"""The Hopper forward with part of its softmax's exp2 on the FMA pipe (CF_EXP2_FMA), against
the selection and SDPA's cuDNN, one process, alternating rounds (``gpu_suite.sh exp2_fma``).

    python bench/dev/exp2_fma_ab.py [--values 0,2,4] [--head-dims 64,128] [--rounds 2]
                                    [--knob CF_FWD_OVERLAP --values 0,1 --head-dims 192,256]
                                    [--knob CF_FWD_PERSISTENT --values 0,1 --rows tokens]
                                    [--knob CF_ALIBI_ABS_ONLY --values 0,1 --modifier alibi]

CF_EXP2_FMA = k sends k of every 8 scores a lane holds per row through cf_common.cuh's
fma_exp2 instead of the SFU. Where the SFU sets the pace (softcap: tanh and exp2 both on it;
head_dim 64: half the matrix work per score of head_dim 128) that should show; elsewhere it
costs issue slots. Rows: batch 1, seqlen 4k, 16 query heads over 4 kv heads (issue 14's
modifier rows), plain and softcap 30 (``--modifier alibi``: ALiBi slopes instead), causal
and not; plus plain MHA at 16k.

The knob reaches the kernels by wrapping ``specs.select_forward`` (every fwd90 spec gains
``CF_EXP2_FMA``) and forgetting the fast path's recorded calls between values. Each value's
outputs are checked against value 0's (max |diff| <= 2e-2) before it is timed. ``--knob``
times another define of the Hopper forward the same way (CF_FWD_OVERLAP: flash_fwd_sm90.cu's
softmax beside the P V product, session 19; CF_FWD_PERSISTENT: flash_fwd_sm90_ws.cu's
persistent blocks, session 20, whose grid plan.plan_forward sets from the knob; its value 2
runs on specs.with_forward_across_tiles' tiles; CF_FWD_TMA: its bulk tensor copies, session
23, through specs.with_forward_tma; CF_FWD_CLUSTER: 2 for clusters of two sharing K / V,
specs.with_forward_cluster; CF_ALIBI_ABS_ONLY: 1 takes ALiBi's |distance| form on every
tile, no row offsets, session 26; CF_FWD_RESCALE_EARLY: O rescaled under the S product,
specs.with_forward_rescale_early, session 39).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from devtools import time_ms  # noqa: E402


KNOB = "CF_EXP2_FMA"  # --knob


def _with_knob(spec, value: int):
    if spec.kind != "fwd90":
        return spec
    if KNOB == "CF_FWD_PERSISTENT" and value == 2:  # its own tiles (a second Q buffer)
        from cuflash import launch, specs

        return specs.with_forward_across_tiles(spec, launch.device_facts(0)) or spec
    if KNOB == "CF_FWD_TMA" and value:  # where the warp-specialized forward takes it
        from cuflash import specs

        return specs.with_forward_tma(spec) or spec
    if KNOB == "CF_FWD_CLUSTER" and value == 2:  # pairs sharing K / V (TMA), where they may
        from cuflash import specs

        return specs.with_forward_cluster(spec) or spec
    if KNOB == "CF_FWD_RESCALE_EARLY" and value:  # where the loop overlaps (session 39)
        from cuflash import specs

        return specs.with_forward_rescale_early(spec) or spec
    return spec.with_knobs(**{KNOB: value}) if value else spec.without_knob(KNOB)


def _precompile(problems, values) -> None:
    """Every forward spec the rows select, each value, compiled on a thread pool first (NVRTC
    runs outside the GIL; one by one at first call they would take minutes)."""
    from concurrent.futures import ThreadPoolExecutor

    from cuflash import compiler, launch, plan, specs

    facts, work = launch.device_facts(0), set()
    for _label, _b, _s, _h, _hkv, d, causal, mods in problems:
        flags = plan.mod_flags(None, mods.get("softcap"), mods.get("alibi_slopes"), None,
                               causal)
        spec = specs.select_forward(facts, "bfloat16", d, causal, mods=flags)
        work |= {_with_knob(spec, v) for v in values}
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda spec: compiler.get_kernel(spec, 0), work))


def _flops(b, h, s, d, causal):
    return 4 * b * h * s * s * d / (2 if causal else 1)


def main() -> None:
    global KNOB
    ap = argparse.ArgumentParser()
    ap.add_argument("--values", default="0,2,4")
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--knob", default=KNOB, help="the -D define to vary (default CF_EXP2_FMA)")
    ap.add_argument("--rows", default="gqa", choices=("gqa", "tokens"),
                    help="gqa: the rows above; tokens: MHA, 16 heads, 16k tokens a batch "
                         "(batch 16 / 4 / 1 at seqlen 1k / 4k / 16k, real_workloads' rows)")
    ap.add_argument("--modifier", default="softcap", choices=("softcap", "alibi"),
                    help="the modified gqa rows: softcap 30, or ALiBi slopes (geometric, "
                         "0.5 .. 2^-8 over the heads, as bench/dev/modifiers_overhead.py)")
    args = ap.parse_args()
    KNOB = args.knob
    import torch
    import torch.nn.functional as F

    import cuflash
    from cuflash import fastpath

    values = [int(v) for v in args.values.split(",")]
    modifier = args.modifier
    mod_args = ({"softcap": 30.0} if modifier == "softcap" else
                {"alibi_slopes": torch.tensor(np.geomspace(0.5, 2.0**-8, 16), device="cuda",
                                              dtype=torch.float32)})
    problems = []  # (label, b, s, h, hkv, d, causal, mods)
    for d in (int(x) for x in args.head_dims.split(",")):
        for causal in (True, False):
            if args.rows == "tokens":
                for s in (1024, 4096, 16384):
                    problems.append((f"d{d} {s // 1024}k x{16384 // s}"
                                     f"{' causal' if causal else ''}", 16384 // s, s, 16, 16, d,
                                     causal, {}))
                continue
            problems.append((f"d{d} 4k gqa{' causal' if causal else ''}", 1, 4096, 16, 4, d,
                             causal, {}))
            problems.append((f"d{d} 4k gqa {modifier}{' causal' if causal else ''}", 1, 4096,
                             16, 4, d, causal, mod_args))
            problems.append((f"d{d} 16k mha{' causal' if causal else ''}", 1, 16384, 16, 16, d,
                             causal, {}))
    torch.manual_seed(0)
    tensors = {}
    for label, b, s, h, hkv, d, causal, mods in problems:
        key = (b, s, h, hkv, d)
        if key not in tensors:
            q = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(b, s, hkv, d, device="cuda", dtype=torch.bfloat16)
            tensors[key] = (q, k, torch.randn_like(k))
    _precompile(problems, values)
    times = {p[0]: {v: [] for v in values} for p in problems}
    reference = {}
    for rnd in range(args.rounds):
        order = values if rnd % 2 == 0 else values[::-1]
        for value in order:
            knob = lambda spec, value=value: _with_knob(spec, value)  # noqa: E731
            with fastpath.selector_patched("select_forward", knob):
                for label, b, s, h, hkv, d, causal, mods in problems:
                    q, k, v = tensors[b, s, h, hkv, d]
                    fn = lambda: cuflash.attention_forward(q, k, v, causal=causal,  # noqa
                                                           **mods)
                    o, _ = fn()
                    if value == values[0] and label not in reference:
                        reference[label] = o.float()
                    diff = (o.float() - reference[label]).abs().max().item()
                    if diff > 2e-2:
                        print(f"{label}: {KNOB}={value} differs by {diff:.3g}: skipped")
                        times[label][value].append(float("nan"))
                        continue
                    times[label][value].append(time_ms(fn, reps=20, warmup=3))
    cudnn = {}
    for label, b, s, h, hkv, d, causal, mods in problems:
        if mods:
            continue
        q, k, v = tensors[b, s, h, hkv, d]
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            try:
                cudnn[label] = time_ms(lambda: F.scaled_dot_product_attention(
                    qt, kt, vt, is_causal=causal, enable_gqa=hkv != h), reps=20, warmup=3)
            except RuntimeError as err:  # cuDNN may refuse a layout
                print(f"{label}: cuDNN {type(err).__name__}: {err}"[:200])
    print(f"{torch.cuda.get_device_name()}, bf16, TFLOP/s (median of {args.rounds} rounds); "
          f"{KNOB} values {values}")
    out = {"device": torch.cuda.get_device_name(), "values": values, "rows": {}}
    for label, b, s, h, hkv, d, causal, mods in problems:
        fl = _flops(b, h, s, d, causal)
        meds = {v: statistics.median(times[label][v]) for v in values}
        cells = "  ".join(f"k{v} {fl / ms / 1e9:6.1f}" for v, ms in meds.items())
        best = min(meds, key=lambda v: meds[v] if not np.isnan(meds[v]) else 1e9)
        extra = f"  cuDNN {fl / cudnn[label] / 1e9:6.1f}" if label in cudnn else ""
        print(f"{label:28s} {cells}{extra}  best k{best} {meds[values[0]] / meds[best]:.3f}x")
        out["rows"][label] = {"ms": {str(v): times[label][v] for v in values},
                              "cudnn_ms": cudnn.get(label), "flops": fl}
    base = {p[0]: statistics.median(times[p[0]][values[0]]) for p in problems}
    for label, *_rest, mods in problems:
        if mods:
            plain = label.replace(f" {modifier}", "")
            ratios = "  ".join(f"k{v} {statistics.median(times[label][v]) / base[plain]:.3f}x"
                               for v in values)
            print(f"{label:28s} against plain k{values[0]}: {ratios}")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
