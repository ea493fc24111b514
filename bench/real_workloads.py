"""The calls real models make, next to the peers, in one process (issue: real workloads).

    python bench/real_workloads.py --out DIR [--quick] [--skip jax,gqa,...]

Sections (each prints a table; all go to DIR/real_workloads.json, and a plot to
DIR/real_workloads.png when matplotlib is there):

* host: microseconds of host time per call at a tiny shape (1, 128, 4, 64) bf16, where the
  GPU work is negligible: N calls back to back, then one synchronize, the rows taking turns
  over 7 rounds (each row's median); cuflash.torch forward
  and forward+backward, the CuPy API forward and backward, cuflash.jax under jax.jit,
  torch SDPA forward and forward+backward beside them.
* gqa: forward+backward at (batch 1, heads 16, seqlen 4096, head_dim 128, causal) with
  heads_kv 16 / 4 / 1 through cuflash.torch and torch SDPA's default choice, taking turns
  over 5 rounds (each side's median); TFLOP/s counted
  with the query heads (4 * B * H * S^2 * D, halved for causal, x 3.5 for fwd+bwd).
* short: seqlen 1024 and 2048, batch 16, heads 16, head_dim 64 / 128, causal and not:
  forward and backward alone, cuflash vs SDPA's flash backend (FlashAttention-2).
* long: 16k tokens at seqlen 4k / 16k, head_dim 64 / 128, causal and not, forward and
  backward: cuflash, SDPA's flash backend (FlashAttention-2) and cuDNN.
* jax: head_dim 128, seqlen 4k / 16k: the jitted forward and forward+backward of
  cuflash.jax against the same kernels through cuflash.torch; both back to back (JAX by
  wall clock over 10 enqueued calls, torch by CUDA events), i.e. throughput.

Timing: CUDA-event medians over repeated back-to-back batches of calls after a warm-up
(``time_ms``); every timed input is random (never zeros).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import cuflash  # noqa: E402
import cuflash.torch as ct  # noqa: E402

BF16 = torch.bfloat16


def time_ms(fn, reps: int = 20, inner: int = 5, warmup: int = 3) -> float:
    """Median milliseconds per call: ``inner`` calls back to back between two CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def queued_ms(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median CUDA-event milliseconds of one call among calls queued back to back behind a
    sleep kernel (as bench/attention_sweep.py; bench/dev/devtools.time_ms): the GPU's time, the
    host's per-call work hidden as in a training loop that keeps ahead of the GPU."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    torch.cuda._sleep(50_000_000)  # ~25 ms of GPU work: the host gets ahead of the queue
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def save_rows(path, rows) -> None:
    """The bench scripts' JSON: {"device": this GPU's name, "rows": rows} at ``path``."""
    with open(path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(0), "rows": rows}, f, indent=1)


def wall_ms(enqueue, block, calls: int = 10, reps: int = 5) -> float:
    """Median milliseconds per call for work on another framework's stream (JAX): ``calls``
    enqueued back to back, then ``block`` on the last result; wall clock, as torch's events
    cannot see JAX's stream."""
    block(enqueue())
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(calls):
            last = enqueue()
        block(last)
        times.append((time.perf_counter() - start) * 1e3 / calls)
    return statistics.median(times)


def host_us(fn, calls: int = 400) -> float:
    """Host microseconds per call: calls back to back, one synchronize at the end."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def host_us_rows(rows: dict, calls: int = 400, rounds: int = 7) -> dict:
    """``host_us`` of every row, the rows taking turns round after round, each row's median
    over the rounds: a drift of the host's speed during the run (one process measured SDPA's
    forward at 22.8 us and, a minute later, 26.7) then falls on every row alike."""
    times = {name: [] for name in rows}
    for _ in range(rounds):
        for name, fn in rows.items():
            times[name].append(host_us(fn, calls))
    return {name: statistics.median(t) for name, t in times.items()}


def rand(*shape, grad=False):
    return torch.randn(*shape, device="cuda", dtype=BF16).requires_grad_(grad)


def sdpa(q, k, v, causal):
    """SDPA on cuflash's (batch, seq, heads, dim) layout; GQA through enable_gqa."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                          v.transpose(1, 2), is_causal=causal,
                                          enable_gqa=k.shape[2] != q.shape[2]).transpose(1, 2)


def fwd_bwd(attn, q, k, v, do, causal):
    def run():
        o = attn(q, k, v, causal)
        torch.autograd.grad(o, (q, k, v), do)
    return run


def cuflash_torch(q, k, v, causal):
    return ct.flash_attention(q, k, v, causal=causal)


class _NoopAttention(torch.autograd.Function):
    """The floor of any Python autograd.Function on CUDA tensors: one output allocated in
    the forward, three gradients in the backward, no kernels."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.save_for_backward(q, k, v)
        return torch.empty_like(q)

    @staticmethod
    def backward(ctx, do):
        q, k, v = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _noop_attention(q, k, v, causal):
    return _NoopAttention.apply(q, k, v)


# -- sections -------------------------------------------------------------------------------


def section_host(args) -> dict:
    shape = (1, 128, 4, 64)
    q, k, v = (rand(*shape, grad=True) for _ in range(3))
    do = rand(*shape)
    qn, kn, vn = (x.detach() for x in (q, k, v))
    rows = {
        "autograd.Function floor fwd+bwd": fwd_bwd(_noop_attention, q, k, v, do, True),
        "cuflash.torch forward": lambda: cuflash_torch(qn, kn, vn, True),
        "sdpa forward": lambda: sdpa(qn, kn, vn, True),
        "cuflash.torch fwd+bwd": fwd_bwd(cuflash_torch, q, k, v, do, True),
        "sdpa fwd+bwd": fwd_bwd(sdpa, q, k, v, do, True),
    }
    import cupy

    cq, ck, cv, cdo = (cupy.from_dlpack(x) for x in (qn, kn, vn, do))
    o, stats = cuflash.attention_forward(cq, ck, cv, causal=True)
    rows["cupy API forward"] = lambda: cuflash.attention_forward(cq, ck, cv, causal=True)
    rows["cupy API backward"] = lambda: cuflash.attention_backward(cdo, cq, ck, cv, o, stats,
                                                                   causal=True)
    out = host_us_rows(rows)
    if "jax" not in args.skip:  # after the others: JAX's runtime threads share the host's cores
        out.update(host_us_rows(_jax_host_rows(shape)))
    print("\n== host time per call, (1, 128, 4, 64) bf16 causal, us")
    for name, us in out.items():
        print(f"{name:<26} {us:8.1f}")
    return out


def _jax_host_rows(shape) -> dict:
    import jax
    import jax.numpy as jnp

    import cuflash.jax as cj

    key = jax.random.key(0)
    q, k, v = (jax.random.normal(kk, shape, jnp.bfloat16) for kk in jax.random.split(key, 3))
    fwd = jax.jit(lambda q, k, v: cj.flash_attention(q, k, v, causal=True))
    grad = jax.jit(jax.grad(lambda q, k, v: cj.flash_attention(q, k, v, causal=True)
                            .astype(jnp.float32).sum(), argnums=(0, 1, 2)))
    ref = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))
    fwd(q, k, v).block_until_ready(), grad(q, k, v)[0].block_until_ready()
    return {"cuflash.jax jit forward": lambda: fwd(q, k, v).block_until_ready(),
            "cuflash.jax jit fwd+bwd": lambda: grad(q, k, v)[0].block_until_ready(),
            "jax.nn attention jit forward": lambda: ref(q, k, v).block_until_ready()}


def section_gqa(args) -> dict:
    out = {}
    print("\n== GQA / MQA fwd+bwd, batch 1, heads 16, seqlen 4096, head_dim 128, causal, bf16")
    print(f"{'heads_kv':>8} {'cuflash ms':>11} {'sdpa ms':>9} {'cuflash TF/s':>13} {'sdpa TF/s':>10}")
    flops = 3.5 * 4 * 16 * 4096 * 4096 * 128 / 2
    for heads_kv in (16, 4, 1):
        q, do = rand(1, 4096, 16, 128, grad=True), rand(1, 4096, 16, 128)
        k, v = (rand(1, 4096, heads_kv, 128, grad=True) for _ in range(2))
        # alternating, 5 rounds, each side's median: clocks drift over a run (this section
        # once measured cuflash 0.653 ms in one process and 0.603-0.607 in three fresh ones,
        # SDPA 0.625-0.634 throughout)
        mine, peer = (statistics.median(t) for t in zip(*(
            (time_ms(fwd_bwd(cuflash_torch, q, k, v, do, True)),
             time_ms(fwd_bwd(sdpa, q, k, v, do, True))) for _ in range(5))))
        out[heads_kv] = {"cuflash_ms": mine, "sdpa_ms": peer,
                         "cuflash_tflops": flops / mine / 1e9, "sdpa_tflops": flops / peer / 1e9}
        print(f"{heads_kv:>8} {mine:11.3f} {peer:9.3f} {flops / mine / 1e9:13.1f} "
              f"{flops / peer / 1e9:10.1f}")
    return out


def section_short(args) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    print("\n== short sequences, batch 16, heads 16, bf16: TFLOP/s (cuflash / FA-2 = SDPA flash)")
    for seqlen in (1024, 2048):
        for d in (64, 128):
            for causal in (False, True):
                q, k, v = (rand(16, seqlen, 16, d, grad=True) for _ in range(3))
                do = rand(16, seqlen, 16, d)
                flops = 4 * 16 * 16 * seqlen * seqlen * d / (2 if causal else 1)
                row = {}
                qn, kn, vn = (x.detach() for x in (q, k, v))
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    for name, attn in (("cuflash", cuflash_torch), ("fa2", sdpa)):
                        fwd = time_ms(lambda: attn(qn, kn, vn, causal))
                        o = attn(q, k, v, causal)
                        bwd = time_ms(lambda: torch.autograd.grad(o, (q, k, v), do,
                                                                  retain_graph=True))
                        row[name] = {"fwd_tflops": flops / fwd / 1e9,
                                     "bwd_tflops": 2.5 * flops / bwd / 1e9}
                out[f"s{seqlen}_d{d}{'_causal' if causal else ''}"] = row
                print(f"seqlen {seqlen} d{d} {'causal' if causal else 'full  '}: fwd "
                      f"{row['cuflash']['fwd_tflops']:6.1f} / {row['fa2']['fwd_tflops']:6.1f}  "
                      f"bwd {row['cuflash']['bwd_tflops']:6.1f} / {row['fa2']['bwd_tflops']:6.1f}")
    return out


def section_jax(args) -> dict:
    import jax
    import jax.numpy as jnp

    import cuflash.jax as cj

    out = {}
    print("\n== cuflash.jax under jit vs the same kernels through cuflash.torch, d128 bf16, "
          "TFLOP/s (jax / torch)")
    for seqlen in (4096, 16384):
        batch = max(1, 16384 // seqlen)
        flops = 4 * batch * 16 * seqlen * seqlen * 128
        key = jax.random.key(seqlen)
        q, k, v = (jax.random.normal(kk, (batch, seqlen, 16, 128), jnp.bfloat16)
                   for kk in jax.random.split(key, 3))
        fwd = jax.jit(lambda q, k, v: cj.flash_attention(q, k, v))
        grad = jax.jit(jax.grad(lambda q, k, v: cj.flash_attention(q, k, v)
                                .astype(jnp.float32).sum(), argnums=(0, 1, 2)))
        jf = wall_ms(lambda: fwd(q, k, v), lambda o: o.block_until_ready())
        jg = wall_ms(lambda: grad(q, k, v), lambda g: [x.block_until_ready() for x in g])
        tq, tk, tv = (rand(batch, seqlen, 16, 128, grad=True) for _ in range(3))
        tdo = rand(batch, seqlen, 16, 128)
        tf = time_ms(lambda: cuflash_torch(tq.detach(), tk.detach(), tv.detach(), False))
        tg = time_ms(fwd_bwd(cuflash_torch, tq, tk, tv, tdo, False))
        out[seqlen] = {"jax_fwd_tflops": flops / jf / 1e9, "torch_fwd_tflops": flops / tf / 1e9,
                       "jax_fwdbwd_tflops": 3.5 * flops / jg / 1e9,
                       "torch_fwdbwd_tflops": 3.5 * flops / tg / 1e9}
        r = out[seqlen]
        print(f"seqlen {seqlen}: fwd {r['jax_fwd_tflops']:6.1f} / {r['torch_fwd_tflops']:6.1f} "
              f"({r['jax_fwd_tflops'] / r['torch_fwd_tflops']:.2f}x)   fwd+bwd "
              f"{r['jax_fwdbwd_tflops']:6.1f} / {r['torch_fwdbwd_tflops']:6.1f} "
              f"({r['jax_fwdbwd_tflops'] / r['torch_fwdbwd_tflops']:.2f}x)")
    return out


def section_long(args) -> dict:
    """The issue tables' shapes: 16k tokens (batch = 16k / seqlen), 16 heads, bf16."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    peers = {"fa2": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    print("\n== long sequences, 16k tokens, 16 heads, bf16: TFLOP/s fwd | bwd "
          "(cuflash / FA-2 / cuDNN)")
    for d in (64, 128):
        for seqlen in (4096, 16384):
            for causal in (False, True):
                batch = 16384 // seqlen
                q, k, v = (rand(batch, seqlen, 16, d, grad=True) for _ in range(3))
                do = rand(batch, seqlen, 16, d)
                flops = 4 * batch * 16 * seqlen * seqlen * d / (2 if causal else 1)
                qn, kn, vn = (x.detach() for x in (q, k, v))
                row = {}
                for name, attn in (("cuflash", cuflash_torch), ("fa2", sdpa), ("cudnn", sdpa)):
                    with sdpa_kernel(peers.get(name, SDPBackend.FLASH_ATTENTION)):
                        fwd = time_ms(lambda: attn(qn, kn, vn, causal), reps=10, inner=2)
                        o = attn(q, k, v, causal)
                        bwd = time_ms(lambda: torch.autograd.grad(o, (q, k, v), do,
                                                                  retain_graph=True),
                                      reps=10, inner=2)
                    row[name] = {"fwd_tflops": flops / fwd / 1e9,
                                 "bwd_tflops": 2.5 * flops / bwd / 1e9}
                out[f"d{d}_s{seqlen}{'_causal' if causal else ''}"] = row
                print(f"d{d} {seqlen:>5} {'causal' if causal else 'full  '}: fwd "
                      + " / ".join(f"{row[n]['fwd_tflops']:5.0f}" for n in row) + "   bwd "
                      + " / ".join(f"{row[n]['bwd_tflops']:5.0f}" for n in row))
    return out


SECTIONS = {"host": section_host, "gqa": section_gqa, "short": section_short, "jax": section_jax,
            "long": section_long}


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    if "host" in result:
        names = list(result["host"])
        axes[0].barh(names, [result["host"][n] for n in names])
        axes[0].set_xlabel("host us per call")
    if "gqa" in result:
        kv = list(result["gqa"])
        axes[1].plot(kv, [result["gqa"][h]["cuflash_tflops"] for h in kv], "o-", label="cuflash")
        axes[1].plot(kv, [result["gqa"][h]["sdpa_tflops"] for h in kv], "s-", label="SDPA")
        axes[1].set_xlabel("heads_kv (16 query heads)")
        axes[1].set_ylabel("fwd+bwd TFLOP/s")
        axes[1].legend()
    fig.suptitle(f"{result['device']} {result['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--skip", default="", help="comma-separated sections to skip")
    args = p.parse_args()
    args.skip = set(filter(None, args.skip.split(",")))
    result = {"device": torch.cuda.get_device_name(),
              "date": datetime.datetime.now().isoformat(timespec="seconds")}
    for name, section in SECTIONS.items():
        if name not in args.skip:
            torch.manual_seed(0)
            result[name] = section(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "real_workloads.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / "real_workloads.png")
    print(f"wrote {args.out / 'real_workloads.json'}")


if __name__ == "__main__":
    main()
