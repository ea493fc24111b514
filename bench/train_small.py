"""Train a small transformer with cuflash and with the framework's own attention; compare losses.

The "done when" check of the framework adapters:

    python bench/train_small.py --out bench/results          # GPU: 2 layers, d_model 512,
                                                              # 8 heads, seqlen 1024, bf16
    python bench/train_small.py --tiny --out /tmp/train       # CPU-sized smoke run
    python bench/train_small.py --framework jax ...           # torch | jax | both (default)

Both models of a pair start from the same initial weights and see the same batches (a
synthetic next-token task with learnable structure: each token is followed by a fixed
successor 90% of the time, so the loss falls quickly), for ``--steps`` steps.

* torch: cuflash.torch vs torch's SDPA, AdamW under bf16 autocast, eagerly and under
  ``torch.compile`` (skip with ``--no-compile``).
* jax: cuflash.jax vs a plain jax.numpy attention, the whole training step under
  ``jax.jit`` (cuflash runs as an XLA FFI custom call, on XLA's stream on a GPU), bf16
  matmuls and attention with float32 master weights, Adam.

Printed and written to ``OUT/train_small.json``: both loss curves per framework and mode, the
max |loss difference|, median step times. Exit status 1 if a max |loss difference| exceeds
``--tolerance``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

FULL = dict(layers=2, d_model=512, heads=8, seqlen=1024, batch=8, vocab=4096)
TINY = dict(layers=2, d_model=64, heads=4, seqlen=48, batch=2, vocab=64)
# grouped-query attention at a real model's width (the real-workloads issue's step-time check)
GQA = dict(layers=4, d_model=2048, heads=16, kv_heads=4, seqlen=4096, batch=1, vocab=4096)
TINY_GQA = dict(layers=2, d_model=64, heads=4, kv_heads=2, seqlen=48, batch=2, vocab=64)


# -- data ------------------------------------------------------------------------------------


def make_batches(cfg: dict, steps: int, seed: int) -> np.ndarray:
    """(steps, batch, seqlen + 1) int64 tokens: a fixed successor 90% of the time, else random."""
    rng = np.random.default_rng(seed)
    successor = rng.permutation(cfg["vocab"])
    shape = (steps, cfg["batch"], cfg["seqlen"] + 1)
    tokens = np.empty(shape, dtype=np.int64)
    tokens[..., 0] = rng.integers(cfg["vocab"], size=shape[:2])
    noise = rng.integers(cfg["vocab"], size=shape)
    keep = rng.random(shape) < 0.9
    for t in range(1, shape[-1]):
        tokens[..., t] = np.where(keep[..., t], successor[tokens[..., t - 1]], noise[..., t])
    return tokens


# -- torch model -----------------------------------------------------------------------------


def build_torch_model(cfg: dict, attention: str):
    import torch
    from torch import nn
    import torch.nn.functional as F

    import cuflash.torch as ct

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = cfg["heads"]
            self.kv_heads = cfg.get("kv_heads", self.heads)
            head_dim = cfg["d_model"] // self.heads
            self.qkv = nn.Linear(cfg["d_model"], (self.heads + 2 * self.kv_heads) * head_dim,
                                 bias=False)
            self.proj = nn.Linear(cfg["d_model"], cfg["d_model"], bias=False)
            self.attention = attention

        def forward(self, x):
            b, s, d = x.shape
            # (b, s, heads + 2 kv_heads, head_dim): q, k, v are strided views, no copies
            qkv = self.qkv(x).view(b, s, self.heads + 2 * self.kv_heads, d // self.heads)
            q, k, v = qkv.split((self.heads, self.kv_heads, self.kv_heads), dim=2)
            if self.attention == "cuflash":
                o = ct.flash_attention(q, k, v, causal=True)
            else:
                o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                   v.transpose(1, 2), is_causal=True,
                                                   enable_gqa=self.kv_heads != self.heads)
                o = o.transpose(1, 2)
            return self.proj(o.reshape(b, s, d))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(cfg["d_model"]), nn.LayerNorm(cfg["d_model"])
            self.attn = Attention()
            self.mlp = nn.Sequential(nn.Linear(cfg["d_model"], 4 * cfg["d_model"]), nn.GELU(),
                                     nn.Linear(4 * cfg["d_model"], cfg["d_model"]))

        def forward(self, x):
            x = x + self.attn(self.ln1(x))
            return x + self.mlp(self.ln2(x))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(cfg["vocab"], cfg["d_model"])
            self.pos = nn.Parameter(torch.randn(cfg["seqlen"], cfg["d_model"]) * 0.02)
            self.blocks = nn.ModuleList(Block() for _ in range(cfg["layers"]))
            self.ln = nn.LayerNorm(cfg["d_model"])
            self.head = nn.Linear(cfg["d_model"], cfg["vocab"], bias=False)

        def forward(self, tokens, targets):
            x = self.embed(tokens) + self.pos[: tokens.shape[1]]
            for block in self.blocks:
                x = block(x)
            logits = self.head(self.ln(x)).float()
            return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))

    return Model()


def set_attention(model, attention: str) -> None:
    for block in model.blocks:
        block.attn.attention = attention


def torch_step(model, device: str, compile_: bool, lr: float):
    """One training step of ``model`` (AdamW, bf16 autocast): tokens -> the detached loss."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def step(tokens):
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return torch.compile(step, fullgraph=False) if compile_ else step


def train_torch_interleaved(steps: dict, batches, device: str, block: int = 1) -> dict:
    """Every batch through every step function, in blocks of ``block`` consecutive batches:
    each model takes the block's batches one after another, then the next model (the order
    rotating from block to block), so that clock and temperature drift reach every
    attention alike while a model's steps still follow its own steps, as in a training run
    (a step that follows another model's finds the host's caches holding that model's code).
    Returns name -> (losses, step times in ms, whether the step opened its block); a step's
    time ends with a device synchronization."""
    import torch

    names = list(steps)
    out = {name: ([], [], []) for name in names}
    for b, first in enumerate(range(0, len(batches), block)):
        for name in names[b % len(names):] + names[:b % len(names)]:
            for i in range(first, min(first + block, len(batches))):
                start = time.perf_counter()
                loss = steps[name](batches[i])
                if device == "cuda":
                    torch.cuda.synchronize()
                out[name][1].append((time.perf_counter() - start) * 1e3)
                out[name][0].append(float(loss))
                out[name][2].append(i == first)
    return out


def train_torch_pipelined(steps: dict, batches, device: str, block: int,
                          rounds: int = 4) -> dict:
    """Milliseconds a step with the host running ahead, as a training loop that does not read
    the loss every step: each model takes ``block`` steps with one device synchronization at
    the end, in turns (the order alternating) over ``rounds`` rounds. The per-step timing of
    train_torch_interleaved syncs after every step, so each step starts on an idle GPU and
    its host time before the first kernels counts; here it overlaps the previous steps.
    Returns name -> ms a step, one entry per round."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    names, out = list(steps), {name: [] for name in steps}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            sync()
            start = time.perf_counter()
            for i in range(block):
                steps[name](batches[i % len(batches)])
            sync()
            out[name].append((time.perf_counter() - start) * 1e3 / block)
    return out


def step_summary(times: list, opens: list) -> dict:
    """Medians of a model's step times: over the steps after the first (compilation,
    warm-up), and over those that followed a step of the same model."""
    steady = [t for t, o in zip(times[1:], opens[1:]) if not o]
    return {"median_step_ms": statistics.median(times[1:] or times),
            "median_steady_step_ms": statistics.median(steady) if steady else None,
            "first_step_ms": times[0], "step_ms": times}


def paired_difference(a: list, b: list) -> dict:
    """b - a step by step (the same batch), after the first step: its median and the
    fraction of steps where b was slower."""
    d = [y - x for x, y in zip(a[1:], b[1:])]
    return {"median_ms": statistics.median(d), "slower_fraction": sum(x > 0 for x in d) / len(d)}


def run_torch(cfg: dict, args) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(args.seed)
    init = build_torch_model(cfg, "sdpa").to(device)
    batches = torch.from_numpy(make_batches(cfg, args.steps, args.seed)).to(device)
    modes = ["eager"] + ([] if args.no_compile else ["compile"])
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor()
           or "cpu", "modes": {},
           "method": f"the two models' steps interleaved in blocks of {args.block} batches "
                     "(order rotating); medians over the steps after the first "
                     "(compilation, warm-up), and over those after a step of the same model"}
    for mode in modes:
        if mode == "compile":
            torch._dynamo.reset()
        steps = {}
        for attention in ("sdpa", "cuflash"):
            model = copy.deepcopy(init)
            set_attention(model, attention)
            steps[attention] = torch_step(model, device, mode == "compile", args.lr)
        runs = train_torch_interleaved(steps, batches, device, args.block)
        curves = {attention: {"losses": losses, **step_summary(times, opens)}
                  for attention, (losses, times, opens) in runs.items()}
        diff = max(abs(a - b) for a, b in zip(curves["sdpa"]["losses"],
                                              curves["cuflash"]["losses"]))
        curves["paired_cuflash_minus_sdpa"] = paired_difference(curves["sdpa"]["step_ms"],
                                                                curves["cuflash"]["step_ms"])
        if args.pipelined:
            curves["pipelined_ms"] = train_torch_pipelined(steps, batches, device,
                                                           args.pipelined)
        out["modes"][mode] = {**curves, "max_abs_loss_diff": diff}
    return out


# -- jax -------------------------------------------------------------------------------------


def init_jax_params(cfg: dict, seed: int) -> dict:
    """Float32 master weights; the same for both attentions."""
    import jax
    import jax.numpy as jnp

    d, vocab = cfg["d_model"], cfg["vocab"]
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 4 + 4 * cfg["layers"]))

    def dense(n_in, n_out):
        return jax.random.normal(next(keys), (n_in, n_out), jnp.float32) / math.sqrt(n_in)

    return {"embed": jax.random.normal(next(keys), (vocab, d)) * 0.02,
            "pos": jax.random.normal(next(keys), (cfg["seqlen"], d)) * 0.02,
            "head": dense(d, vocab),
            "blocks": [{"qkv": dense(d, 3 * d), "proj": dense(d, d), "up": dense(d, 4 * d),
                        "down": dense(4 * d, d)} for _ in range(cfg["layers"])]}


def jnp_causal_attention(q, k, v):
    """Plain attention on (b, s, h, d): scores and softmax in float32, as SDPA's math path."""
    import jax
    import jax.numpy as jnp

    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    n = q.shape[1]
    s = jnp.where(jnp.tril(jnp.ones((n, n), bool)), s / math.sqrt(q.shape[-1]), -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1).astype(q.dtype), v)


def jax_loss(params, tokens, attention, heads: int):
    """Next-token cross entropy of a pre-norm transformer; bf16 matmuls, float32 residual."""
    import jax
    import jax.numpy as jnp

    bf = jnp.bfloat16
    inp, tgt = tokens[:, :-1], tokens[:, 1:]
    d = params["embed"].shape[1]

    def norm(x):
        return (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-5)

    x = params["embed"][inp] + params["pos"][: inp.shape[1]]
    for blk in params["blocks"]:
        # (b, s, 3, heads, head_dim): q, k, v slices of one projection, bf16 into attention
        qkv = (norm(x).astype(bf) @ blk["qkv"].astype(bf)).reshape(*inp.shape, 3, heads, -1)
        o = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]).reshape(*inp.shape, d)
        x = x + (o @ blk["proj"].astype(bf)).astype(jnp.float32)
        up = jax.nn.gelu(norm(x).astype(bf) @ blk["up"].astype(bf))
        x = x + (up @ blk["down"].astype(bf)).astype(jnp.float32)
    logp = jax.nn.log_softmax(norm(x) @ params["head"], axis=-1)
    return -jnp.take_along_axis(logp, tgt[..., None], axis=-1).mean()


def make_jax_step(attention, heads: int, lr: float):
    """One jitted Adam step (as torch's AdamW with weight_decay 0)."""
    import jax
    import jax.numpy as jnp

    b1, b2, eps = 0.9, 0.999, 1e-8

    @jax.jit
    def step(params, moments, t, tokens):
        loss, grads = jax.value_and_grad(jax_loss)(params, tokens, attention, heads)
        m, v = moments
        m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m, grads)
        v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, v, grads)
        t = t + 1
        scale = lr * jnp.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        params = jax.tree.map(lambda p, m, v: p - scale * m / (jnp.sqrt(v) + eps), params, m, v)
        return params, (m, v), t, loss

    return step


def train_jax(params, batches, attention, heads: int, lr: float):
    """Losses and step times (ms) of one run from ``params`` (not modified)."""
    import jax
    import jax.numpy as jnp

    step = make_jax_step(attention, heads, lr)
    zeros = jax.tree.map(jnp.zeros_like, params)
    moments, t = (zeros, zeros), jnp.zeros((), jnp.float32)
    losses, times = [], []
    for tokens in batches:
        start = time.perf_counter()
        params, moments, t, loss = step(params, moments, t, tokens)
        losses.append(float(loss))  # waits for the step
        times.append((time.perf_counter() - start) * 1e3)
    return losses, times


def run_jax(cfg: dict, args) -> dict:
    """cuflash.jax vs jax.numpy attention, trained under jax.jit on JAX's default backend."""
    import jax

    import cuflash.jax as cj

    params = init_jax_params(cfg, args.seed)
    batches = jax.numpy.asarray(make_batches(cfg, args.steps, args.seed).astype(np.int32))
    attentions = {"jnp": jnp_causal_attention,
                  "cuflash": lambda q, k, v: cj.flash_attention(q, k, v, causal=True)}
    curves = {}
    for name, attention in attentions.items():
        losses, times = train_jax(params, batches, attention, cfg["heads"], args.lr)
        curves[name] = {"losses": losses, "median_step_ms": statistics.median(times),
                        "first_step_ms": times[0]}
    diff = max(abs(a - b) for a, b in zip(curves["jnp"]["losses"], curves["cuflash"]["losses"]))
    device = jax.devices()[0]
    return {"backend": jax.default_backend(), "device": getattr(device, "device_kind", str(device)),
            "modes": {"jit": {**curves, "max_abs_loss_diff": diff}}}


# -- main ------------------------------------------------------------------------------------


def _print_curves(title: str, curves: dict, names: tuple[str, str]) -> None:
    a, b = names
    print(f"\n{title}\n step  {a:>10} {b:>10}")
    for i, (x, y) in enumerate(zip(curves[a]["losses"], curves[b]["losses"])):
        if i < 5 or i % 10 == 9 or i == len(curves[a]["losses"]) - 1:
            print(f" {i:4d}  {x:10.5f} {y:10.5f}")
    print(f" max |loss difference| = {curves['max_abs_loss_diff']:.3g}")


def _report(name: str, part: dict, names: tuple[str, str]) -> list[float]:
    """Print one framework's curves; its max |loss difference| per mode."""
    for mode, curves in part["modes"].items():
        _print_curves(f"{name}, {mode}", curves, names)
        a, b = names
        print(f" median step ms: {a} {curves[a]['median_step_ms']:.2f}, "
              f"{b} {curves[b]['median_step_ms']:.2f}")
        if curves[a].get("median_steady_step_ms") is not None:
            print(f" after a step of the same model: {a} "
                  f"{curves[a]['median_steady_step_ms']:.2f}, {b} "
                  f"{curves[b]['median_steady_step_ms']:.2f}")
        paired = curves.get(f"paired_{b}_minus_{a}")
        if paired:
            print(f" {b} - {a}, batch by batch: median {paired['median_ms']:+.3f} ms, "
                  f"{b} slower on {100 * paired['slower_fraction']:.0f}% of the batches")
        pipelined = curves.get("pipelined_ms")
        if pipelined:
            print(" pipelined (one sync a block), ms a step by round: " + "; ".join(
                f"{n} {statistics.median(t):.2f} ({' '.join(f'{x:.2f}' for x in t)})"
                for n, t in pipelined.items()))
    return [c["max_abs_loss_diff"] for c in part["modes"].values()]


def _wanted(framework: str, choice: str, result: dict) -> bool:
    """Run ``framework``? Asked for by name it must be importable; under "both" a missing
    one is recorded as skipped (so the GPU suite still runs on a machine without it)."""
    if choice not in (framework, "both"):
        return False
    if choice == "both" and importlib.util.find_spec(framework) is None:
        result[framework] = {"skipped": f"{framework} is not installed"}
        print(f"\n{framework}: skipped, not installed")
        return False
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tiny", action="store_true", help="CPU-sized model and data")
    parser.add_argument("--gqa", action="store_true",
                        help="torch only: 4 layers, d_model 2048, 16 heads / 4 kv heads, "
                             "seqlen 4096 (with --tiny: a CPU-sized GQA model)")
    parser.add_argument("--framework", choices=("torch", "jax", "both"), default="both")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--no-compile", action="store_true", help="torch: eager mode only")
    parser.add_argument("--block", type=int, default=5,
                        help="torch: consecutive batches a model takes before the other")
    parser.add_argument("--pipelined", type=int, default=0, metavar="STEPS",
                        help="torch: also time blocks of STEPS steps with one device sync "
                             "a block (the host running ahead), the models in turns")
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="max |loss difference| allowed (bf16 training noise)")
    args = parser.parse_args(argv)
    # JAX would take 75% of GPU memory at its first GPU call; torch and CuPy share the device
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    cfg = {(False, False): FULL, (True, False): TINY, (False, True): GQA,
           (True, True): TINY_GQA}[(args.tiny, args.gqa)]
    if args.gqa:
        args.framework = "torch"  # the jax model here has no GQA
    start = time.perf_counter()
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "config": {**cfg, "steps": args.steps, "seed": args.seed, "lr": args.lr,
                         "dtype": "bfloat16"}}
    print(f"config: {result['config']}")
    diffs = []
    if _wanted("torch", args.framework, result):
        result["torch"] = run_torch(cfg, args)
        print(f"\ntorch device: {result['torch']['device']}")
        diffs += _report("torch", result["torch"], ("sdpa", "cuflash"))
    if _wanted("jax", args.framework, result):
        result["jax"] = run_jax(cfg, args)
        print(f"\njax backend: {result['jax']['backend']} ({result['jax']['device']})")
        diffs += _report("jax", result["jax"], ("jnp", "cuflash"))
    if not diffs:
        raise SystemExit("nothing was trained: neither torch nor jax is importable")
    result["seconds"] = time.perf_counter() - start
    result["ok"] = all(d <= args.tolerance for d in diffs)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("train_gqa.json" if args.gqa else "train_small.json")
    path.write_text(json.dumps(result, indent=1))
    print(f"\n{'ok' if result['ok'] else 'FAIL'}: max |loss difference| {max(diffs):.3g} "
          f"(tolerance {args.tolerance}); {result['seconds']:.1f} s; wrote {path}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
