"""Time candidate tile shapes for one problem, to justify (or change) the tables in specs.py.

    python bench/dev/tile_sweep.py --kind fwd --head-dim 64 128 --seqlen 4096 16384 --causal both
    python bench/dev/tile_sweep.py --kind bwd --head-dim 64 --seqlen 4096
    python bench/dev/tile_sweep.py --kind bwd90 --head-dim 128 --variant CF_BWD_WS_PINGPONG=0
    python bench/dev/tile_sweep.py --kind fwd90 --head-dim 192 --head-dim-v 128 \
        --candidates 8,64,2 8,128,2 --variant CF_FWD_OVERLAP=2
    python bench/dev/tile_sweep.py --kind bwd90 --head-dim 256 --candidates 8,64,2 8,64,2,80

For each candidate the plan is built with that KernelSpec pinned (cuflash.plan's ``spec=``,
devtools.pinned_forward / pinned_backward; --define adds knobs to the spec, so its name and
cache key say so), the output is checked against torch SDPA's flash backend once, then timed: median of CUDA-event timings of
calls enqueued back to back after warm-up (devtools.time_ms), with SDPA's flash (FA-2) and
cuDNN backends timed first in the same run. batch*seqlen = 16k tokens and heads*head_dim =
2048, as in the benchmark. (Before 2026-11-23 17:30 UTC each call was synchronized, which put
cuflash's host overhead on the GPU timeline; the NOTES tables of that day used that method.)
Prints TFLOP/s per candidate (FLOPs = 4*B*H*S*S*D, halved when causal, x2.5 backward).
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from devtools import fwd_block_m, pinned_backward, pinned_forward, time_ms

from cuflash import specs
from cuflash.specs import KernelSpec

# (warps, block_n, stages) for fwd; (warps, block_m, stages) for bwd: block_m (fwd) and
# block_n (bwd) are 16 * warps, as the kernels require.
FWD_CANDIDATES = [(8, 128, 2), (8, 128, 1), (8, 64, 3), (8, 64, 2), (8, 64, 1), (8, 32, 2), (4, 128, 2), (4, 64, 2),
                  (4, 32, 2)]
# 8 warps at head_dim <= 128 is the split layout (flash_bwd_split.cu); (4, 64, 2) the
# 16-keys-per-warp kernel (flash_bwd.cu) that the table chose before it.
BWD_CANDIDATES = [(8, 128, 2), (8, 64, 2), (4, 64, 2)]
# bwd90 (flash_bwd_sm90.cu): 8 warps, 2 stages; block_m 64 (128 at head_dim 64), block_n 128
# (64 at head_dim 256), as the registry's tiles. 12 warps: flash_bwd_sm90_ws.cu (head_dim 64
# with block_m 128, head_dim 128 with 64).
BWD90_CANDIDATES = [(8, 64, 2), (8, 128, 2), (12, 64, 2), (12, 128, 2), (12, 64, 3), (12, 128, 3)]


def _bwd90_fits(warps, block_m, bucket, block_n=0):
    split = specs.BWD90_HSPLIT.get(bucket)  # flash_bwd_sm90_hsplit.cu
    if split and block_n == split.block_n:
        return (warps, block_m) == (split.warps, split.block_m)
    if block_n:
        return False
    if warps == 12:
        return (bucket, block_m) in ((64, 128), (128, 64))
    return block_m == 64 or bucket == 64


KNOBS: dict[str, int] = {}  # --define NAME=VALUE: extra -D defines of every candidate
ORDERED: list = []  # --ordered: this GPU's DeviceFacts; also the deterministic (ordered dQ) tiles
VARIANTS: list[dict[str, int]] = []  # --variant NAME=VALUE: each candidate again with it


def candidate_specs(kind, dtype, head_dim, causal, head_dim_v=0):
    """``head_dim_v``: v's own head_dim (the pair kernels: fwd90's 8 warps, bwd90's role
    split), 0 for q's."""
    bucket = specs.head_dim_bucket(head_dim)
    if kind in ("fwd", "fwd90"):
        out = [KernelSpec(kind=kind, dtype=dtype, head_dim=bucket, head_dim_v=head_dim_v,
                          block_m=fwd_block_m(kind, w), block_n=n, warps=w,
                          stages=s, causal=causal) for w, n, s in FWD_CANDIDATES
               if not head_dim_v or w == 8]
    elif kind == "bwd90":  # (warps, block_m, stages[, block_n]): 80 keys at head_dim 256, 96 at
        # 192 are flash_bwd_sm90_hsplit.cu (specs.with_backward_head_dim_split)
        out = [KernelSpec(kind="bwd90", dtype=dtype, head_dim=bucket, head_dim_v=head_dim_v,
                          block_m=m, block_n=n[0] if n else 64 if bucket >= 192 else 128,
                          warps=w, stages=s, causal=causal, dq_atomic=True, dchunk=bucket)
               for w, m, s, *n in BWD90_CANDIDATES if _bwd90_fits(w, m, bucket, *n)
               and (not head_dim_v or w == 8)]
    else:
        out = [KernelSpec(kind="bwd", dtype=dtype, head_dim=bucket, block_m=m, block_n=16 * w,
                          warps=w, stages=s, causal=causal, dq_atomic=True,
                          dchunk=min(bucket, 128)) for w, m, s in BWD_CANDIDATES]
    if ORDERED and kind == "bwd90":  # each warp-specialized or head-dim split tile again in
        # the deterministic mode (the former with this GPU's rotated walk where the selector
        # would give it; the split does not rotate)
        out += [specs.with_ordered_rotation(replace(spec, dq_ordered=True), ORDERED[0])
                if specs.bwd90_warp_specialized(spec) else replace(spec, dq_ordered=True)
                for spec in out if specs.bwd90_warp_specialized(spec)
                or specs.bwd90_head_dim_split(spec)]
    out = [spec.with_knobs(**KNOBS) for spec in out]
    return out + [spec.with_knobs(**variant) for variant in VARIANTS for spec in out]



def sdpa_ms(q, k, v, do, causal, kind, backend):
    """Median time of torch SDPA with one backend, on the same tensors (the peer, same run)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    with sdpa_kernel(backend):
        if kind != "bwd":
            return time_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal))
        qg, kg, vg = (t.detach().requires_grad_() for t in (qt, kt, vt))
        out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal)
        dot = do.transpose(1, 2)
        return time_ms(lambda: torch.autograd.grad(out, (qg, kg, vg), dot, retain_graph=True))


def sweep(kind, dtype_name, d, s, causal, dv=0):
    """``dv``: v's own head_dim (0 or d: d's); FLOPs then 2 B H S^2 (d + dv)."""
    dv = 0 if dv == d else dv
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend

    from cuflash.launch import device_facts

    batch, heads = max(1, 16384 // s), 2048 // d
    dt = getattr(torch, dtype_name)
    width_v = dv or d
    q, k = (torch.randn(batch, s, heads, d, device="cuda", dtype=dt) for _ in range(2))
    v, do = (torch.randn(batch, s, heads, width_v, device="cuda", dtype=dt) for _ in range(2))
    flops = 2 * batch * heads * s * s * (d + width_v) / (2 if causal else 1)
    backward = kind in ("bwd", "bwd90")
    flops *= 2.5 if backward else 1
    qg, kg, vg = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal)
    ref_grads = [g.transpose(1, 2) for g in
                 torch.autograd.grad(ref, (qg, kg, vg), do.transpose(1, 2))] if backward else []
    ref = ref.detach().transpose(1, 2)
    print(f"--- {kind} {dtype_name} d{d}{f' v{dv}' if dv else ''} seqlen {s} batch {batch} "
          f"heads {heads}"
          f"{' causal' if causal else ''}")
    for label, backend in (("sdpa_flash (FA-2)", SDPBackend.FLASH_ATTENTION),
                           ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            ms = sdpa_ms(q, k, v, do, causal, "bwd" if backward else kind, backend)
            print(f"{label:<52} {flops / ms / 1e9:7.1f} TFLOP/s  {ms:8.3f} ms")
        except Exception as exc:  # a backend may refuse a shape; say so and go on
            print(f"{label:<52} unavailable: {type(exc).__name__}: {str(exc)[:80]}")
    budget = device_facts(q.device.index).smem_optin
    facts = device_facts(q.device.index)
    first = (specs.select_forward_pair(facts, dtype_name, d, dv, causal) if dv else
             specs.select_forward(facts, dtype_name, d, causal))
    o, m, l = pinned_forward(first, q, k, v, causal)
    for spec in candidate_specs(kind, dtype_name, d, causal, dv):
        if spec.smem_bytes > budget:
            print(f"{spec.name:<52} does not fit ({spec.smem_bytes} B)")
            continue
        try:
            row = _time_candidate(spec, backward, q, k, v, do, o, m, l, causal, flops, ref,
                                  ref_grads)
        except RuntimeError as exc:  # a knob the kernel refuses (a static_assert): go on
            row = f"does not compile: {str(exc).splitlines()[0][:100]}"
        print(f"{spec.name:<52} {row}", flush=True)


def _time_candidate(spec, backward, q, k, v, do, o, m, l, causal, flops, ref, ref_grads) -> str:
    """TFLOP/s, ms and errors against SDPA of one candidate (and, ordered, its repeat)."""
    import torch

    if not backward:
        o, m, l = pinned_forward(spec, q, k, v, causal)
        ms = time_ms(lambda: pinned_forward(spec, q, k, v, causal))
        err = f"max|o - sdpa| {(o.float() - ref.float()).abs().max().item():.1e}"
    else:
        grads = pinned_backward(spec, do, q, k, v, o, m, l, causal)
        ms = time_ms(lambda: pinned_backward(spec, do, q, k, v, o, m, l, causal))
        err = "max|dq, dk, dv - sdpa| / max|sdpa| " + " ".join(
            f"{((g.float() - r.float()).abs().max() / r.float().abs().max()).item():.1e}"
            for g, r in zip(grads, ref_grads))
        if spec.dq_ordered:  # the deterministic mode: the timed calls left the same bits?
            again = pinned_backward(spec, do, q, k, v, o, m, l, causal)
            same = all(torch.equal(a, b) for a, b in zip(grads, again))
            err += "  bitwise repeat " + ("ok" if same else "DIFFERS")
    return f"{flops / ms / 1e9:7.1f} TFLOP/s  {ms:8.3f} ms  {err}"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--kind", choices=["fwd", "fwd90", "bwd", "bwd90"], default="fwd")
    p.add_argument("--head-dim", type=int, nargs="+", default=[128])
    p.add_argument("--seqlen", type=int, nargs="+", default=[16384])
    p.add_argument("--causal", choices=["no", "yes", "both"], default="no")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--head-dim-v", type=int, default=0,
                   help="v's own head_dim (fwd90 / bwd90 pair kernels; 0: q's)")
    p.add_argument("--candidates", nargs="+", default=None, metavar="W,M_OR_N,S",
                   help="replace the candidate list of --kind (e.g. 8,64,2; bwd90 may add "
                        "block_n: 8,64,2,80)")
    p.add_argument("--define", action="append", default=[],
                   help="extra NAME=VALUE compiled into every candidate (kernel-internal knobs "
                        "such as CF_BWD_SPLIT_KUNROLL=1), as KernelSpec knobs: in the name")
    p.add_argument("--variant", action="append", default=[],
                   help="NAME=VALUE[,NAME=VALUE...]: also time every candidate with these "
                        "knobs, in the same run (an A/B of kernel-internal knobs)")
    p.add_argument("--ordered", action="store_true",
                   help="bwd90: also time each warp-specialized tile with ordered dQ (the "
                        "deterministic mode)")
    args = p.parse_args()
    if args.ordered:
        from cuflash.launch import device_facts

        ORDERED.append(device_facts(0))
    for variant in args.variant:  # NAME=VALUE[,NAME=VALUE...]: knobs set together
        VARIANTS.append({name: int(value) for name, value in
                         (knob.split("=") for knob in variant.split(","))})
    if args.candidates:
        tiles = [tuple(int(x) for x in c.split(",")) for c in args.candidates]
        FWD_CANDIDATES[:] = BWD_CANDIDATES[:] = BWD90_CANDIDATES[:] = tiles
    for define in args.define:
        name, value = define.split("=")
        KNOBS[name] = int(value)
    causals = {"no": [False], "yes": [True], "both": [False, True]}[args.causal]
    for d in args.head_dim:
        for s in args.seqlen:
            for causal in causals:
                sweep(args.kind, args.dtype, d, s, causal, args.head_dim_v)


if __name__ == "__main__":
    main()
