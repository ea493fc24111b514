"""Block-sparse attention against dense on the GPU (issue #15): forward and backward time of
the same call with a random block mask of a given density, CUDA-event medians after warm-up
of calls queued behind a sleep kernel (the GPU's time), and beside them one call a sample on
an idle GPU (the host's time before the launch counted too).

    python bench/block_sparse.py [--seqlen 16384] [--density 0.1] [--flex] [--persistent]
                                 [--json out.json]

Dense FLOPs are 4 B H S^2 D (x2.5 backward); the sparse call's "dense-equivalent" speed-up is
dense time / sparse time, next to the kept fraction of blocks (the ideal speed-up is about
1 / kept). ``--flex``: the same mask through torch's FlexAttention (``flex_attention``
compiled, a ``BlockMask`` of the same 128 x 128 blocks), in the same process, forward and
forward+backward on torch tensors beside cuflash.torch's. ``--persistent``: the sparse
forward again with the Hopper forward's persistent blocks (CF_FWD_PERSISTENT=1, a candidate:
the selection keeps one block per tile under a block mask), its output compared bit for bit.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def _ms(fn) -> float:
    """The GPU's time of one call (real_workloads.queued_ms: calls queued behind a sleep
    kernel, as bench/attention_sweep.py times)."""
    from real_workloads import queued_ms
    return queued_ms(fn)


def _idle_ms(fn) -> float:
    """Median milliseconds of one call on an idle GPU (real_workloads.time_ms, one call a
    sample): the host's time before the launch counts too, so a short call's ratio to a
    long one's is lower than its kernels'. Reported beside ``_ms`` (before 2026-12-06
    this was the headline: session 33 moved varlen_bench off it for the same reason)."""
    from real_workloads import time_ms
    return time_ms(fn, inner=1)


def _flex(q, k, v, do, mask, causal, block) -> dict:
    """FlexAttention and cuflash.torch on the same torch tensors and block mask: forward,
    and forward + backward (ms)."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import cuflash.torch as ct

    tq, tk, tv, tdo = (torch.from_dlpack(x).transpose(1, 2).contiguous().transpose(1, 2)
                       for x in (q, k, v, do))  # (b, s, h, d), torch's own copies
    tmask = torch.from_dlpack(mask)

    def keep(b, h, q_idx, kv_idx):
        seen = tmask[b, h, q_idx // block, kv_idx // block]
        return seen & (kv_idx <= q_idx) if causal else seen

    b, s, h, _ = tq.shape
    # compiled, so the (b, h, s, s) mask is never materialised: eagerly it took 32 GiB more
    # at 16 heads x 16k and ran an 80 GB H100 out of memory (session 37)
    bm = torch.compile(create_block_mask)(keep, b, h, s, s, device="cuda", BLOCK_SIZE=block)
    flex = torch.compile(flex_attention)

    def flex_fwd(req=False):  # flex takes (b, h, s, d)
        qq, kk, vv = (x.detach().transpose(1, 2).requires_grad_(req) for x in (tq, tk, tv))
        return flex(qq, kk, vv, block_mask=bm), (qq, kk, vv)

    def flex_step():
        o, ins = flex_fwd(True)
        o.backward(tdo.transpose(1, 2))

    def ours_fwd(req=False):
        qq, kk, vv = (x.detach().requires_grad_(req) for x in (tq, tk, tv))
        return ct.flash_attention(qq, kk, vv, causal=causal, block_mask=tmask,
                                  block_size=(block, block))

    def ours_step():
        ours_fwd(True).backward(tdo)

    with torch.no_grad():
        f_fwd, c_fwd = _ms(lambda: flex_fwd()), _ms(lambda: ours_fwd())
    return {"flex_fwd_ms": f_fwd, "cuflash_torch_fwd_ms": c_fwd,
            "flex_fwdbwd_ms": _ms(flex_step), "cuflash_torch_fwdbwd_ms":
            _ms(ours_step)}


def _persistent(spec):
    """The Hopper forward's persistent blocks where a block mask is on (the warp-specialized
    kernel); other specs as they are."""
    from cuflash import plan, specs

    if spec.mods.block_sparse and specs.fwd90_warp_specialized(spec):
        return spec.with_knobs(**{plan.PERSISTENT: 1})
    return spec


def run(batch, heads, seqlen, head_dim, density, causal, dtype, block, flex=False,
        persistent=False, wide_boxed=False) -> dict:
    import cupy

    import cuflash

    rng = np.random.default_rng(0)
    shape = (batch, seqlen, heads, head_dim)
    q, k, v, do = (cupy.asarray(rng.standard_normal(shape, dtype=np.float32).astype(dtype))
                   for _ in range(4))
    n = -(-seqlen // block)
    mask = cupy.asarray(rng.random((batch, heads, n, n)) < density)
    mask[..., :, 0] = True  # every row keeps a block
    kept = float(mask.mean())
    out = {"batch": batch, "heads": heads, "seqlen": seqlen, "head_dim": head_dim,
           "causal": causal, "dtype": str(np.dtype(dtype)), "block": block,
           "density_asked": density, "kept": kept}
    for name, bm in (("dense", None), ("sparse", mask)):
        o, stats = cuflash.attention_forward(q, k, v, causal=causal, block_mask=bm)
        calls = {"fwd": lambda: cuflash.attention_forward(q, k, v, causal=causal,
                                                          block_mask=bm),
                 "bwd": lambda: cuflash.attention_backward(do, q, k, v, o, stats,
                                                           causal=causal, block_mask=bm)}
        for direction, call in calls.items():
            out[f"{name}_{direction}_ms"] = _ms(call)
            out[f"{name}_{direction}_idle_ms"] = _idle_ms(call)
    if persistent:
        from cuflash import fastpath, plan

        want, _ = cuflash.attention_forward(q, k, v, causal=causal, block_mask=mask)
        with fastpath.selector_patched("select_forward", _persistent):
            got, _ = cuflash.attention_forward(q, k, v, causal=causal, block_mask=mask)
            out["sparse_pers_spec"] = [p.kernel.spec.name for p in plan._forward_plans.values()]
            out["sparse_pers_equal"] = bool(cupy.array_equal(got.view(cupy.uint16),
                                                             want.view(cupy.uint16)))
            out["sparse_pers_fwd_ms"] = _ms(
                lambda: cuflash.attention_forward(q, k, v, causal=causal, block_mask=mask))
        out["sparse_fwd_ms_again"] = _ms(
            lambda: cuflash.attention_forward(q, k, v, causal=causal, block_mask=mask))
    if wide_boxed:  # the candidate d64 causal backward tile (registry.BWD90_BOXED_ONLY)
        from cuflash import fastpath, launch, specs

        o, stats = cuflash.attention_forward(q, k, v, causal=causal, block_mask=mask)
        want = cuflash.attention_backward(do, q, k, v, o, stats, causal=causal,
                                          block_mask=mask)
        facts = launch.device_facts(0)
        with fastpath.selector_patched("select_backward",
                                       specs.with_wide_boxed_backward(facts)):
            got = cuflash.attention_backward(do, q, k, v, o, stats, causal=causal,
                                             block_mask=mask)
            out["sparse_wide_bwd_spec"] = specs.select_backward(  # the patched selection
                facts, str(np.dtype(dtype)), head_dim, causal, False,
                mods=specs.ModFlags(block_sparse=True)).name
            out["sparse_wide_bwd_max_diff"] = max(  # on the host: NumPy casts bfloat16
                float(np.abs(cupy.asnumpy(g).astype(np.float32)
                             - cupy.asnumpy(w).astype(np.float32)).max())
                for g, w in zip(got, want))
            out["sparse_wide_bwd_ms"] = _ms(
                lambda: cuflash.attention_backward(do, q, k, v, o, stats, causal=causal,
                                                   block_mask=mask))
    if flex:
        out.update(_flex(q, k, v, do, mask, causal, block))
    flops = 4 * batch * heads * seqlen * seqlen * head_dim / (2 if causal else 1)
    out["dense_fwd_tflops"] = flops / out["dense_fwd_ms"] / 1e9
    out["dense_bwd_tflops"] = 2.5 * flops / out["dense_bwd_ms"] / 1e9
    out["speedup_fwd"] = out["dense_fwd_ms"] / out["sparse_fwd_ms"]
    out["speedup_bwd"] = out["dense_bwd_ms"] / out["sparse_bwd_ms"]
    for direction in ("fwd", "bwd"):
        out[f"speedup_{direction}_idle"] = (out[f"dense_{direction}_idle_ms"]
                                            / out[f"sparse_{direction}_idle_ms"])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=16384)
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--flex", action="store_true", help="FlexAttention beside (torch)")
    p.add_argument("--causal", default="0,1", help="comma-separated 0 / 1")
    p.add_argument("--persistent", action="store_true",
                   help="the sparse forward with persistent blocks too (a candidate)")
    p.add_argument("--wide-boxed", action="store_true",
                   help="the sparse backward again on the candidate 12-warp boxed tile "
                        "(specs.with_wide_boxed_backward: d64 causal)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    import ml_dtypes

    rows = []
    for d in (int(x) for x in args.head_dims.split(",")):
        for causal in (bool(int(c)) for c in args.causal.split(",")):
            r = run(args.batch, args.heads, args.seqlen, d, args.density, causal,
                    ml_dtypes.bfloat16, args.block, args.flex, args.persistent,
                    args.wide_boxed)
            rows.append(r)
            if args.flex:
                print(f"d{d} {'causal' if causal else 'full  '} FlexAttention / cuflash.torch: "
                      f"fwd {r['flex_fwd_ms']:.3f} / {r['cuflash_torch_fwd_ms']:.3f} ms, "
                      f"fwd+bwd {r['flex_fwdbwd_ms']:.3f} / {r['cuflash_torch_fwdbwd_ms']:.3f}"
                      f" ms", flush=True)
            print(f"d{d} {'causal' if causal else 'full  '} kept {r['kept']:.3f}: "
                  f"fwd {r['dense_fwd_ms']:.3f} -> {r['sparse_fwd_ms']:.3f} ms "
                  f"({r['speedup_fwd']:.2f}x; dense {r['dense_fwd_tflops']:.0f} TFLOP/s), "
                  f"bwd {r['dense_bwd_ms']:.3f} -> {r['sparse_bwd_ms']:.3f} ms "
                  f"({r['speedup_bwd']:.2f}x; dense {r['dense_bwd_tflops']:.0f} TFLOP/s); "
                  f"idle GPU, host time counted: fwd {r['dense_fwd_idle_ms']:.3f} -> "
                  f"{r['sparse_fwd_idle_ms']:.3f} ({r['speedup_fwd_idle']:.2f}x), bwd "
                  f"{r['dense_bwd_idle_ms']:.3f} -> {r['sparse_bwd_idle_ms']:.3f} "
                  f"({r['speedup_bwd_idle']:.2f}x)", flush=True)
            if "sparse_wide_bwd_ms" in r:
                print(f"d{d} {'causal' if causal else 'full  '} wide boxed sparse backward "
                      f"{r['sparse_wide_bwd_ms']:.3f} ms against {r['sparse_bwd_ms']:.3f} "
                      f"({r['dense_bwd_ms'] / r['sparse_wide_bwd_ms']:.2f}x dense; max "
                      f"|diff| {r['sparse_wide_bwd_max_diff']:.3g}; "
                      f"{r['sparse_wide_bwd_spec']})", flush=True)
            if args.persistent:
                print(f"d{d} {'causal' if causal else 'full  '} persistent sparse forward "
                      f"{r['sparse_pers_fwd_ms']:.3f} ms against {r['sparse_fwd_ms']:.3f} / "
                      f"{r['sparse_fwd_ms_again']:.3f} (before / after; "
                      f"{'bitwise equal' if r['sparse_pers_equal'] else 'OUTPUT DIFFERS'}; "
                      f"{r['sparse_pers_spec']})", flush=True)
    if args.json:
        from real_workloads import save_rows

        save_rows(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
