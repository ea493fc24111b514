"""Hard edges of the framework adapters (issue #9, items 5, 9, 11, 13), on the CPU.

Arguments are checked as the core API checks them (bool flags, real finite positive scales
that float32 can carry, arrays of the right kind, one device), with TypeError / ValueError
naming the argument; ``deterministic=`` reaches the backward; the framework-neutral API
refuses what it would silently get wrong.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import cuflash  # noqa: E402
import cuflash.api  # noqa: E402
import cuflash.jax as cj  # noqa: E402
import cuflash.torch as ct  # noqa: E402

SHAPE = (1, 9, 2, 8)


def torch_qkv(requires_grad=False):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(*SHAPE, generator=g).requires_grad_(requires_grad)
                 for _ in range(3))


def jax_qkv():
    keys = jax.random.split(jax.random.key(0), 3)
    return tuple(jax.random.normal(key, SHAPE, jnp.float32) for key in keys)


@pytest.fixture
def backward_spy(monkeypatch):
    """Records the ``deterministic`` that reaches cuflash.api.attention_backward."""
    seen = []
    real = cuflash.api.attention_backward

    def spy(*args, **kwargs):
        seen.append(kwargs["deterministic"])
        return real(*args, **kwargs)

    monkeypatch.setattr(cuflash.api, "attention_backward", spy)
    return seen


# -- item 5: torch adapter argument checks ---------------------------------------------------

TORCH_BAD = [  # (id, keywords or replaced inputs, exception, message regex)
    ("causal-str", {"causal": "false"}, TypeError, r"^causal: expected a bool, got str 'false'"),
    ("causal-int", {"causal": 1}, TypeError, r"^causal: expected a bool, got int 1"),
    ("scale-bool", {"softmax_scale": True}, TypeError,
     r"^softmax_scale: expected a finite positive real number or None, got bool True"),
    ("scale-str", {"softmax_scale": "0.5"}, TypeError,
     r"^softmax_scale: expected a finite positive real number or None, got str '0.5'"),
    ("scale-float32-overflow", {"softmax_scale": 3e38}, ValueError,
     r"^softmax_scale: expected a value the float32 kernels can use"),
    ("deterministic-str", {"deterministic": "yes"}, TypeError,
     r"^deterministic: expected a bool, got str 'yes'"),
    ("q-list", {"q": [[1.0]]}, TypeError, r"^q: expected a torch\.Tensor, got list"),
    ("v-numpy", {"v": np.ones(SHAPE, np.float32)}, TypeError,
     r"^v: expected a torch\.Tensor, got ndarray"),
    ("k-none", {"k": None}, TypeError, r"^k: expected a torch\.Tensor, got NoneType"),
    ("k-meta", {"k": torch.empty(SHAPE, device="meta")}, ValueError,
     r"^k: expected a tensor on cpu like q, got meta"),
    ("head-dim-0", {"q": torch.ones(1, 9, 2, 0), "k": torch.ones(1, 9, 2, 0),
                    "v": torch.ones(1, 9, 2, 0)}, ValueError,
     r"^q: expected head_dim from 1 to 256, got 0"),
    ("q-0d", {"q": torch.tensor(1.0)}, ValueError, r"^q: expected a 4-D array"),
]


def _torch_call(changes):
    q, k, v = torch_qkv()
    inputs = {"q": q, "k": k, "v": v}
    kwargs = {}
    for key, value in changes.items():
        (inputs if key in inputs else kwargs)[key] = value
    return inputs, kwargs


@pytest.mark.parametrize("case_id, changes, exc, pattern", TORCH_BAD,
                         ids=[c[0] for c in TORCH_BAD])
def test_torch_flash_attention_rejects(case_id, changes, exc, pattern):
    inputs, kwargs = _torch_call(changes)
    with pytest.raises(exc, match=pattern):
        ct.flash_attention(inputs["q"], inputs["k"], inputs["v"], **kwargs)


def test_torch_all_meta_is_shape_inference():
    q = torch.empty(SHAPE, device="meta")
    o = ct.flash_attention(q, q, q)
    assert o.device.type == "meta" and o.shape == SHAPE


# -- item 13: torch SDPA's own signature ----------------------------------------------------


def _sdpa_inputs(heads=4, heads_kv=4):
    g = torch.Generator().manual_seed(1)
    query = torch.randn(1, heads, 12, 8, generator=g)
    key = torch.randn(1, heads_kv, 12, 8, generator=g)
    value = torch.randn(1, heads_kv, 12, 8, generator=g)
    return query, key, value


def test_sdpa_has_torch_signature():
    names = list(inspect.signature(ct.scaled_dot_product_attention).parameters)
    assert names == ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
                     "enable_gqa"]


@pytest.mark.parametrize("kwargs", [
    {"attn_mask": None, "dropout_p": 0.0, "is_causal": True, "scale": 0.3},
    {"enable_gqa": True},
    {"enable_gqa": False, "dropout_p": 0},
])
def test_sdpa_accepts_torch_keywords_it_can_serve(kwargs):
    import torch.nn.functional as F

    query, key, value = _sdpa_inputs()
    out = ct.scaled_dot_product_attention(query, key, value, **kwargs)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(query, key, value, **kwargs),
                               rtol=1e-5, atol=1e-5)


def test_sdpa_positional_arguments_as_torch():
    query, key, value = _sdpa_inputs()
    out = ct.scaled_dot_product_attention(query, key, value, None, 0.0, True, 0.25)
    ref = ct.flash_attention(*(t.transpose(1, 2) for t in (query, key, value)), causal=True,
                             softmax_scale=0.25).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


SDPA_BAD = [
    ("attn-mask", {"attn_mask": torch.ones(12, 12, dtype=torch.bool)}, ValueError,
     r"^attn_mask: cuflash computes unmasked or causal attention only, expected None, "
     r"got Tensor"),
    ("dropout-1", {"dropout_p": 1.0}, ValueError,
     r"^dropout_p: expected a real number in \[0, 1\), got 1\.0"),
    ("dropout-str", {"dropout_p": "0"}, TypeError, r"^dropout_p: expected a real number"),
    ("is-causal-str", {"is_causal": "false"}, TypeError, r"^is_causal: expected a bool"),
    ("enable-gqa-int", {"enable_gqa": 1}, TypeError, r"^enable_gqa: expected a bool"),
    ("scale-bool", {"scale": True}, TypeError, r"^softmax_scale: expected a finite"),
]


@pytest.mark.parametrize("case_id, kwargs, exc, pattern", SDPA_BAD, ids=[c[0] for c in SDPA_BAD])
def test_sdpa_rejects_what_it_cannot_serve(case_id, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        ct.scaled_dot_product_attention(*_sdpa_inputs(), **kwargs)


def test_sdpa_gqa_needs_enable_gqa_as_in_torch():
    query, key, value = _sdpa_inputs(heads=4, heads_kv=2)
    with pytest.raises(ValueError, match=r"^key: expected 4 heads like query \(or "
                                         r"enable_gqa=True .*got 2"):
        ct.scaled_dot_product_attention(query, key, value)
    out = ct.scaled_dot_product_attention(query, key, value, enable_gqa=True)
    assert out.shape == query.shape


# -- item 9: deterministic= reaches the backward ---------------------------------------------


@pytest.mark.parametrize("deterministic, torch_flag, expected", [
    (None, False, False), (None, True, True), (True, False, True), (False, True, False)])
def test_torch_deterministic_reaches_the_backward(backward_spy, deterministic, torch_flag,
                                                  expected):
    q, k, v = torch_qkv(requires_grad=True)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(torch_flag)
    try:
        ct.flash_attention(q, k, v, deterministic=deterministic).sum().backward()
    finally:
        torch.use_deterministic_algorithms(was)
    assert backward_spy == [expected]


def test_torch_sdpa_follows_torch_determinism(backward_spy):
    query, key, value = (t.requires_grad_(True) for t in _sdpa_inputs())
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        ct.scaled_dot_product_attention(query, key, value).sum().backward()
    finally:
        torch.use_deterministic_algorithms(was)
    assert backward_spy == [True]


@pytest.mark.parametrize("deterministic", [False, True])
def test_jax_eager_deterministic_reaches_the_backward(backward_spy, deterministic):
    q, k, v = jax_qkv()
    jax.grad(lambda q: cj.flash_attention(q, k, v, deterministic=deterministic).sum())(q)
    assert backward_spy == [deterministic]


@pytest.mark.parametrize("deterministic", [False, True])
def test_jax_jit_deterministic_is_an_ffi_attribute(deterministic):
    q, k, v = jax_qkv()
    loss = jax.jit(jax.grad(
        lambda q: cj.flash_attention(q, k, v, deterministic=deterministic).sum()))
    text = loss.lower(q).as_text()
    assert f"deterministic = {str(deterministic).lower()}" in text
    eager = jax.grad(lambda q: cj.flash_attention(q, k, v).sum())(q)
    np.testing.assert_allclose(np.asarray(loss(q)), np.asarray(eager), rtol=1e-6, atol=1e-6)


# -- item 5: JAX adapter argument checks, eager and under jit --------------------------------

JAX_BAD = [
    ("scale-bool", {"softmax_scale": True}, TypeError,
     r"^softmax_scale: expected a finite positive real number or None, got bool True"),
    ("scale-str", {"softmax_scale": "0.5"}, TypeError, r"^softmax_scale: expected .*got str"),
    ("scale-float32-underflow", {"softmax_scale": 1e-46}, ValueError,
     r"^softmax_scale: expected a value the float32 kernels can use"),
    ("causal-str", {"causal": "false"}, TypeError, r"^causal: expected a bool, got str"),
    ("deterministic-int", {"deterministic": 1}, TypeError, r"^deterministic: expected a bool"),
]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("case_id, kwargs, exc, pattern", JAX_BAD, ids=[c[0] for c in JAX_BAD])
def test_jax_flash_attention_rejects(case_id, kwargs, exc, pattern, jit):
    q, k, v = jax_qkv()
    fn = (lambda q, k, v: cj.flash_attention(q, k, v, **kwargs))
    with pytest.raises(exc, match=pattern):
        (jax.jit(fn) if jit else fn)(q, k, v)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_jax_0d_input_is_a_value_error(which, jit):
    args = dict(zip("qkv", jax_qkv()))
    args[which] = jnp.float32(1.0)
    fn = (lambda q, k, v: cj.flash_attention(q, k, v))
    with pytest.raises(ValueError, match=rf"^{which}: expected a 4-D array .*got 0-D"):
        (jax.jit(fn) if jit else fn)(**args)


def test_jax_non_array_is_a_type_error():
    q, k, v = jax_qkv()
    with pytest.raises(TypeError, match=r"^k: expected a jax\.Array or numpy\.ndarray, got list"):
        cj.flash_attention(q, np.asarray(k).tolist(), v)


# -- item 11: the framework-neutral API and autograd / tracers -------------------------------


@pytest.mark.parametrize("entry", ["attention", "attention_forward"])
def test_core_api_refuses_torch_tensors_that_require_grad(entry):
    q, k, v = torch_qkv()
    x = q.clone().requires_grad_(True)
    with pytest.raises(TypeError, match=r"^q: expected a tensor that does not require grad .*"
                                        r"cuflash\.torch\.flash_attention"):
        getattr(cuflash, entry)(x, k, v)


def test_core_api_takes_grad_tensors_under_no_grad_or_detached():
    q, k, v = torch_qkv(requires_grad=True)
    with torch.no_grad():
        o = cuflash.attention(q, k, v)
    torch.testing.assert_close(cuflash.attention(q.detach(), k.detach(), v.detach()), o)


def test_the_refused_gradient_is_served_by_cuflash_torch():
    """The issue's example: 2*x + attention(x, k, v) must carry the attention gradient."""
    q, k, v = torch_qkv()
    x = q.clone().requires_grad_(True)
    (2 * x + ct.flash_attention(x, k, v)).sum().backward()
    assert not torch.allclose(x.grad, torch.full_like(x, 2.0))


def test_jax_tracer_error_points_to_cuflash_jax():
    q, k, v = jax_qkv()
    with pytest.raises(TypeError, match=r"^q: got a JAX tracer.*cuflash\.jax\.flash_attention"):
        jax.jit(lambda q: cuflash.attention(q, k, v))(q)
