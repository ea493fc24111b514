"""What dropout costs the Hopper kernels, and the candidates that may cut it (#15: a dropout
step at most 15% over the same step without), one process, alternating rounds
(``gpu_suite.sh dropout_ab``).

    python bench/dev/dropout_ab.py [--head-dims 64,128] [--rounds 3] [--out rows.json]

Variants, each timed forward, backward and step (forward + backward), CUDA-event medians:
  none        no dropout (the selection)
  drop        dropout p = 0.1 (the selection)
  early       the forward drawing its kept flags while its products run (CF_FWD_DROP_EARLY=1)
  early_pers  that, with persistent blocks (CF_FWD_PERSISTENT=1)
  fold        the backward with 1 / (1 - p) folded into its staged lse2 and delta
              (CF_BWD_DROP_FOLD=1) where the selection multiplies P and dP by it
  r7          Philox with 7 rounds instead of 10 in forward and backward (CF_PHILOX_ROUNDS=7:
              other masks than cuflash.philox's, so timing only), early forward
  packed      the forward dropping P after packing it, by byte masks (CF_DROP_PACKED=1,
              cf_drop_packed.cuh: the same bits, fewer instructions; selected since session
              37, so `drop` has it now)
  unpacked    the forward dropping the floats before packing (CF_DROP_PACKED=0: the selection
              before session 37)
  packed_r7   packed with 7 Philox rounds in forward and backward (timing only, as r7)
  m128        the d64 forward with dropout on two consumer warpgroups (128 query rows, 12
              warps, 232 registers each) where the selection takes three (192 rows, 16 warps,
              160 registers: Philox's state and the kept flags may crowd them; the d64
              forward ran 2.1x slower with dropout in session 31)
  m128_early  that, drawing its flags early (CF_FWD_DROP_EARLY=1)
  tma         forward and backward loading with bulk tensor copies (CF_FWD_TMA=1 /
              CF_BWD_TMA=1; selected since session 33, so `drop` has them now)
  m128_tma    m128 and tma together
  ring        the forward's kept flags drawn by the producer's idle warps into 2 slots of
              shared memory (CF_DROP_RING=2, cf_drop_ring.cuh; two consumers, the K/V stages
              that fit); ring3: 3 slots; ring_tile: that tile with the consumers drawing
  bwd_ring    the backward's kept flags drawn by its producer's warps 1 and 2 (CF_DROP_RING=2);
              rings: ring and bwd_ring together
Rows: 16k tokens a batch (4 x 4k, 1 x 16k), 16 heads, bf16, causal or not. Before timing,
``early`` and ``early_pers`` outputs are compared with ``drop``'s bit for bit. SDPA's flash
backend with and without dropout is timed beside (cuDNN takes no dropout).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from devtools import time_ms  # noqa: E402

P = 0.1
VARIANTS = {
    "none": ({}, {}),
    "drop": ({}, {}),
    "early": ({"CF_FWD_DROP_EARLY": 1}, {}),
    "early_pers": ({"CF_FWD_DROP_EARLY": 1, "CF_FWD_PERSISTENT": 1}, {}),
    "fold": ({}, {"CF_BWD_DROP_FOLD": 1}),
    "r7": ({"CF_FWD_DROP_EARLY": 1, "CF_PHILOX_ROUNDS": 7}, {"CF_PHILOX_ROUNDS": 7}),
    "packed": ({"CF_DROP_PACKED": 1}, {}),
    "unpacked": ({"CF_DROP_PACKED": 0}, {}),
    "packed_r7": ({"CF_DROP_PACKED": 1, "CF_PHILOX_ROUNDS": 7}, {"CF_PHILOX_ROUNDS": 7}),
    "m128": ({}, {}),
    "m128_early": ({"CF_FWD_DROP_EARLY": 1}, {}),
    "tma": ({}, {}),
    "m128_tma": ({}, {}),
    "ring": ({}, {}),
    "ring3": ({}, {}),
    "ring_tile": ({}, {}),
    "bwd_ring": ({}, {}),
    "rings": ({}, {}),
}
TWO_CONSUMERS = ("m128", "m128_early", "m128_tma")  # variants that move the forward off 192 rows
BOXED = ("tma", "m128_tma")  # variants loading with bulk tensor copies
# the flags drawn by the producer's idle warps (CF_DROP_RING: 2 / 3 slots), and the tile it
# runs on (two consumers, the stages that fit) with the consumers drawing, as selected
RINGS = {"ring": 2, "ring3": 3, "ring_tile": 0, "rings": 2}
BWD_RINGS = ("bwd_ring", "rings")  # the backward's flags drawn by its producer's warps 1, 2


def _variant(variant: str) -> contextlib.ExitStack:
    """A context in which every dropout spec the selectors return gains the variant's knobs
    (fwd90 warp-specialized forward, bwd90 backward)."""
    from cuflash import fastpath, specs

    def knob_of(kind, knobs):
        def knob(spec):
            if not (knobs and spec.kind == kind and spec.mods.dropout):
                return spec
            if kind == "fwd90" and not specs.fwd90_warp_specialized(spec):
                return spec
            return spec.with_knobs(**knobs)
        return knob

    stack = contextlib.ExitStack()
    if variant in TWO_CONSUMERS:  # (entered first: the knobs below apply on top of it)
        stack.enter_context(fastpath.selector_patched("select_forward",
                                                      specs.with_dropout_on_two_consumers))
    if variant in BOXED:
        for name in ("select_forward", "select_backward"):
            stack.enter_context(fastpath.selector_patched(name, specs.boxed_where("dropout")))
    if variant in RINGS:
        from cuflash import launch

        facts, slots = launch.device_facts(0), RINGS[variant]

        def ring(spec):
            ringed = specs.with_drop_ring(spec, facts, slots or 2)
            if ringed is None:
                return spec
            return ringed if slots else ringed.without_knob("CF_DROP_RING")
        stack.enter_context(fastpath.selector_patched("select_forward", ring))
    if variant in BWD_RINGS:
        from cuflash import launch

        facts = launch.device_facts(0)
        stack.enter_context(fastpath.selector_patched(
            "select_backward", lambda s: specs.with_backward_drop_ring(s, facts, 2) or s))
    for name, kind, knobs in zip(("select_forward", "select_backward"), ("fwd90", "bwd90"),
                                 VARIANTS[variant]):
        stack.enter_context(fastpath.selector_patched(name, knob_of(kind, knobs)))
    return stack


def _precompile(rows, variants) -> None:
    """Every spec the rows plan under each variant, compiled on a thread pool first (NVRTC
    runs outside the GIL; one by one at first call they would take minutes)."""
    from concurrent.futures import ThreadPoolExecutor

    from cuflash import compiler, launch, plan, specs

    facts, work = launch.device_facts(0), set()
    for variant in variants:
        with _variant(variant):
            for _label, b, s, d, causal in rows:
                flags = specs.ModFlags(dropout=variant != "none")
                shape = plan.Shape(b, s, s, 16, 16, d, "bfloat16", causal, flags)
                work.add(plan.plan_forward(shape, facts).kernel.spec)
                back = plan.plan_backward(shape, facts, False)
                work |= {x.spec for x in (back.pre, back.main, back.dq, back.dq_convert)
                         if x is not None}
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda spec: compiler.get_kernel(spec, 0), work))
    print(f"{len(work)} specs compiled", flush=True)


def _flops(b, h, s, d, causal):
    return 4 * b * h * s * s * d / (2 if causal else 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch
    import torch.nn.functional as F

    import cuflash
    from cuflash import plan

    variants = args.variants.split(",")
    rows = []
    for d in (int(x) for x in args.head_dims.split(",")):
        for causal in (False, True):
            for b, s in ((4, 4096), (1, 16384)):
                rows.append((f"d{d} {b}x{s // 1024}k{' causal' if causal else ''}", b, s, d,
                             causal))
    torch.manual_seed(0)
    data = {}
    for label, b, s, d, causal in rows:
        q, k, v, do = (torch.randn(b, s, 16, d, device="cuda", dtype=torch.bfloat16)
                       for _ in range(4))
        data[label] = (q, k, v, do)
    drop_kw = dict(dropout_p=P, dropout_seed=12345, dropout_offset=0)

    def calls(label, causal, variant):
        q, k, v, do = data[label]
        kw = {} if variant == "none" else drop_kw
        o, st = cuflash.attention_forward(q, k, v, causal=causal, **kw)

        def fwd():
            return cuflash.attention_forward(q, k, v, causal=causal, **kw)

        def bwd():
            return cuflash.attention_backward(do, q, k, v, o, st, causal=causal, **kw)

        def step():
            o2, st2 = fwd()
            cuflash.attention_backward(do, q, k, v, o2, st2, causal=causal, **kw)

        return fwd, bwd, step

    _precompile(rows, variants)
    # outputs of the candidates against the selection's, bit for bit (same flags)
    for variant in dict.fromkeys(("drop", "early", "early_pers", "packed", "unpacked")
                                 + TWO_CONSUMERS + BOXED + tuple(RINGS)):
        if variant not in variants:
            continue
        with _variant(variant):
            for label, b, s, d, causal in rows:
                o, _ = calls(label, causal, variant)[0]()
                data[label + variant] = o.clone()
                ran = list(plan._forward_plans.values())[-1].kernel.spec.name  # this row's
                print(f"{variant:10s} {label:18s} {ran}", flush=True)
    def compare(variant, base, strict):
        """Each row's output of ``variant`` against ``base``'s: a candidate with other tiles
        (not ``strict``) may differ in rounding, reported; otherwise a difference stops."""
        for label, *_ in rows:
            if label + variant not in data or label + base not in data:
                continue
            got, want = data[label + variant], data[label + base]
            same = torch.equal(got.view(torch.int16), want.view(torch.int16))
            print(f"{variant} {label}: {'bitwise equal' if same else 'DIFFERS'} to {base}",
                  flush=True)
            if not same and strict:
                raise SystemExit(f"{variant} {label}: outputs differ from {base}'s")
            if not same:
                diff = (got.float() - want.float()).abs().max().item()
                print(f"{variant} {label}: max |diff| {diff:.3g}", flush=True)

    for variant in dict.fromkeys(("early", "early_pers", "packed", "unpacked") + TWO_CONSUMERS
                                 + BOXED):
        compare(variant, "drop", variant not in TWO_CONSUMERS + BOXED)
    for variant in ("ring", "ring3"):  # the ring against its own tile: the same bits
        compare(variant, "ring_tile", True)

    times: dict = {}
    for r in range(args.rounds):
        for variant in variants:
            with _variant(variant):
                for label, b, s, d, causal in rows:
                    fwd, bwd, step = calls(label, causal, variant)
                    for part, fn in (("fwd", fwd), ("bwd", bwd), ("step", step)):
                        times.setdefault((label, variant, part), []).append(
                            time_ms(fn, reps=10))
        print(f"round {r + 1} done", flush=True)

    sdpa = {}
    for label, b, s, d, causal in rows:
        q, k, v, do = (x.transpose(1, 2) for x in data[label])
        for name, p in (("sdpa", 0.0), ("sdpa_drop", P)):
            def step(p=p):
                qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
                F.scaled_dot_product_attention(qq, kk, vv, dropout_p=p,
                                               is_causal=causal).backward(do)
            try:
                with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                    sdpa[(label, name)] = time_ms(step, reps=10)
            except RuntimeError as exc:
                sdpa[(label, name)] = float("nan")
                print(f"SDPA flash {label} {name}: {exc}", flush=True)

    out = []
    print(f"\n{'row':18s} {'variant':10s} {'fwd ms':>8s} {'bwd ms':>8s} {'step ms':>8s} "
          f"{'fwd TF':>7s} {'step vs none':>12s}")
    for label, b, s, d, causal in rows:
        none_step = statistics.median(times[(label, "none", "step")])
        for variant in variants:
            med = {part: statistics.median(times[(label, variant, part)])
                   for part in ("fwd", "bwd", "step")}
            tf = _flops(b, 16, s, d, causal) / med["fwd"] / 1e9
            print(f"{label:18s} {variant:10s} {med['fwd']:8.3f} {med['bwd']:8.3f} "
                  f"{med['step']:8.3f} {tf:7.0f} {med['step'] / none_step - 1:+12.1%}")
            out.append(dict(row=label, variant=variant, **{f"{k}_ms": x for k, x in med.items()},
                            step_vs_none=med["step"] / none_step - 1))
        sd, sdd = sdpa[(label, "sdpa")], sdpa[(label, "sdpa_drop")]
        print(f"{label:18s} {'SDPA flash':10s} step {sd:.3f} -> {sdd:.3f} ms "
              f"({sdd / sd - 1:+.1%})")
        out.append(dict(row=label, variant="sdpa_flash", step_ms=sd, drop_step_ms=sdd))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
