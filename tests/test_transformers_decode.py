"""cuflash.transformers' decode route: a generation step (a few queries against a K/V
cache, no padding) runs ``cuflash.torch.attention_with_kvcache`` (issue #16).

CPU, float32: ``choose_route`` on a table of cases; greedy generation (16 new tokens) of
small random models equal to sdpa's (eager's for Gemma 2, which has no sdpa path) with the
decode route counted on every layer of every step; logits of a prefill followed by cached
steps of 1, 3 and 8 queries (decode) and 9 (dense) within twice the eager-vs-sdpa gap plus
a floor; sinks (gpt-oss) and gradients keep the other routes. CUDA (marker ``gpu``),
bfloat16: the same stepped logits within twice sdpa's own bfloat16 error against eager in
float32 plus 1% of the largest logit, and greedy tokens equal to sdpa's up to a near tie.
"""

from __future__ import annotations

import inspect

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import cuflash.transformers as cft  # noqa: E402

NAME = cft.ATTN_IMPLEMENTATION
VOCAB = 97
FLOOR = 1e-5  # relative to max |logit|: float32 noise of a 2-layer model's logits
# Weights 5x transformers' default std: scores of a few units, so a softcap of 2 and the
# windows change the logits far beyond the bound (at std 0.02 dropping Gemma 2's softcap
# moved them by 1e-5 of the largest, inside it).
INIT_STD = 0.1
NEW_TOKENS = 16
STEPS = (1, 3, 1, 8, 9, 1)  # queries per cached step: 9 is past DECODE_MAX_Q_LEN (dense)


def _small(config_cls, **extra):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=128, pad_token_id=0, attention_dropout=0.0,
                  initializer_range=INIT_STD)
    return config_cls(**{**common, **extra})


def _configs():
    out = {"llama-gqa": lambda: _small(transformers.LlamaConfig),
           "mistral-window": lambda: _small(transformers.MistralConfig, sliding_window=6)}
    if hasattr(transformers, "Gemma2Config"):
        out["gemma2-softcap-windows"] = lambda: _small(
            transformers.Gemma2Config, sliding_window=6, attn_logit_softcapping=2.0,
            final_logit_softcapping=None, query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention"])
    return out


CONFIGS = _configs()


def _model(config, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.eval()


def _peer(model) -> str:
    """sdpa where the model has it; Gemma 2 has none (eager)."""
    return "sdpa" if getattr(model, "_supports_sdpa", False) else "eager"


def _tokens(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, shape, generator=gen)


@pytest.fixture
def decode_calls(monkeypatch):
    """The q shapes of every call that took the decode route."""
    calls, real = [], cft._decode

    def spy(q, *args, **kwargs):
        calls.append(tuple(q.shape))
        return real(q, *args, **kwargs)

    monkeypatch.setattr(cft, "_decode", spy)
    return calls


_ROUTE = dict(padded=False, packed=False, seqlen_q=1, seqlen_k=40, same_head_dims=True,
              sinks=False, modifiers=False, needs_grad=False)


@pytest.mark.parametrize("change, want", [
    ({}, "decode"),
    ({"modifiers": True}, "decode"),
    ({"seqlen_q": cft.DECODE_MAX_Q_LEN}, "decode"),
    ({"seqlen_q": cft.DECODE_MAX_Q_LEN + 1}, "dense"),
    ({"seqlen_q": cft.DECODE_MAX_Q_LEN + 1, "modifiers": True}, "rows"),
    ({"seqlen_k": 1}, "dense"),  # no cache: a one-token prompt
    ({"seqlen_q": 5, "seqlen_k": 5}, "dense"),
    ({"sinks": True}, "rows"),
    ({"needs_grad": True}, "dense"),
    ({"same_head_dims": False}, "dense"),
    ({"padded": True}, "padded"),
    ({"packed": True}, "packed"),
])
def test_choose_route(change, want):
    assert cft.choose_route(**{**_ROUTE, **change}) == want


@pytest.mark.parametrize("which", CONFIGS)
def test_greedy_generation_matches_sdpa_through_decode(which, decode_calls):
    model = _model(CONFIGS[which]())
    ids = _tokens((3, 10), seed=2)
    out = {}
    for impl in (_peer(model), NAME):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            out[impl] = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                       max_new_tokens=NEW_TOKENS, do_sample=False,
                                       pad_token_id=0)
    peer = out[_peer(model)]
    assert torch.equal(peer, out[NAME]), f"{peer}\n{out[NAME]}"
    # every layer of every step after the prefill: one query against the cache
    layers = model.config.num_hidden_layers
    assert decode_calls == [(3, 1, 4, 16)] * ((NEW_TOKENS - 1) * layers)


def _stepped_logits(model, impl, prompt, steps):
    """Logits of a prefill, then of each chunk of ``steps`` fed through a DynamicCache."""
    model.set_attn_implementation(impl)
    cache = transformers.DynamicCache(config=model.config)
    chunks = [prompt, *steps]
    # transformers 5.x renamed forward's past_key_values to cache; take whichever it has
    # (an unknown keyword would be swallowed by **kwargs and every step run cacheless)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else \
        "past_key_values"
    with torch.no_grad():
        logits = [model(input_ids=c, use_cache=True, **{name: cache}).logits
                  for c in chunks]
    return torch.cat(logits, dim=1).double()


def _prompt_and_steps(batch, seed):
    prompt = _tokens((batch, 11), seed)
    return prompt, [_tokens((batch, n), seed + 1 + i) for i, n in enumerate(STEPS)]


@pytest.mark.parametrize("which", CONFIGS)
def test_cached_steps_logits(which, decode_calls):
    """Steps of 1, 3 and 8 queries take the decode route (9 the dense one); every logit
    within twice the eager-vs-sdpa gap (0 without sdpa) plus the float32 floor of eager."""
    model = _model(CONFIGS[which]())
    prompt, steps = _prompt_and_steps(2, seed=3)
    eager = _stepped_logits(model, "eager", prompt, steps)
    gap = 0.0
    if _peer(model) == "sdpa":
        gap = float((eager - _stepped_logits(model, "sdpa", prompt, steps)).abs().max())
    ours = _stepped_logits(model, NAME, prompt, steps)
    err = float((ours - eager).abs().max())
    bound = 2 * gap + FLOOR * float(eager.abs().max())
    assert err <= bound, f"{which}: err {err:.3g} vs bound {bound:.3g} (gap {gap:.3g})"
    layers = model.config.num_hidden_layers
    want = [n for n in STEPS if n <= cft.DECODE_MAX_Q_LEN for _ in range(layers)]
    assert [shape[1] for shape in decode_calls] == want


@pytest.mark.skipif(not hasattr(transformers, "GptOssConfig"), reason="no gpt-oss")
def test_sinks_keep_the_varlen_route(decode_calls):
    """The decode kernel has no sinks: gpt-oss generates through varlen, still eager's tokens."""
    config = _small(transformers.GptOssConfig, sliding_window=4, num_local_experts=4,
                    num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"])
    model = _model(config)
    for layer in model.model.layers:  # gpt-oss inits sinks to 0: vary them
        torch.nn.init.normal_(layer.self_attn.sinks, std=1.0)
    ids = _tokens((2, 9), seed=4)
    out = {}
    for impl in ("eager", NAME):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            out[impl] = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                       max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out["eager"], out[NAME])
    assert decode_calls == []


def test_gradients_keep_the_dense_route(decode_calls):
    """A cached step that needs gradients (the decode kernel has no backward) runs dense."""
    module = torch.nn.Module()
    module.is_causal = True
    q = torch.randn(2, 4, 1, 16, requires_grad=True)
    k, v = (torch.randn(2, 2, 7, 16, requires_grad=True) for _ in range(2))
    o, _ = cft.attention_forward(module, q, k, v, None, scaling=0.25)
    o.sum().backward()
    assert decode_calls == []
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, scale=0.25, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(o, want, rtol=1e-5, atol=1e-5)


def test_cross_attention_takes_decode_without_the_causal_mask(decode_calls):
    """is_causal False (an encoder-decoder's cross-attention: 2 decoder tokens against 7
    encoder states) runs decode unmasked, as SDPA without a mask."""
    module = torch.nn.Module()
    module.is_causal = False
    q = torch.randn(3, 4, 2, 16)
    k, v = (torch.randn(3, 2, 7, 16) for _ in range(2))
    o, _ = cft.attention_forward(module, q, k, v, None, scaling=0.3)
    assert decode_calls == [(3, 2, 4, 16)]
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, scale=0.3, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(o, want, rtol=1e-5, atol=1e-5)


def _cuda_model(which, dtype):
    model = _model(CONFIGS[which]()).to("cuda", dtype)
    model.generation_config.eos_token_id = None  # both runs the full length, even after a tie
    return model


@pytest.mark.gpu
@pytest.mark.parametrize("which", CONFIGS)
def test_cuda_cached_steps_logits(which, decode_calls):
    """bfloat16 on CUDA: every stepped logit within twice the peer's own bfloat16 error
    against eager in float32, plus 1% of the largest logit; decode route taken."""
    prompt, steps = _prompt_and_steps(3, seed=5)
    prompt, steps = prompt.cuda(), [s.cuda() for s in steps]
    exact = _stepped_logits(_cuda_model(which, torch.float32), "eager", prompt, steps)
    model = _cuda_model(which, torch.bfloat16)
    naive = _stepped_logits(model, _peer(model), prompt, steps)
    ours = _stepped_logits(model, NAME, prompt, steps)
    assert torch.isfinite(ours).all()
    err = float((ours - exact).abs().max())
    bound = 2 * float((naive - exact).abs().max()) + 1e-2 * float(exact.abs().max())
    assert err <= bound, f"{which}: err {err:.3g} vs bound {bound:.3g}"
    assert len(decode_calls) == model.config.num_hidden_layers * sum(
        n <= cft.DECODE_MAX_Q_LEN for n in STEPS)


@pytest.mark.gpu
@pytest.mark.parametrize("which", CONFIGS)
def test_cuda_greedy_generation_matches_sdpa(which, decode_calls):
    """bfloat16 greedy generation: the peer's tokens, except that at the first token that
    differs (if any) the peer's top two logits must be a near tie (within 1% of the largest
    logit, the bound of the test above), where rounding may pick either."""
    model = _cuda_model(which, torch.bfloat16)
    ids = _tokens((4, 24), seed=6).cuda()
    out = {}
    for impl in (_peer(model), NAME):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            out[impl] = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                       max_new_tokens=NEW_TOKENS, do_sample=False,
                                       pad_token_id=0, output_logits=True,
                                       return_dict_in_generate=True)
    assert decode_calls, "the decode route was not taken"
    peer, ours = out[_peer(model)], out[NAME]
    differ = (peer.sequences != ours.sequences).any(dim=0).nonzero()
    if differ.numel() == 0:
        return
    step = int(differ[0]) - ids.shape[1]
    logits = peer.logits[step].float()
    top2 = logits.topk(2, dim=-1).values
    rows = (peer.sequences[:, ids.shape[1] + step] != ours.sequences[:, ids.shape[1] + step])
    margin = float((top2[rows, 0] - top2[rows, 1]).max())
    assert margin <= 1e-2 * float(logits.abs().max()), \
        f"{which}: tokens differ at step {step} with a top-2 margin of {margin:.3g}"


def _bench_generate():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "generate.py"
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_generate_runs_on_the_cpu(tmp_path, capsys):
    """bench/generate.py end to end on a tiny float32 model on the CPU (a smoke test of its
    code, not a benchmark): tokens checked, every implementation timed, JSON written."""
    import json

    out = tmp_path / "generate.json"
    bench = _bench_generate()
    assert bench.main(["--device", "cpu", "--dtype", "float32", "--layers", "2", "--hidden",
                       "64", "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--vocab",
                       str(VOCAB), "--prompts", "12", "--batches", "2", "--new-tokens", "5",
                       "--reps", "1", "--out", str(out)]) == 0
    row, = json.loads(out.read_text())["rows"]
    assert "error" not in row, row
    assert {row["tokens"][i]["match"] for i in bench.IMPLS} == {"yes"}
    assert all(row[i]["steps"] == 4 and row[i]["ms_per_token"] > 0 for i in bench.IMPLS)
    assert "cufa/sdpa" in capsys.readouterr().out
    assert cft.DECODE_MAX_Q_LEN > 0  # cufa_dense turned the route off only while it ran


def test_bench_generate_help_needs_no_gpu():
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "generate.py"
    out = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--new-tokens" in out.stdout and "per-token latency" in out.stdout
