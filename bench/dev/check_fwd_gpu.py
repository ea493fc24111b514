#!/usr/bin/env python3
"""Dev check of kernels_cu/flash_fwd.cu on a GPU: a correctness sweep against a float64
reference, then timings beside PyTorch's FlashAttention-2 SDPA backend.

Standalone (CuPy + PyTorch, no cuflash import), so it runs while the launcher is in flux.
Kernels can be compiled ahead, on a machine without a GPU, and carried as cubins:

  python bench/dev/check_fwd_gpu.py --compile-only build/fwd_cubins --arch sm_90      # no GPU
  python bench/dev/check_fwd_gpu.py --cubins build/fwd_cubins --check --bench          # GPU
  compute-sanitizer --tool racecheck python bench/dev/check_fwd_gpu.py --cubins ... --sanitize

Error rule (FlashAttention's): max|o - ref| <= 2 * max|o_naive - ref| + 1e-3, where ref is
float64 and o_naive is the plain attention computed in the kernel's 16-bit dtype.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
KDIR = ROOT / "kernels_cu"
LOG2E = 1.4426950408889634
BUCKETS = (32, 64, 96, 128, 160, 192, 224, 256)


# -- configurations ---------------------------------------------------------------------------
def cfg_name(c):
    dt, d, w, n, s, causal, extra = c
    suffix = "".join("_" + e.replace("CF_FWD_", "").lower() for e in extra)
    return f"fwd_{dt}_d{d}_w{w}_n{n}_s{s}_c{causal}{suffix}"


def check_configs():
    out = []
    for d in BUCKETS:
        tiles = [(8, 64, 2), (4, 32, 1), (1, 16, 1), (2, 128, 2)] if d <= 128 else \
                [(8, 64, 2), (4, 32, 1), (1, 16, 1), (2, 32, 2)]
        for (w, n, s) in tiles:
            for causal in (0, 1):
                out.append(("bf16", d, w, n, s, causal, ()))
    for d in (64, 128, 256):
        for causal in (0, 1):
            out.append(("fp16", d, 8, 64, 2, causal, ()))
    # the non-default Q placement, both ways
    out.append(("bf16", 128, 4, 64, 2, 1, ("CF_FWD_Q_IN_REGS=0",)))
    out.append(("bf16", 256, 4, 32, 2, 1, ("CF_FWD_Q_IN_REGS=1",)))
    return out


def bench_configs():
    tiles = {64: [(4, 64, 2), (8, 128, 2), (4, 128, 2)],
             128: [(8, 64, 2), (4, 64, 2), (8, 128, 2)],
             256: [(8, 64, 2), (4, 32, 2)]}
    return [("bf16", d, w, n, s, causal, ()) for causal in (0, 1) for d, ts in tiles.items()
            for (w, n, s) in ts]


def smem_bytes(c):
    _, d, w, n, s, _, _ = c
    return (16 * w + 2 * s * n) * d * 2


def nvrtc_options(c, arch):
    dt, d, w, n, s, causal, extra = c
    opts = ["--std=c++17", f"-I{KDIR}", f"-DCF_DTYPE={0 if dt == 'fp16' else 1}",
            f"-DCF_HEAD_DIM={d}", f"-DCF_BLOCK_M={16 * w}", f"-DCF_BLOCK_N={n}",
            f"-DCF_WARPS={w}", f"-DCF_STAGES={s}", f"-DCF_CAUSAL={causal}"]
    opts += [f"-D{e}" for e in extra]
    if arch:
        opts.append(f"--gpu-architecture={arch}")
    return opts


def compile_cubin(args):
    c, arch, outdir = args
    from cupy_backends.cuda.libs import nvrtc
    src = (KDIR / "flash_fwd.cu").read_text()
    prog = nvrtc.createProgram(src, "flash_fwd.cu", [], [])
    try:
        nvrtc.compileProgram(prog, nvrtc_options(c, arch))
    except Exception:
        return f"{cfg_name(c)}: COMPILE FAILED\n{nvrtc.getProgramLog(prog)}"
    (Path(outdir) / f"{cfg_name(c)}.{arch}.cubin").write_bytes(nvrtc.getCUBIN(prog))
    return None


# -- launching ----------------------------------------------------------------------------------
_kernels = {}


def get_kernel(c, cubins):
    import cupy as cp
    key = cfg_name(c)
    if key in _kernels:
        return _kernels[key]
    major, minor = cp.cuda.Device().compute_capability
    path = Path(cubins or "/nonexistent") / f"{key}.sm_{major}{minor}.cubin"
    if path.exists():
        mod = cp.RawModule(path=str(path))
    else:
        src = (KDIR / "flash_fwd.cu").read_text()
        mod = cp.RawModule(code=src, options=tuple(nvrtc_options(c, None)), backend="nvrtc")
    fn = mod.get_function("flash_fwd")
    if smem_bytes(c) > 48 * 1024:
        fn.max_dynamic_shared_size_bytes = smem_bytes(c)
    _kernels[key] = fn
    return fn


def run_fwd(c, cubins, q, k, v, scale, o=None):
    """q: (B, sq, H, hd), k, v: (B, sk, Hkv, hd) torch views (head_dim contiguous)."""
    import torch
    fn = get_kernel(c, cubins)
    _, d, w, n, s, causal, _ = c
    B, sq, H, hd = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    if o is None:
        o = torch.full_like(q, float("nan"))
    m = torch.full((B, H, sq), float("nan"), device=q.device, dtype=torch.float32)
    l = torch.full((B, H, sq), float("nan"), device=q.device, dtype=torch.float32)
    ptr = lambda t: np.uint64(t.data_ptr())
    i32, i64 = np.int32, np.int64
    args = (ptr(q), ptr(k), ptr(v), ptr(o), ptr(m), ptr(l), i32(sq), i32(sk), i32(H),
            i32(H // hkv), i32(hd),
            i64(q.stride(0)), i64(q.stride(1)), i64(q.stride(2)),
            i64(k.stride(0)), i64(k.stride(1)), i64(k.stride(2)),
            i64(v.stride(0)), i64(v.stride(1)), i64(v.stride(2)),
            i64(o.stride(0)), i64(o.stride(1)), i64(o.stride(2)),
            np.float32(scale * LOG2E))
    grid = (max(1, math.ceil(sq / (16 * w))), H, B)
    fn(grid, (32 * w,), args, shared_mem=smem_bytes(c))
    return o, m, l


def reference(q, k, v, causal, scale):
    """float64 attention with o, m (natural log), l; rows that see no key: 0, -inf, 0."""
    import torch
    B, sq, H, hd = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    qf = q.double().permute(0, 2, 1, 3)
    kf = k.double().repeat_interleave(H // hkv, dim=2).permute(0, 2, 1, 3)
    vf = v.double().repeat_interleave(H // hkv, dim=2).permute(0, 2, 1, 3)
    s = (qf @ kf.transpose(-1, -2)) * scale
    if causal:
        i = torch.arange(sq, device=q.device)[:, None]
        j = torch.arange(sk, device=q.device)[None, :]
        s = s.masked_fill(j > i + sk - sq, float("-inf"))
    m = s.amax(-1) if sk > 0 else torch.full((B, H, sq), float("-inf"), device=q.device,
                                             dtype=torch.float64)
    base = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(s - base[..., None])
    l = p.sum(-1)
    o = (p @ vf) / torch.where(l > 0, l, torch.ones_like(l))[..., None]
    return o.permute(0, 2, 1, 3), m, l


def naive_lowp(q, k, v, causal, scale):
    """The plain attention in the inputs' dtype (FlashAttention's out_pt baseline)."""
    import torch
    B, sq, H, hd = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    qh = q.permute(0, 2, 1, 3)
    kh = k.repeat_interleave(H // hkv, dim=2).permute(0, 2, 1, 3)
    vh = v.repeat_interleave(H // hkv, dim=2).permute(0, 2, 1, 3)
    s = (qh @ kh.transpose(-1, -2)).float() * scale
    if causal:
        i = torch.arange(sq, device=q.device)[:, None]
        j = torch.arange(sk, device=q.device)[None, :]
        s = s.masked_fill(j > i + sk - sq, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0).to(q.dtype)
    return (p @ vh).permute(0, 2, 1, 3)


# -- correctness --------------------------------------------------------------------------------
SHAPES = [  # (batch, heads, heads_kv, seqlen_q, seqlen_k)
    (2, 4, 2, 128, 128),
    (1, 3, 3, 77, 203),
    (1, 4, 1, 203, 77),   # causal: the first 126 rows see no key
    (1, 2, 2, 1, 300),
    (1, 2, 2, 300, 1),
    (1, 2, 2, 64, 0),     # no keys at all
    (2, 2, 1, 513, 257),
]


def make_qkv(B, H, hkv, sq, sk, hd, dtype, packed, gen):
    import torch
    dev = "cuda"
    if packed:  # q, k, v as views of one (B, S, 3, H, hd) buffer: row strides 3 * H * hd
        assert H == hkv and sq == sk
        qkv = torch.randn(B, sq, 3, H, hd, device=dev, dtype=dtype, generator=gen)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = torch.randn(B, sq, H, hd, device=dev, dtype=dtype, generator=gen)
    k = torch.randn(B, sk, hkv, hd, device=dev, dtype=dtype, generator=gen)
    v = torch.randn(B, sk, hkv, hd, device=dev, dtype=dtype, generator=gen)
    return q, k, v


def check_config(c, cubins, gen, shapes=SHAPES):
    import torch
    dt, d, w, n, s, causal, _ = c
    dtype = torch.float16 if dt == "fp16" else torch.bfloat16
    fails = []
    worst = 0.0
    hds = sorted({d, d - 8, 8 if d == 32 else d - 24})
    cases = [(sh, hd, False) for sh in shapes for hd in hds[-1:]]  # full head_dim
    cases += [(sh, hd, False) for sh in shapes[:3] for hd in hds[:-1]]  # padded head_dim
    cases += [((2, 3, 3, 130, 130), d, True)]  # strided (packed qkv)
    for (B, H, hkv, sq, sk), hd, packed in cases:
        q, k, v = make_qkv(B, H, hkv, sq, sk, hd, dtype, packed, gen)
        scale = 1.0 / math.sqrt(hd)
        o, m, l = run_fwd(c, cubins, q, k, v, scale)
        torch.cuda.synchronize()
        o_ref, m_ref, l_ref = reference(q, k, v, causal, scale)
        tag = f"B{B} H{H}/{hkv} sq{sq} sk{sk} hd{hd}{' packed' if packed else ''}"
        if torch.isnan(o).any() or torch.isnan(m).any() or torch.isnan(l).any():
            fails.append(f"{tag}: NaN (unwritten or computed)")
            continue
        err = (o.double() - o_ref).abs().max().item() if o.numel() else 0.0
        base = (naive_lowp(q, k, v, causal, scale).double() - o_ref).abs().max().item() \
            if o.numel() and sk > 0 else 0.0
        worst = max(worst, err)
        if err > 2 * base + 1e-3:
            fails.append(f"{tag}: o err {err:.3g} > 2 * {base:.3g} + 1e-3")
        m64 = m.double()
        inf_ok = torch.equal(torch.isinf(m64), torch.isinf(m_ref)) and \
            bool((m64[torch.isinf(m64)] < 0).all())
        fin = ~torch.isinf(m_ref)
        if not inf_ok:
            fails.append(f"{tag}: m -inf pattern differs")
        elif fin.any():
            em = ((m64 - m_ref).abs()[fin] / (1 + m_ref.abs()[fin])).max().item()
            el = ((l.double() - l_ref).abs()[fin] / l_ref[fin]).max().item()
            if em > 1e-4 or el > 2e-3:
                fails.append(f"{tag}: m rel err {em:.3g}, l rel err {el:.3g}")
        if (~fin).any():
            rows0 = (~fin).permute(0, 2, 1)  # (B, sq, H)
            if (l.double()[~fin] != 0).any() or (o[rows0] != 0).any():
                fails.append(f"{tag}: a row that sees no key is not o = 0, l = 0")
    return fails, worst


# -- timing ---------------------------------------------------------------------------------------
def time_ms(fn, reps=30):
    import torch
    for _ in range(5):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return float(np.median(ts))


def bench(cubins, configs, out_lines):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    gen = torch.Generator(device="cuda").manual_seed(1)
    rows = []
    for d in sorted({c[1] for c in configs}):
        for causal in (0, 1):
            for sq in (1024, 4096, 16384):
                B, H = 16384 // sq, 2048 // d  # 16k tokens, hidden 2048 (FA2's benchmark)
                q, k, v = make_qkv(B, H, H, sq, sq, d, torch.bfloat16, False, gen)
                flops = 4 * B * H * sq * sq * d / (2 if causal else 1)  # QK^T and PV
                f = lambda: F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                    is_causal=bool(causal))
                o = torch.empty_like(q)
                tf = {}
                for rep in range(2):  # twice, interleaved: the spread is the noise
                    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                        tf.setdefault("torch-flash", []).append(flops / time_ms(f) / 1e9)
                    for c in configs:
                        if c[1] == d and c[5] == causal:
                            t = time_ms(lambda: run_fwd(c, cubins, q, k, v, d ** -0.5, o))
                            tf.setdefault(cfg_name(c)[9:], []).append(flops / t / 1e9)
                line = f"d{d} c{causal} B{B} H{H} S{sq}:" + " |".join(
                    f" {name.replace(f'd{d}_', '')} {a:.0f}/{b:.0f}" for name, (a, b) in tf.items())
                rows.append(line)
                print(line, flush=True)
                out_lines.append(line)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile-only", metavar="DIR")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--cubins", metavar="DIR")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--sanitize", action="store_true", help="a few tiny launches")
    ap.add_argument("--only", default="", help="substring filter on config names")
    a = ap.parse_args()
    if a.compile_only:
        Path(a.compile_only).mkdir(parents=True, exist_ok=True)
        cfgs = [c for c in dict.fromkeys(check_configs() + bench_configs())
                if a.only in cfg_name(c)]
        with ProcessPoolExecutor(os.cpu_count()) as ex:
            for r in ex.map(compile_cubin, [(c, a.arch, a.compile_only) for c in cfgs]):
                if r:
                    print(r)
        print(f"compiled {len(cfgs)} configs for {a.arch}")
        return 0
    import torch
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(torch.cuda.get_device_name(), flush=True)
    passed = failed = 0
    if a.sanitize:
        for c in [("bf16", 64, 2, 32, 2, 1, ()), ("bf16", 96, 1, 16, 1, 0, ()),
                  ("bf16", 160, 2, 32, 1, 1, ())]:
            fails, _ = check_config(c, a.cubins, gen, shapes=[(1, 2, 1, 75, 97),
                                                              (1, 1, 1, 97, 40)])
            print(cfg_name(c), "FAIL" if fails else "ok", *fails, sep="\n  " if fails else " ")
        return 0
    if a.check:
        for c in check_configs():
            if a.only not in cfg_name(c):
                continue
            fails, worst = check_config(c, a.cubins, gen)
            print(f"{'FAIL' if fails else 'ok  '} {cfg_name(c)} (max o err {worst:.3g})",
                  flush=True)
            for f in fails[:6]:
                print("     ", f)
            passed, failed = passed + (not fails), failed + bool(fails)
    if a.bench:
        lines = []
        bench(a.cubins, [c for c in bench_configs() if a.only in cfg_name(c)], lines)
    if a.check:
        print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
