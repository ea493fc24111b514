"""Energy and clocks beside time: is the compiled GQA training step bound by the power cap?

    python bench/dev/energy_probe.py [--blocks 4] [--block-steps 20] [--seconds 1.5]

An H200 runs at its 700 W cap through a compiled training step, and its SM clock drops
(1.5-1.8 GHz against 1.98 idle-to-moderate, session 15's power log): a path that does the
same work in less time but with more energy can then lose time elsewhere in the step. This
reads NVML's energy counter (mJ) and samples the SM clock (every 5 ms, in a thread) around:

1. attention forward + backward at the GQA training shape (1, 4096, 16 / 4 heads, d128,
   causal, bf16), cuflash.torch and SDPA in turns, each looped for ``--seconds``;
2. bench/train_small.py's GQA model, eager and compiled, the two attentions in turns of
   ``--block-steps`` steps.

Prints ms, J and mean W and MHz per call or step. NVML through ctypes (the driver's
libnvidia-ml.so.1); nothing is set on the device.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import cuflash.torch as ct  # noqa: E402
from train_small import GQA, build_torch_model, make_batches, set_attention, torch_step  # noqa: E402

_NVML_CLOCK_SM = 1


class Nvml:
    """The three NVML reads this probe needs, for GPU 0."""

    def __init__(self):
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        assert self.lib.nvmlInit_v2() == 0
        self.handle = ctypes.c_void_p()
        assert self.lib.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(self.handle)) == 0

    def energy_mj(self) -> int:
        value = ctypes.c_ulonglong()
        assert self.lib.nvmlDeviceGetTotalEnergyConsumption(self.handle,
                                                            ctypes.byref(value)) == 0
        return value.value

    def sm_mhz(self) -> int:
        value = ctypes.c_uint()
        assert self.lib.nvmlDeviceGetClockInfo(self.handle, _NVML_CLOCK_SM,
                                               ctypes.byref(value)) == 0
        return value.value


class Sampler:
    """SM clock samples every ``period`` seconds while inside the ``with``."""

    def __init__(self, nvml: Nvml, period: float = 0.005):
        self.nvml, self.period, self.samples = nvml, period, []

    def __enter__(self):
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop.is_set():
            self.samples.append(self.nvml.sm_mhz())
            time.sleep(self.period)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def measure(nvml: Nvml, work, count: int) -> dict:
    """Run ``work`` ``count`` times (synchronized at both ends): ms, J per call, W, MHz."""
    torch.cuda.synchronize()
    with Sampler(nvml) as clocks:
        e0, t0 = nvml.energy_mj(), time.perf_counter()
        for _ in range(count):
            work()
        torch.cuda.synchronize()
        t1, e1 = time.perf_counter(), nvml.energy_mj()
    seconds, joules = t1 - t0, (e1 - e0) / 1e3
    return {"ms": seconds / count * 1e3, "J": joules / count, "W": joules / seconds,
            "MHz": statistics.mean(clocks.samples) if clocks.samples else float("nan")}


def report(title: str, rows: dict) -> None:
    print(title)
    for name, runs in rows.items():
        med = {k: statistics.median(r[k] for r in runs) for k in ("ms", "J", "W", "MHz")}
        each = " ".join(f"{r['ms']:.3f}" for r in runs)
        print(f"  {name:8s} {med['ms']:8.3f} ms  {med['J']:7.3f} J  {med['W']:6.1f} W  "
              f"{med['MHz']:6.0f} MHz   (ms by turn: {each})")


def attention_calls(nvml: Nvml, rounds: int, seconds: float) -> None:
    torch.manual_seed(0)
    b, s, h, hkv, d = 1, 4096, 16, 4, 128
    q = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(b, s, hkv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    do = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)

    def cuflash_step():
        ct.flash_attention(q, k, v, causal=True).backward(do)

    def sdpa_step():
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True, enable_gqa=True)
        o.transpose(1, 2).backward(do)

    paths = {"sdpa": sdpa_step, "cuflash": cuflash_step}
    counts = {}
    for name, fn in paths.items():  # warm up, and size each turn to about ``seconds``
        for _ in range(5):
            fn()
        counts[name] = max(10, int(seconds / (measure(nvml, fn, 20)["ms"] / 1e3)))
    rows = {name: [] for name in paths}
    for r in range(rounds):
        for name in (list(paths) if r % 2 == 0 else list(paths)[::-1]):
            rows[name].append(measure(nvml, paths[name], counts[name]))
    report("attention fwd+bwd (1, 4096, 16/4, d128, causal, bf16), per call:", rows)


def training_steps(nvml: Nvml, blocks: int, block_steps: int, compiled: bool) -> None:
    torch.manual_seed(0)
    init = build_torch_model(GQA, "sdpa").cuda()
    batches = torch.from_numpy(make_batches(GQA, block_steps, 0)).cuda()
    if compiled:
        torch._dynamo.reset()
    steps = {}
    for attention in ("sdpa", "cuflash"):
        model = copy.deepcopy(init)
        set_attention(model, attention)
        steps[attention] = torch_step(model, "cuda", compiled, 1e-4)
        for i in range(3):  # compile and warm up
            steps[attention](batches[i])
    rows = {name: [] for name in steps}
    for r in range(blocks):
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            batch_iter = iter(range(block_steps))
            rows[name].append(measure(nvml, lambda: steps[name](batches[next(batch_iter)]),
                                      block_steps))
    report(f"GQA model training step ({'compiled' if compiled else 'eager'}), per step:", rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--block-steps", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=1.5)
    args = parser.parse_args()
    nvml = Nvml()
    print(torch.cuda.get_device_name(), torch.__version__)
    attention_calls(nvml, args.blocks, args.seconds)
    training_steps(nvml, args.blocks, args.block_steps, compiled=False)
    training_steps(nvml, args.blocks, args.block_steps, compiled=True)


if __name__ == "__main__":
    main()
