"""cuflash.torch.flash_attention with score modifiers (docs/masks.md) on CPU tensors: values
and gradients (sinks included) against the float64 reference. CUDA: tests/test_gpu_modifiers.py."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import cuflash.torch as ct  # noqa: E402
from cuflash import reference, testing  # noqa: E402


@pytest.mark.parametrize("causal, window, softcap, alibi, sinks", [
    (True, (9, -1), 3.0, "heads", True),
    (False, (5, 7), None, "batch", False),
    (False, None, 2.0, None, True),
])
def test_values_and_gradients(causal, window, softcap, alibi, sinks):
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(shape, generator=gen, dtype=torch.float32, requires_grad=True)
               for shape in ((2, 37, 4, 32), (2, 53, 2, 32), (2, 53, 2, 32)))
    slopes = None if alibi is None else torch.rand((4,) if alibi == "heads" else (2, 4),
                                                   generator=gen)
    sink = torch.randn(4, generator=gen, requires_grad=True) if sinks else None
    o = ct.flash_attention(q, k, v, causal=causal, window=window, softcap=softcap,
                           alibi_slopes=slopes, sinks=sink)
    do = torch.randn(o.shape, generator=gen)
    o.backward(do)
    host = [x.detach().numpy() for x in (q, k, v)]
    mods = dict(window=window, softcap=softcap,
                alibi_slopes=None if slopes is None else slopes.numpy(),
                sinks=None if sink is None else sink.detach().numpy())
    o_ref, _, _ = reference.attention_reference(*host, causal=causal, **mods)
    o_nv = reference.attention_naive(*host, causal=causal, dtype=np.float32, **mods)
    report = testing.judge("o", o.detach().numpy(), o_ref, o_nv, dtype="float32")
    assert report.ok, str(report)
    refs = reference.attention_backward_reference(do.numpy(), *host, causal=causal,
                                                  o=o.detach().numpy(), **mods)
    naives = reference.attention_backward_naive(do.numpy(), *host, causal=causal,
                                                dtype=np.float32, **mods)
    grads = [q.grad, k.grad, v.grad] + ([sink.grad] if sinks else [])
    assert len(grads) == len(refs)
    for name, got, ref, naive in zip(("dq", "dk", "dv", "dsinks"), grads, refs, naives):
        report = testing.judge(name, got.numpy(), ref, naive, dtype="float32",
                               scale=testing.magnitude(ref))
        assert report.ok, str(report)


def test_bad_modifier_names_the_argument():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(TypeError, match="^window:"):
        ct.flash_attention(q, q, q, window=3)
    with pytest.raises(ValueError, match="^softcap:"):
        ct.flash_attention(q, q, q, softcap=-1.0)
