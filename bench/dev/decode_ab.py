"""Tensor-core decode variants side by side (experiment): the current kernel's tiles with and
without extra -D flags, and an older copy of the kernel source (kernels_cu/<file>).

    python bench/dev/decode_ab.py --rows 1,32768,8 8,8192,8 64,2048,8 --q-len 1 \
        --variant v0:flash_decode_mma_v0.cu:64,2,2 new::64,2,2 new_nol2::64,2,2:CF_X_L2=0

A variant is label:source(empty: current):block_n,stages,min_blocks[,warps[,rows]][:NAME=VALUE,...].
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import _events_ms, _graph_of  # noqa: E402
from decode_variants import _pinned_call, HEADS, HEAD_DIM  # noqa: E402


def _spec_class():
    from cuflash import decode

    @dataclasses.dataclass(frozen=True)
    class Variant(decode.DecodeMmaSpec):
        label: str = ""
        extra: tuple = ()

        @property
        def name(self):
            return f"{super().name}_{self.label}"

        @property
        def defines(self):
            return {**super().defines, **dict(self.extra)}
    return Variant


_REPORTS: dict = {}  # spec name -> the split kernel's report (a cached cubin has no log)


def _report(compiler, spec, arch):
    if spec.name not in _REPORTS:
        _REPORTS[spec.name] = ([r for r in compiler.compile_report(spec, arch)
                                if r.function == "flash_decode_split"] or [None])[0]
    return _REPORTS[spec.name]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", nargs="+", default=["1,32768,8", "8,8192,8", "64,2048,8"])
    ap.add_argument("--q-len", type=int, nargs="+", default=[1])
    ap.add_argument("--variant", nargs="+", required=True)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    import torch

    from cuflash import compiler, decode, launch

    Variant = _spec_class()
    arch = launch.device_facts(torch.cuda.current_device()).arch
    for text in args.rows:
        batch, cache, heads_kv = (int(x) for x in text.split(","))
        for q_len in args.q_len:
            gen = torch.Generator(device="cuda").manual_seed(0)
            mk = lambda s, h: torch.randn((batch, s, h, HEAD_DIM), device="cuda",
                                          dtype=torch.bfloat16, generator=gen)
            q, k, v = mk(q_len, HEADS), mk(cache, heads_kv), mk(cache, heads_kv)
            kv_bytes = 2 * k.numel() * k.element_size()
            rows = q_len * HEADS // heads_kv
            base = decode.mma_spec("bfloat16", HEAD_DIM, rows)
            ref = _pinned_call(torch, decode.DecodeSpec("bfloat16", HEAD_DIM, 8, 1, 2), q, k,
                               v)[0]() if rows <= 8 else None
            print(f"-- {batch}/{cache}/{heads_kv} q_len {q_len} (rows {rows}, tile {base.name})")
            specs = []
            for v_text in args.variant:
                parts = v_text.split(":")
                label, source, tiles = parts[0], parts[1], parts[2]
                extra = tuple((a, int(b)) for a, b in (x.split("=") for x in parts[3].split(","))
                              ) if len(parts) > 3 else ()
                block_n, stages, blocks, *w = (int(x) for x in tiles.split(","))
                try:
                    spec = Variant("bfloat16", HEAD_DIM, block_n, stages, w[0] if w else base.warps, blocks,
                                   w[1] if len(w) > 1 else base.rows,
                                   source=source or "flash_decode_mma.cu",
                                   label=label, extra=extra)
                except ValueError as e:
                    print(f"   {label} {tiles}: refused ({e})")
                    continue
                specs.append(spec)
            with ThreadPoolExecutor(8) as pool:  # NVRTC outside the GIL
                reps = list(pool.map(lambda x: _report(compiler, x, arch), specs))
            specs, reps = zip(*[(x, r) for x, r in zip(specs, reps) if r is not None])
            specs = list(zip(specs, reps))
            results = {s.name: [] for s, _ in specs}
            for _ in range(args.rounds):
                for spec, rep in specs:
                    if rep.spills:
                        continue
                    call, plan = _pinned_call(torch, spec, q, k, v)
                    out = call()
                    if ref is None:
                        ref = out
                    else:
                        diff = float((out.float() - ref.float()).abs().max())
                        if diff > 2e-2:
                            print(f"   {spec.name} WRONG max diff {diff:.3g}")
                    ms = _events_ms(torch, _graph_of(torch, call).replay, args.reps)
                    results[spec.name].append(kv_bytes / ms / 1e9)
            for spec, rep in specs:
                tb = results[spec.name]
                shown = " ".join(f"{x:5.2f}" for x in tb) if tb else f"spills {rep.spills}"
                print(f"   {spec.name:52s} {rep.registers:3d} regs  smem {spec.smem_bytes:6d}  "
                      f"TB/s {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
