"""cuflash.transformers: small random models run with attn_implementation="cufa" against
transformers' own eager and sdpa paths (CPU, float32; skipped without transformers).

For each model (Llama with GQA, Mistral with a sliding window, Gemma 2 with soft-capping
and alternating windows, gpt-oss with sinks and windows, DeepSeek-V3's latent attention
with v's own head_dim): logits at the valid positions
of a left-padded and a right-padded batch within the gap transformers' own paths have
(eager vs sdpa, times 2, plus a small floor; the floor alone for models without sdpa),
the same greedy generations as eager, and gradients of a loss through the model
(weights, and the sinks) close to eager's.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import cuflash.transformers as cft  # noqa: E402

NAME = cft.ATTN_IMPLEMENTATION
LENGTHS = (11, 6, 14, 1)  # valid tokens per row of a batch padded to 14
SEQ = 14
FLOOR = 1e-5  # relative to max |logit|: float32 noise of a 2-layer model's logits


def _small(config_cls, **extra):
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=64, pad_token_id=0, attention_dropout=0.0)
    return config_cls(**{**common, **extra})


def _configs():
    out = {"llama-gqa": lambda: _small(transformers.LlamaConfig),
           "mistral-window": lambda: _small(transformers.MistralConfig, sliding_window=5)}
    if hasattr(transformers, "Gemma2Config"):
        out["gemma2-softcap-windows"] = lambda: _small(
            transformers.Gemma2Config, sliding_window=4, attn_logit_softcapping=2.0,
            final_logit_softcapping=None, query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention"])
    if hasattr(transformers, "GptOssConfig"):
        out["gptoss-sinks"] = lambda: _small(
            transformers.GptOssConfig, sliding_window=4, num_local_experts=4,
            num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"])
    if hasattr(transformers, "DeepseekV3Config"):  # multi-head latent attention: v has its
        # own head_dim (16 against q's and k's 24), as DeepSeek's (192, 128). Dense layers
        # only: with a mixture-of-experts layer, a bfloat16 rounding in any attention output
        # can flip a token's experts (torch SDPA and cuflash both missed the CUDA bound by
        # 4x on one right-padded row, H200 2026-12-05; bench/dev/hf_pair_probe.py).
        out["deepseekv3-mla"] = lambda: _small(
            transformers.DeepseekV3Config, num_key_value_heads=4, head_dim=8, q_lora_rank=32,
            kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
            first_k_dense_replace=2, moe_intermediate_size=32, n_shared_experts=1)
    return out


CONFIGS = _configs()


def _model(config, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    if hasattr(model.model.layers[0].self_attn, "sinks"):  # gpt-oss inits sinks to 0: vary
        for layer in model.model.layers:
            torch.nn.init.normal_(layer.self_attn.sinks, std=1.0)
    return model.eval()


def _batch(padding_side: str, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (len(LENGTHS), SEQ), generator=gen)
    mask = torch.zeros(len(LENGTHS), SEQ, dtype=torch.long)
    for row, n in enumerate(LENGTHS):
        if padding_side == "left":
            mask[row, SEQ - n:] = 1
        else:
            mask[row, :n] = 1
    return ids.masked_fill(mask == 0, 0), mask


def _logits(model, impl, ids, mask):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.double()


def _supports_sdpa(model) -> bool:
    return bool(getattr(model, "_supports_sdpa", False))


def _gap(model, ids, mask) -> float:
    """max |eager - sdpa| at valid positions. Gemma 2 and gpt-oss have no sdpa path (and
    their eager float64 run gives NaN rows here), so for them the gap is 0 and the bound is
    the floor alone, which is tighter than any gap measured on the other models."""
    if not _supports_sdpa(model):
        return 0.0
    valid = mask.bool()
    eager = _logits(model, "eager", ids, mask)
    return float((eager - _logits(model, "sdpa", ids, mask))[valid].abs().max())


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("which", CONFIGS)
def test_logits_at_valid_positions(which, padding_side):
    model = _model(CONFIGS[which]())
    ids, mask = _batch(padding_side)
    valid = mask.bool()
    gap = _gap(model, ids, mask)
    eager = _logits(model, "eager", ids, mask)
    ours = _logits(model, NAME, ids, mask)
    assert model.config._attn_implementation == NAME
    err = float((ours - eager)[valid].abs().max())
    bound = 2 * gap + FLOOR * float(eager[valid].abs().max())
    assert err <= bound, f"{which} {padding_side}: err {err:.3g} vs bound {bound:.3g} " \
                         f"(gap {gap:.3g})"


def test_padding_changes_nothing_at_valid_positions():
    """The issue's failure: a left-padded row's logits equal the same tokens run alone."""
    model = _model(CONFIGS["llama-gqa"]())
    ids, mask = _batch("left")
    batch = _logits(model, NAME, ids, mask)
    for row, n in enumerate(LENGTHS):
        alone = _logits(model, NAME, ids[row:row + 1, SEQ - n:], None)
        torch.testing.assert_close(batch[row, SEQ - n:], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", CONFIGS)
def test_greedy_generation_matches_eager(which):
    model = _model(CONFIGS[which]())
    ids, mask = _batch("left", seed=2)
    out = {}
    for impl in ("eager", NAME):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            out[impl] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5,
                                       do_sample=False, pad_token_id=0)
    assert torch.equal(out["eager"], out[NAME]), f"{out['eager']}\n{out[NAME]}"


@pytest.mark.parametrize("which", CONFIGS)
def test_backward_through_the_model(which):
    """Gradients of a loss over the valid positions match eager's (weights and sinks)."""
    ids, mask = _batch("right", seed=3)
    grads = {}
    for impl in ("eager", NAME):
        model = _model(CONFIGS[which]())
        model.set_attn_implementation(impl)
        model.train()
        logits = model(input_ids=ids, attention_mask=mask).logits
        logits[mask.bool()].logsumexp(-1).sum().backward()
        attn = model.model.layers[0].self_attn
        grads[impl] = {name: p.grad.clone() for name, p in attn.named_parameters()}
    for name, want in grads["eager"].items():
        got = grads[NAME][name]
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()),
                                   msg=lambda m: f"{which} {name}: {m}")


def test_packed_sequences_from_position_ids():
    """Padding-free packing (one row, position_ids restarting at 0): each sequence attends
    only to itself, as if run alone."""
    model = _model(CONFIGS["mistral-window"]())
    ids, _ = _batch("right", seed=4)
    a, b = ids[0, :9], ids[2, :7]
    packed = torch.cat([a, b])[None]
    position_ids = torch.cat([torch.arange(9), torch.arange(7)])[None]
    model.set_attn_implementation(NAME)
    with torch.no_grad():
        out = model(input_ids=packed, position_ids=position_ids).logits
        alone = [model(input_ids=x[None]).logits for x in (a, b)]
    torch.testing.assert_close(out[0], torch.cat([alone[0][0], alone[1][0]]), rtol=1e-5,
                               atol=1e-5)


def test_packed_positions_are_read_once_per_tensor(monkeypatch):
    """Finding packed sequences reads position_ids on the host (a sync on CUDA): done once
    for the tensor a model hands to all its layers, again when the tensor changes."""
    import cuflash.transformers as cft

    reads, real = [], cft._offsets_of
    monkeypatch.setattr(cft, "_offsets_of", lambda pos: reads.append(1) or real(pos))
    q = k = torch.zeros(1, 16, 2, 8)
    positions = torch.cat([torch.arange(9), torch.arange(7)])[None]
    first = cft._packed_offsets(q, k, positions, {})
    for _ in range(3):  # the other layers of the same forward
        assert cft._packed_offsets(q, k, positions, {}) is first
    assert len(reads) == 1 and first[0].tolist() == [0, 9, 16]
    positions[0, 9:] = torch.arange(9, 16)  # rewritten in place: one sequence now
    assert cft._packed_offsets(q, k, positions, {}) is None and len(reads) == 2
    assert cft._packed_offsets(q, k, positions.clone(), {}) is None and len(reads) == 3


def _dropout_model():
    config = CONFIGS["llama-gqa"]()
    config.attention_dropout = 0.3
    model = _model(config)
    model.set_attn_implementation(NAME)
    return model.train()


def test_attention_dropout_trains():
    """config.attention_dropout reaches cuflash in training (torch's generator: the same
    seed, the same logits; another seed, others), gradients flow, and model.eval() turns
    it off (the logits of a model without dropout)."""
    model = _dropout_model()
    ids = _batch("left")[0][:, :SEQ]
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(model(input_ids=ids).logits)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    runs[0].float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    plain = _model(CONFIGS["llama-gqa"]())
    plain.set_attn_implementation(NAME)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=ids).logits,
                                   plain(input_ids=ids).logits)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_dropout_with_padding_trains(padding_side):
    """A padded batch in training runs the varlen route with dropout: the same seed gives
    the same logits, another seed others, gradients flow; row 0's valid positions equal its
    tokens run alone (varlen sequence 0 drops as dense batch entry 0)."""
    model = _dropout_model()
    ids, mask = _batch(padding_side)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(model(input_ids=ids, attention_mask=mask).logits)
    valid = mask.bool()
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0][valid], runs[2][valid])
    runs[0][valid].float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    n = LENGTHS[0]
    cols = slice(SEQ - n, SEQ) if padding_side == "left" else slice(0, n)
    torch.manual_seed(0)
    with torch.no_grad():
        alone = model(input_ids=ids[:1, cols]).logits
    torch.testing.assert_close(runs[0][0, cols].detach(), alone[0], rtol=1e-5, atol=1e-5)


def test_the_name_needs_no_flash_attn_package():
    """The registered name loads through from_config and set_attn_implementation without
    transformers reaching for the flash-attn package (its name has no "flash")."""
    assert "flash" not in NAME
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS["llama-gqa"](),
                                                          attn_implementation=NAME)
    assert model.config._attn_implementation == NAME
    model.set_attn_implementation("sdpa")
    model.set_attn_implementation(NAME)
    assert model.config._attn_implementation == NAME


def _cuda_logits(which, impl, ids, mask, dtype):
    model = _model(CONFIGS[which]()).to("cuda", dtype)
    return _logits(model, impl, ids.cuda(), None if mask is None else mask.cuda()).cpu()


@pytest.mark.gpu
@pytest.mark.parametrize("padding_side", ["left", "right", "none"])
@pytest.mark.parametrize("which", CONFIGS)
def test_cuda_logits_at_valid_positions(which, padding_side):
    """On CUDA in bfloat16: padded batches run the varlen kernels, unpadded ones the dense
    kernels (or varlen for the modifiers). At the valid positions the error against eager in
    float32 is at most twice eager's own bfloat16 error, plus 1% of the largest logit."""
    if padding_side == "none":
        gen = torch.Generator().manual_seed(5)
        ids, mask = torch.randint(1, 97, (3, 40), generator=gen), None
        valid = torch.ones(3, 40, dtype=torch.bool)
    else:
        ids, mask = _batch(padding_side)
        valid = mask.bool()
    exact = _cuda_logits(which, "eager", ids, mask, torch.float32)
    naive = _cuda_logits(which, "eager", ids, mask, torch.bfloat16)
    ours = _cuda_logits(which, NAME, ids, mask, torch.bfloat16)
    assert torch.isfinite(ours[valid]).all()
    err = float((ours - exact)[valid].abs().max())
    bound = 2 * float((naive - exact)[valid].abs().max()) + 1e-2 * float(exact[valid].abs().max())
    assert err <= bound, f"{which} {padding_side}: err {err:.3g} vs bound {bound:.3g}"
