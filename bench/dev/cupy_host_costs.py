"""What the CuPy API's forward spends its host time on: the primitives it is made of, each
timed alone, then whole calls (the CuPy API, fastpath alone, the torch API, cuflash.torch,
SDPA), all in one process.

    python bench/dev/cupy_host_costs.py [--calls 2000] [--rounds 5] [--only-calls]

Run it from two trees (PYTHONPATH=.old ...; then this one) to compare whole calls. Each row
is the median over rounds of the mean over ``calls`` back-to-back calls, in microseconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[2]))  # after PYTHONPATH: it picks the tree

import cupy  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import cuflash  # noqa: E402
import cuflash.torch as ct  # noqa: E402
from cuflash import fastpath  # noqa: E402
from cuflash.stats import SoftmaxStats  # noqa: E402


def us_per_call(fn, calls: int, rounds: int) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def primitives() -> dict:
    shape, stats_shape = (1, 128, 4, 64), (1, 4, 128)
    a = cupy.empty(shape, dtype=np.float32)
    mem = cupy.cuda.alloc(2 * 4 * 512)
    f32 = np.dtype(np.float32)
    record = dict(causal=True, softmax_scale=0.125, shape_q=shape, shape_kv=shape, window=None,
                  softcap=None, alibi_slopes=None, sinks=None, dropout=None)

    def pair_by_index():
        s = cupy.empty((2, *stats_shape), dtype=f32)
        return s[0], s[1]

    def pair_by_memptr():
        p = cupy.cuda.alloc(2 * 4 * 512)
        return (cupy.ndarray(stats_shape, f32, memptr=p),
                cupy.ndarray(stats_shape, f32, memptr=p + 4 * 512))

    def stats_fast():
        s = object.__new__(SoftmaxStats)
        s.__dict__.update(record, m=a, l=a)
        return s

    return {
        "loop floor (lambda: None)": lambda: None,
        "cupy.empty o (1,128,4,64)": lambda: cupy.empty(shape, dtype=f32),
        "cupy.ndarray(shape, dtype)": lambda: cupy.ndarray(shape, f32),
        "cupy.empty stats (1,4,128)": lambda: cupy.empty(stats_shape, dtype=f32),
        "cupy.cuda.alloc(4 KB)": lambda: cupy.cuda.alloc(4096),
        "ndarray(memptr=) view": lambda: cupy.ndarray(stats_shape, f32, memptr=mem),
        "m, l: one empty + [0], [1]": pair_by_index,
        "m, l: one alloc + 2 memptr": pair_by_memptr,
        "a.device.id": lambda: a.device.id,
        "a.data.device_id": lambda: a.data.device_id,
        "a.data.ptr": lambda: a.data.ptr,
        "(a.shape, a.strides, a.dtype)": lambda: (a.shape, a.strides, a.dtype),
        "runtime.getDevice()": cupy.cuda.runtime.getDevice,
        "get_current_stream().ptr": lambda: cupy.cuda.get_current_stream().ptr,
        "SoftmaxStats(...) 8 fields": lambda: SoftmaxStats(a, a, causal=True, softmax_scale=0.125,
                                                          shape_q=shape, shape_kv=shape,
                                                          window=None, softcap=None,
                                                          alibi_slopes=None, sinks=None),
        "SoftmaxStats via __dict__": stats_fast,
    }


def whole_calls() -> dict:
    shape = (1, 128, 4, 64)
    q, k, v = (torch.randn(*shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cq, ck, cv = (cupy.from_dlpack(x) for x in (q, k, v))
    cb = fastpath.cupy_backend()

    def sdpa():
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2), is_causal=True).transpose(1, 2)

    return {
        "cupy API attention_forward": lambda: cuflash.attention_forward(cq, ck, cv, causal=True),
        "cupy API attention (o only)": lambda: cuflash.attention(cq, ck, cv, causal=True),
        "cupy fastpath.forward": lambda: fastpath.forward(cb, cq, ck, cv, True, None),
        "torch API attention_forward": lambda: cuflash.attention_forward(q, k, v, causal=True),
        "cuflash.torch forward (no grad)": lambda: ct.flash_attention(q, k, v, causal=True),
        "sdpa forward": sdpa,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--only-calls", action="store_true")
    args = p.parse_args()
    print(f"cuflash from {Path(cuflash.__file__).parent}, cupy {cupy.__version__}, "
          f"torch {torch.__version__}")
    groups = [("whole calls", whole_calls())]
    if not args.only_calls:
        groups.append(("primitives", primitives()))
    for title, rows in groups:
        print(f"== {title}, us per call")
        width = max(map(len, rows)) + 2
        for name, fn in rows.items():
            print(f"{name:<{width}} {us_per_call(fn, args.calls, args.rounds):7.2f}")


if __name__ == "__main__":
    main()
