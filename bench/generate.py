"""Greedy generation with transformers: per-token latency, attn_implementation "sdpa" against
"cufa" (cuflash.transformers, whose generation steps take the split-KV decode kernel), in
the same process on the same random-weight model (issue #16).

    python bench/generate.py [--out results.json] [--prompts 512 4096] [--batches 1 8]

The model is a Llama-style decoder built from a config with random weights (default: 4
layers, hidden 2048, 16 query heads and 4 kv heads of 128, vocab 32000, bf16): attention is
a visible share of a step without a checkpoint to download. For each (batch, prompt
length), every implementation runs ``model.generate`` (greedy, ``--new-tokens`` tokens,
DynamicCache, no padding):

* Validation, untimed, first: each implementation's tokens against sdpa's. bf16 greedy
  decoding of a random model meets near ties, so a difference is reported with the top-two
  margin of sdpa's logits at the first differing token ("tie" when within 1% of the
  largest logit, the bound of tests/test_transformers_decode.py); "DIFF" otherwise.
* Timing: a warm-up generate, then ``--reps`` generates per implementation, interleaved
  (sdpa, cufa, sdpa, ...). A streamer records the host clock at every token generate hands
  over (after torch.cuda.synchronize(); generate copies each token to the host anyway), so
  a token's latency is the wall time of one real generation step: model forward (all
  layers, not only attention), greedy pick, cache update, generate's own bookkeeping.
  Reported: the median over every step of every rep after the first token (p10 / p90 in
  the JSON), and the time to the first token (the prefill) as a median over reps.
* "cufa_dense" (in --impls by default) is cufa with the decode route off
  (cuflash.transformers.DECODE_MAX_Q_LEN = 0): the prefill kernel for every step, as
  before the route existed.

Bar (issue #16): cufa's per-token latency no worse than sdpa's ("ok" when cufa <= 1.02 x
sdpa: 2% for run-to-run noise). ``--help`` works without a GPU; ``--device cpu --dtype
float32`` with a tiny model runs the same code on the CPU (a smoke test, not a benchmark).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

IMPLS = ("sdpa", "cufa", "cufa_dense")
NO_WORSE = 1.02  # cufa / sdpa per-token latency at most this: the "no worse", +2% noise
TIE = 1e-2  # a first differing token whose sdpa top-2 margin is within this x max |logit|


def _model(torch, transformers, args):
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
        max_position_embeddings=max(args.prompts) + args.new_tokens, attention_dropout=0.0,
        bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.generation_config.eos_token_id = None  # random weights: never stop early
    return model.to(args.device, getattr(torch, args.dtype)).eval()


@contextlib.contextmanager
def _using(model, impl: str):
    """The model on ``impl``; "cufa_dense" is cufa with the decode route off (restored on
    exit, so nothing else in the process sees it off)."""
    import cuflash.transformers as cft

    route_on = cft.DECODE_MAX_Q_LEN
    cft.DECODE_MAX_Q_LEN = 0 if impl == "cufa_dense" else route_on
    model.set_attn_implementation("sdpa" if impl == "sdpa" else cft.ATTN_IMPLEMENTATION)
    try:
        yield
    finally:
        cft.DECODE_MAX_Q_LEN = route_on


class _Clock:
    """A generate streamer that notes the host time of every put (the prompt, then each
    new token), after a device synchronize."""

    def __init__(self, torch):
        self.torch, self.times = torch, []

    def put(self, value):
        if self.torch.cuda.is_available():
            self.torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def end(self):
        pass


def _generate(torch, model, ids, new_tokens: int, streamer=None, **extra):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0, streamer=streamer, **extra)


def _validate(torch, model, ids, impls, new_tokens: int) -> dict:
    """Each implementation's tokens against sdpa's (untimed)."""
    runs = {}
    for impl in impls:
        with _using(model, impl):
            runs[impl] = _generate(torch, model, ids, new_tokens, output_logits=True,
                                   return_dict_in_generate=True)
    peer, start = runs["sdpa"], ids.shape[1]
    out = {}
    for impl in impls:
        differ = (runs[impl].sequences != peer.sequences).any(dim=0).nonzero()
        if differ.numel() == 0:
            out[impl] = {"match": "yes"}
            continue
        step = int(differ[0]) - start
        logits = peer.logits[step].float()
        top2 = logits.topk(2, dim=-1).values
        rows = runs[impl].sequences[:, start + step] != peer.sequences[:, start + step]
        margin = float((top2[rows, 0] - top2[rows, 1]).max()) / float(logits.abs().max())
        out[impl] = {"match": "tie" if margin <= TIE else "DIFF", "first_diff_step": step,
                     "relative_margin": margin}
    return out


def _timed(torch, model, ids, impls, args) -> dict:
    """Per-token step times and time to first token, interleaving the implementations."""
    steps = {impl: [] for impl in impls}
    first = {impl: [] for impl in impls}
    for rep in range(args.reps + 1):  # rep 0: warm-up, not kept
        for impl in impls:
            clock = _Clock(torch)
            with _using(model, impl):
                _generate(torch, model, ids, args.new_tokens, streamer=clock)
            if rep:
                t = clock.times  # t[0]: the prompt's put; t[1]: the first new token
                first[impl].append(t[1] - t[0])
                steps[impl] += [b - a for a, b in zip(t[1:], t[2:])]
    out = {}
    for impl in impls:
        ms = sorted(1e3 * s for s in steps[impl])
        out[impl] = {"ms_per_token": statistics.median(ms), "p10_ms": ms[len(ms) // 10],
                     "p90_ms": ms[len(ms) * 9 // 10], "steps": len(ms),
                     "first_token_ms": 1e3 * statistics.median(first[impl])}
    return out


def bench_row(torch, model, batch: int, prompt: int, args) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(batch * 100003 + prompt)
    ids = torch.randint(1, args.vocab, (batch, prompt), generator=gen).to(args.device)
    row = {"batch": batch, "prompt": prompt, "new_tokens": args.new_tokens}
    try:
        row["tokens"] = _validate(torch, model, ids, args.impls, args.new_tokens)
        row.update(_timed(torch, model, ids, args.impls, args))
    except Exception as exc:  # an implementation that fails this row: recorded, not hidden
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    if "cufa" in row and "sdpa" in row:
        row["cufa_vs_sdpa"] = row["cufa"]["ms_per_token"] / row["sdpa"]["ms_per_token"]
        row["no_worse"] = row["cufa_vs_sdpa"] <= NO_WORSE
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def table(result: dict) -> str:
    impls = result["impls"]
    head = ["batch", "prompt"] + [f"{i} ms/tok" for i in impls] + ["cufa/sdpa", "bar"]
    head += [f"{i} tokens" for i in impls if i != "sdpa"] + ["first token ms (" +
                                                             " / ".join(impls) + ")"]
    lines = [f"{result['device']}  {result['date']}  {result['model']}",
             "  ".join(head)]
    for row in result["rows"]:
        cells = [str(row["batch"]), str(row["prompt"])]
        if "error" in row:
            lines.append("  ".join(cells + [row["error"]]))
            continue
        cells += [f"{row[i]['ms_per_token']:.3f}" for i in impls]
        ratio = row.get("cufa_vs_sdpa")
        cells += [f"{ratio:.3f}" if ratio else "-",
                  "-" if ratio is None else ("ok" if row["no_worse"] else "SLOWER")]
        cells += [row["tokens"][i]["match"] for i in impls if i != "sdpa"]
        cells.append(" / ".join(f"{row[i]['first_token_ms']:.1f}" for i in impls))
        lines.append("  ".join(cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--out", type=Path, default=Path("generate_bench.json"))
    parser.add_argument("--prompts", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3, help="timed generates per impl")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args(argv)
    if "sdpa" not in args.impls:
        parser.error("--impls: expected sdpa among them (the peer tokens are checked against)")
    import torch
    import transformers

    import cuflash.transformers  # noqa: F401 (registers "cufa")

    model = _model(torch, transformers, args)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    result = {"device": device, "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "transformers": transformers.__version__,
              "dtype": args.dtype, "impls": args.impls, "reps": args.reps,
              "model": (f"llama {args.layers} layers, hidden {args.hidden}, heads "
                        f"{args.heads}/{args.kv_heads} x {args.head_dim}, vocab {args.vocab}, "
                        f"{args.dtype}"),
              "metric": "median wall ms per generated token after the first (synchronized)",
              "bar": {"cufa_vs_sdpa_at_most": NO_WORSE},
              "rows": [bench_row(torch, model, b, p, args)
                       for p in args.prompts for b in args.batches]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
