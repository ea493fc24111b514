"""Issue 16's open decode rows in one GPU process: the current selection against candidate
specs and kernel knobs, with SDPA's cuDNN beside them (run through decode_variants.py
--decode16, or ``bash bench/gpu_suite.sh decode16``).

Three parts, bf16, head_dim 128, 32 query heads, full caches (H200 numbers of 2026-12-01,
session 3, in the comments):

* gqa: q_len 1 at (1, 32k), (8, 8k), (32, 4k), (64, 2k) with 8 kv heads (0.90-0.97x cuDNN),
  plus two MHA rows as anchors (they were 1.00-1.02x: a slower or faster device shows there).
* qlen: causal q_len 2 / 4 / 8 at (8, 8k, 8) and (1, 32k, 8); per byte against the same
  problem's q_len 1 of the selection (q_len 8 was 62%).
* paged: (8, 8k, 8) with pages of 16 / 64 / 256 in shuffled order, against contiguous (78-85%);
  plus one ragged call (cache_seqlens not a multiple of a page or a tile) checked only.

Every candidate's output is checked against the selection's (max |diff| <= 2e-2; paged
against contiguous), then timed as decode_variants.py times: the CUDA-event median of
``reps`` replays of a CUDA graph of 10 calls. Specs that spill or do not fit the device's
shared memory are skipped. ``--help`` of decode_variants.py works without a GPU.

Candidates (cuflash/decode.py, DecodeMmaSpec; kernels_cu/flash_decode_mma.cu). The selection
steps a contiguous cache's copy addresses (CF_STEP_ADDR, session 18) and, with at most 4
splits, combines a row a warp (CF_COMBINE_ROWS, session 19); earlier candidates and their
numbers are in docs/decode.md.
  plain         the selection without CF_STEP_ADDR
  s3 / s4       16 rows: a ring of 3 / 4 tiles (2 / 3 loading a block; 2 selected)
  paged_sel     a paged call's selection: CF_PAGE_IDS with CF_PAGED_STEP 7 at 2 blocks per SM
                (session 18 call 3 timed the masks and block counts: docs/decode.md)
  paged_s3      paged_sel with a ring of 3 tiles
  wt / paged_wt CF_WHOLE_TILES on the selection / paged_sel: a warp's keys that every row
                of it sees skip the per-score range test (session 18 call 9: no gain)
  row_block / paged_row_block  the selection / paged_sel with the block-a-row combine
                (CF_COMBINE_ROWS off; session 19 call 1: 3-9% slower at q_len 2-8)
  s2 / s4 / w4b2 / w4b2_s3  32 rows: a ring of 2 / 4 tiles (3 selected since session 17), or
                two 4-warp blocks a SM with 2 / 3
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: decode.py's timer
from decode import _events_ms as _median_ms, _graph_of, _paged_copy  # noqa: E402

from decode_variants import _pinned_call  # noqa: E402

HEADS, HEAD_DIM, DTYPE = 32, 128, "bfloat16"
GQA_ROWS = [(1, 32768, 8), (8, 8192, 8), (32, 4096, 8), (64, 2048, 8)]
ANCHOR_ROWS = [(1, 32768, 32), (8, 8192, 32)]
QLEN_ROWS = [(8, 8192, 8), (1, 32768, 8)]
QLENS = (2, 4, 8)
PAGED_ROW, PAGE_SIZES = (8, 8192, 8), (16, 32, 64, 256)
TOLERANCE = 2e-2


def _candidates(decode, rows: int) -> dict:
    """name -> spec for a problem of ``rows`` rows per kv head: the selection first."""
    base = decode.select_decode(DTYPE, HEAD_DIM, rows)
    out = {"selected": base}
    if not isinstance(base, decode.DecodeMmaSpec):
        return out
    out["plain"] = replace(base, step_addr=False)  # the loop before session 18
    out["wt"] = replace(base, whole_tiles=True)
    out["row_block"] = replace(base, combine_rows=False)  # the combine before session 19
    if base.rows == 16:
        # more bytes in flight a SM: a ring of 3 / 4 tiles (2 / 3 of them loading a block)
        out["s3"] = replace(base, stages=3)
        out["s4"] = replace(base, stages=4)
        paged = decode.mma_spec(DTYPE, HEAD_DIM, rows, paged=True)  # a paged call's selection
        out["paged_sel"] = paged
        out["paged_s3"] = replace(paged, stages=3)
        out["paged_wt"] = replace(paged, whole_tiles=True)
        out["paged_row_block"] = replace(paged, combine_rows=False)
    if base.rows == 32:  # q_len 8 of group 4: more bytes in flight than one 8-warp block's
        out["s2"] = replace(base, stages=2)  # the selection until session 17 (now 3)
        out["s4"] = replace(base, stages=4)
        out["w4b2"] = replace(base, warps=4, min_blocks=2, stages=2)
        out["w4b2_s3"] = replace(base, warps=4, min_blocks=2, stages=3)
    return out


def _usable(spec, compiled: dict, smem_optin: int) -> str | None:
    """Why ``spec`` is skipped, or None."""
    report = compiled[spec.name]
    if spec.smem_bytes > smem_optin:
        return f"{spec.smem_bytes} B shared memory"
    if report.spills or report.stack_bytes:
        return f"{report.registers} regs, {report.spills} B spilled"
    return None


def _compile_all(specs, arch: str) -> dict:
    """spec name -> the split kernel's NVRTC report; the kernels also loaded for device 0.
    Both in parallel (NVRTC frees the GIL): one by one at first launch they took minutes."""
    from concurrent.futures import ThreadPoolExecutor

    from cuflash import compiler

    unique = list({s.name: s for s in specs}.values())
    with ThreadPoolExecutor(16) as pool:
        reports = list(pool.map(lambda s: compiler.compile_report(s, arch), unique))
        out = {s.name: [r for r in rep if r.function == "flash_decode_split"][0]
               for s, rep in zip(unique, reports)}
        fine = [s for s in unique if not (out[s.name].spills or out[s.name].stack_bytes)]
        list(pool.map(lambda s: compiler.get_kernel(s, 0), fine))
    return out


def _measure(torch, call, want, kv_bytes: int, reps: int) -> dict:
    """Checked against ``want`` (None: not checked), then the graph median; errors recorded,
    not raised."""
    try:
        out = call()
        out = out[0] if isinstance(out, tuple) else out
        diff = float((out.float() - want.float()).abs().max()) if want is not None else 0.0
        if not diff <= TOLERANCE:
            return {"error": f"WRONG: max |diff| {diff:.3g}"}
        ms = _median_ms(torch, _graph_of(torch, call).replay, reps)
        return {"ms": ms, "tb_s": kv_bytes / ms / 1e9, "max_diff": diff}
    except Exception as exc:  # a candidate that fails to launch: recorded
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
    finally:
        torch.cuda.synchronize()


class Suite:
    """One process's timings: compiled reports, device facts, the rows of the table."""

    def __init__(self, torch, reps: int):
        from cuflash import decode, launch

        self.torch, self.reps, self.decode = torch, reps, decode
        self.facts = launch.device_facts(torch.cuda.current_device())
        self.compiled: dict = {}
        self.results: list[dict] = []

    def say(self, line: str) -> None:
        """A table line, printed at once (a run cut short keeps what it measured)."""
        print(line, flush=True)

    def compile(self, specs) -> None:
        todo = [s for s in specs if s.name not in self.compiled]
        if todo:
            self.compiled.update(_compile_all(todo, self.facts.arch))

    def inputs(self, batch: int, cache: int, heads_kv: int, q_len: int = 1):
        gen = self.torch.Generator(device="cuda").manual_seed(0)
        mk = lambda s, h: self.torch.randn((batch, s, h, HEAD_DIM), device="cuda",
                                           dtype=self.torch.bfloat16, generator=gen)
        return mk(q_len, HEADS), mk(cache, heads_kv), mk(cache, heads_kv)

    def record(self, part: str, problem: str, name: str, spec, result: dict,
               base: float | None = None, base_label: str = "") -> dict:
        """One timing into results and a table line (TB/s, ratio to ``base``, splits)."""
        entry = {"part": part, "problem": problem, "variant": name,
                 "spec": getattr(spec, "name", spec), **result}
        self.results.append(entry)
        regs = self.compiled[spec.name].registers if hasattr(spec, "name") else 0
        if "tb_s" in result:
            ratio = f"{result['tb_s'] / base:6.2f}x {base_label}" if base else ""
            text = f"{result['tb_s']:5.2f} TB/s  {ratio}"
        else:
            text = result.get("error", "?")
        self.say(f"{problem:22s} {name:12s} {regs:4d} r  {text}  "
                          f"{result.get('plan', '')}")
        return entry

    def spec_call(self, spec, q, k, v, given=None, causal=False, num_splits=None):
        call, plan = _pinned_call(self.torch, spec, q, k, v, given, causal, num_splits)
        return call, f"splits {plan.num_splits} tiles {plan.row_tiles} ({spec.name})"

    def variants(self, rows: int) -> dict:
        specs = _candidates(self.decode, rows)
        self.compile(specs.values())
        usable = {}
        for name, spec in specs.items():
            why = _usable(spec, self.compiled, self.facts.smem_optin)
            if why:
                self.say(f"{'':22s} {name:12s} skipped: {why}")
            else:
                usable[name] = spec
        return usable


def _cudnn_call(torch, q, k, v, gqa: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

    def call():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return sdpa(qt, kt, vt, enable_gqa=gqa).transpose(1, 2)
    return call


def part_gqa(suite: Suite) -> dict:
    """q_len 1 rows: cuDNN, the selection and its candidates. Returns the selection's TB/s
    per (batch, cache, kv heads), the q_len part's base."""
    torch, base_tb = suite.torch, {}
    for batch, cache, heads_kv in GQA_ROWS + ANCHOR_ROWS:
        q, k, v = suite.inputs(batch, cache, heads_kv)
        kv_bytes = 2 * k.numel() * k.element_size()
        problem = f"{batch}/{cache}/{heads_kv} q1"
        specs = suite.variants(HEADS // heads_kv)
        if heads_kv == HEADS:  # the anchors: the selection only
            specs = {"selected": specs["selected"]}
        want_call, _ = suite.spec_call(specs["selected"], q, k, v)
        want = want_call()
        cudnn = _measure(torch, _cudnn_call(torch, q, k, v, heads_kv != HEADS), want, kv_bytes,
                         suite.reps)
        suite.record("gqa", problem, "cudnn", "sdpa_cudnn", cudnn)
        ref = cudnn.get("tb_s")
        for name, spec in specs.items():
            call, plan = suite.spec_call(spec, q, k, v)
            result = _measure(torch, call, want, kv_bytes, suite.reps)
            result["plan"] = plan
            entry = suite.record("gqa", problem, name, spec, result, ref, "cuDNN")
            if name == "selected":
                base_tb[batch, cache, heads_kv] = entry.get("tb_s")
                _other_splits(suite, problem, spec, plan, (q, k, v), want, kv_bytes, ref)
                # (a split-only timing, its plan without the combine, read or wrote out of
                # bounds on the H200 in session 16's call E and was removed)
        del q, k, v
        torch.cuda.empty_cache()
    return base_tb


def _other_splits(suite: Suite, problem: str, spec, plan: str, qkv, want, kv_bytes: int,
                  ref) -> None:
    """The selection at half and 1.5x auto_splits' count (rows that split at all): whether
    WAVE_FILL / MIN_KEYS_PER_SPLIT pick well for the tensor-core split; and half the splits
    with L2 prefetch two tiles ahead (longer blocks, fewer block boundaries and a smaller
    combine, the in-flight bytes made up by the prefetch)."""
    auto = int(plan.split()[1])
    if suite.decode.DecodeMmaSpec is not type(spec):
        return
    tries = [("splits/2", spec, auto // 2), ("splits*1.5", spec, auto * 3 // 2),
             ("l2a2_spl/2", replace(spec, l2_ahead=2), auto // 2)]
    if auto == 1:  # one split: whether two (twice the blocks, waves filled otherwise) pay
        tries = [("splits=2", spec, 2), ("l2a1_spl=2", replace(spec, l2_ahead=1), 2)]
    for label, variant, splits in tries:
        if variant.name not in suite.compiled:
            continue
        call, text = suite.spec_call(variant, *qkv, num_splits=splits)
        result = _measure(suite.torch, call, want, kv_bytes, suite.reps)
        result["plan"] = text
        suite.record("gqa", problem, label, variant, result, ref, "cuDNN")


def part_qlen(suite: Suite, base_tb: dict) -> None:
    """Causal q_len 2 / 4 / 8: TB/s per byte against the selection's q_len 1."""
    torch = suite.torch
    for batch, cache, heads_kv in QLEN_ROWS:
        base = base_tb.get((batch, cache, heads_kv))
        for q_len in QLENS:
            q, k, v = suite.inputs(batch, cache, heads_kv, q_len)
            kv_bytes = 2 * k.numel() * k.element_size()
            specs = suite.variants(q_len * HEADS // heads_kv)
            want = suite.spec_call(specs["selected"], q, k, v, causal=True)[0]()
            for name, spec in specs.items():
                call, plan = suite.spec_call(spec, q, k, v, causal=True)
                result = _measure(torch, call, want, kv_bytes, suite.reps)
                result["plan"] = plan
                suite.record("qlen", f"{batch}/{cache}/{heads_kv} q{q_len}", name, spec,
                             result, base, "q_len 1")
            del q, k, v
            torch.cuda.empty_cache()


def part_paged(suite: Suite) -> None:
    """Paged against contiguous (the selection's), each variant; then a ragged check."""
    torch = suite.torch
    batch, cache, heads_kv = PAGED_ROW
    q, k, v = suite.inputs(batch, cache, heads_kv)
    kv_bytes = 2 * k.numel() * k.element_size()
    lens = torch.full((batch,), cache, dtype=torch.int32, device="cuda")
    specs = suite.variants(HEADS // heads_kv)
    want = suite.spec_call(specs["selected"], q, k, v, {"cache_seqlens": lens})[0]()
    base = None
    for name, spec in specs.items():
        call, plan = suite.spec_call(spec, q, k, v, {"cache_seqlens": lens})
        result = _measure(torch, call, want, kv_bytes, suite.reps)
        result["plan"] = plan
        entry = suite.record("paged", f"{batch}/{cache}/{heads_kv} contig", name, spec, result,
                             base, "contig")
        base = base or entry.get("tb_s")
    for page in PAGE_SIZES:
        kp, vp, table = _paged_copy(torch, k, v, page)
        given = {"cache_seqlens": lens, "block_table": table}
        for name, spec in specs.items():
            call, plan = suite.spec_call(spec, q, kp, vp, given)
            result = _measure(torch, call, want, kv_bytes, suite.reps)
            result["plan"] = plan
            suite.record("paged", f"{batch}/{cache}/{heads_kv} page {page}", name, spec,
                         result, base, "contig")
        del kp, vp
    _ragged_check(suite, specs, q, k, v)
    torch.cuda.empty_cache()


def _ragged_check(suite: Suite, specs: dict, q, k, v) -> None:
    """Lengths that end inside a page and a tile (and one empty entry), causal, page 16:
    every variant against the selection on the contiguous cache (correctness only)."""
    torch = suite.torch
    batch, cache = k.shape[0], k.shape[1]
    lens = torch.tensor([cache - 37 * (i + 1) if i else 0 for i in range(batch)],
                        dtype=torch.int32, device="cuda")
    want = suite.spec_call(specs["selected"], q, k, v, {"cache_seqlens": lens},
                           causal=True)[0]()
    kp, vp, table = _paged_copy(torch, k, v, 16)
    for name, spec in specs.items():
        call, _ = suite.spec_call(spec, q, kp, vp, {"cache_seqlens": lens, "block_table": table},
                                  causal=True)
        out = call()
        diff = float((out.float() - want.float()).abs().nan_to_num(1e9).max())
        ok = "ok" if diff <= TOLERANCE else "WRONG"
        suite.results.append({"part": "ragged", "variant": name, "spec": spec.name,
                              "max_diff": diff})
        suite.say(f"{'ragged page 16 causal':22s} {name:12s} max |diff| {diff:.3g} {ok}")


def summary(results: list[dict]) -> list[str]:
    """Per problem: the selection and the fastest variant that checked out."""
    lines, problems = ["summary (fastest checked variant per problem):"], {}
    for r in results:
        if "tb_s" in r and r["variant"] != "cudnn":
            problems.setdefault((r["part"], r["problem"]), []).append(r)
    for (part, problem), rows in problems.items():
        chosen = next((r["tb_s"] for r in rows if r["variant"] == "selected"), float("nan"))
        best = max(rows, key=lambda r: r["tb_s"])
        lines.append(f"  {part:6s} {problem:22s} selected {chosen:5.2f}  best "
                     f"{best['variant']:12s} {best['tb_s']:5.2f} {best['tb_s'] / chosen - 1:+.1%}")
    return lines


def run_suite(reps: int, out: str | None) -> int:
    import torch

    suite = Suite(torch, reps)
    head = (f"decode16: {torch.cuda.get_device_name()}, bf16 d{HEAD_DIM}, {HEADS} q heads; "
            f"K+V TB/s, graph of 10 calls, median of {reps}")
    suite.say(head)
    base_tb = part_gqa(suite)
    part_qlen(suite, base_tb)
    part_paged(suite)
    print("\n".join(summary(suite.results)))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"head": head, "results": suite.results}, indent=1))
        print(f"wrote {out}")
    wrong = [r for r in suite.results if "WRONG" in str(r.get("error", ""))
             or (r["part"] == "ragged" and not r["max_diff"] <= TOLERANCE)]
    return 1 if wrong else 0
