"""The CUDA host path's Python cost, measured on a machine without a GPU.

    python bench/dev/host_profile_cpu.py [--profile CASE] [--rows 20]

torch CPU tensors stand in for CUDA ones: fastpath's torch backend with the device index,
stream and device switch stubbed, the driver's launch and memset replaced by no-ops, and an
H200's facts for the plans. What is left is what a CUDA call costs in Python: layout keys,
memo lookups, allocations (CPU ones here: cheaper than the caching allocator's), address
reads, parameter packing, tensor maps (all but the driver's encoding). Absolute numbers
differ from a GPU host's (the H200 machine of 2026-12-01 took 85.8 us for a fastpath
backward that took 55 us on its CPU-only sibling);
use it to compare two versions of the code on one machine, then confirm on the device with
bench/dev/host_overhead.py.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from cuflash import decode, fastpath, launch, tensor_map, varlen_fastpath  # noqa: E402

_H200 = launch.DeviceFacts(name="stand-in H200", arch="sm_90", sm_count=132,
                           smem_optin=227 * 1024)


class _StandInTorch(fastpath._Torch):
    """fastpath's torch backend on CPU tensors: device 0, stream 0, no device switch."""

    def __init__(self):
        super().__init__()
        self.device_index = lambda t: 0

    def stream(self):
        return 0

    def on_device(self, index):
        return fastpath._NO_SWITCH

    def layout(self, t):
        return (t.shape, t.stride(), t.dtype, 0)


def _stub_the_device(backend) -> None:
    launch.device_facts = lambda index: _H200
    launch._function_ptr = lambda spec, index, convert: 1
    launch.launch_packed = lambda *args: None
    launch.memset_async = lambda *args: None
    # the driver's tensor-map encoder (the Hopper forward loads with TMA): a no-op that
    # succeeds, so the layout checks and the map cache still run
    tensor_map._driver_encode = lambda: (lambda *args: 0)
    decode._functions_of = lambda spec, index: (1, 2, 3)
    decode._fast_backend = lambda arrays: backend


def _cases(backend) -> dict:
    bf16 = torch.bfloat16
    q, k, v, do = (torch.randn(1, 128, 4, 64, dtype=bf16) for _ in range(4))
    o, m, l, call = fastpath.forward_with_call(backend, q, k, v, True, None)
    flags = dict(causal=True, softmax_scale=None, window=None, softcap=None, num_splits=None)
    qd = torch.randn(1, 1, 16, 128, dtype=bf16)
    kd, vd = (torch.randn(1, 4, 4096, 128, dtype=bf16).transpose(1, 2) for _ in range(2))
    pq, pk, pv, pdo = (x.reshape(-1, 4, 64) for x in (q, k, v, do))
    cu = torch.tensor([0, 50, 128], dtype=torch.int32)
    layout = varlen_fastpath.Layout(cu, cu, 78, 78, None, True, None, None, None, None, None)
    po, pm, pl, fields = varlen_fastpath.forward(backend, pq, pk, pv, layout)
    from cuflash.varlen import VarlenStats

    stats = VarlenStats(pm, pl, **fields)
    return {
        "fastpath forward": lambda: fastpath.forward(backend, q, k, v, True, None),
        "fastpath backward": lambda: fastpath.backward(backend, do, q, k, v, o, m, l, True,
                                                       None, False),
        "fastpath backward after forward": lambda: fastpath.backward(
            backend, do, q, k, v, o, m, l, True, None, False, forward_call=call),
        "decode_cuda (1, 4k GQA)": lambda: decode.decode_cuda(backend, qd, kd, vd, {}, flags),
        "decode API (1, 4k GQA)": lambda: decode.attention_with_kvcache(qd, kd, vd,
                                                                        causal=True),
        "varlen forward": lambda: varlen_fastpath.forward(backend, pq, pk, pv, layout),
        "varlen backward": lambda: varlen_fastpath.backward(backend, pdo, pq, pk, pv, po, stats,
                                                            layout, False),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", help="a case to profile with cProfile afterwards")
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--calls", type=int, default=2000, help="calls per timing (5 timings)")
    args = ap.parse_args()
    backend = _StandInTorch()
    _stub_the_device(backend)
    cases = _cases(backend)
    width = max(map(len, cases)) + 2
    for name, fn in cases.items():
        for _ in range(min(200, args.calls)):
            fn()
        best = min(_per_call(fn, args.calls) for _ in range(5))
        print(f"{name:<{width}} {best:7.1f} us per call (best of 5)")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            cases[args.profile]()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.rows)


def _per_call(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


if __name__ == "__main__":
    main()
