"""Dropout through cuflash.torch (docs/dropout.md): torch's generator supplies the seed and
offset, the backward regenerates the forward's mask. CPU tensors here (the NumPy path);
the ``gpu`` tests run the same on CUDA tensors (the kernels, which read the words drawn on
the device), with torch.compile and CUDA graphs that replay a dropout step.

* Values and gradients against the float64 reference given the mask of the seed and offset
  the call drew (read back by drawing again after the same ``torch.manual_seed``).
* ``torch.manual_seed`` reproduces a call bit for bit; the next call draws another mask.
* ``scaled_dot_product_attention(dropout_p=)`` is ``flash_attention(dropout_p=)``; bad
  values raise naming dropout_p.
"""

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import cuflash.torch as ct  # noqa: E402
from cuflash import reference, testing  # noqa: E402

P = 0.3


def _inputs(device="cpu", dtype=torch.float32, shape_q=None, seqlen_k=53, heads_kv=2, seed=7):
    """q, k, v, do; head_dim 64 on CUDA (the kernels tests/test_gpu_dropout.py compiled)."""
    shape_q = shape_q or (2, 37, 4, 32 if device == "cpu" else 64)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(shape_q, generator=gen, dtype=torch.float32)
    k, v = (torch.randn((shape_q[0], seqlen_k, heads_kv, shape_q[3]), generator=gen,
                        dtype=torch.float32) for _ in range(2))
    do = torch.randn(shape_q, generator=gen, dtype=torch.float32)
    return [x.to(device=device, dtype=dtype) for x in (q, k, v, do)]


def _drawn(device) -> tuple[int, int]:
    """The (seed, offset) the next call on ``device`` draws: draw it, then rewind. CUDA
    calls (the fast path's layouts, as here) draw ``dropout_words`` on the device."""
    state = torch.random.get_rng_state() if device == "cpu" else torch.cuda.get_rng_state()
    if device == "cpu":
        drawn = ct.philox_seed_offset(torch.device(device))
    else:
        drawn = ct.seed_offset_of(ct.dropout_words(torch.device(device)))
    (torch.random.set_rng_state if device == "cpu" else torch.cuda.set_rng_state)(state)
    return drawn


def check_against_reference(device, dtype, causal, label=""):
    q, k, v, do = _inputs(device, dtype)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    seed, offset = _drawn(device)
    o = ct.flash_attention(*leaves, causal=causal, dropout_p=P)
    o.backward(do)
    judge_step(o, [x.grad for x in leaves], (q, k, v, do), seed, offset, causal, dtype, label)


def judge_step(o, grads, inputs, seed, offset, causal, dtype, label=""):
    """o and (dq, dk, dv) of a dropout step against the float64 reference of its mask."""
    host = [x.detach().float().cpu().numpy() for x in inputs]  # exact: dtype's values
    drop = dict(dropout_p=P, dropout_seed=seed, dropout_offset=offset)
    name = str(dtype).split(".")[1]
    naive_dtype = {"float32": np.float32, "float16": np.float16,
                   "bfloat16": ml_dtypes.bfloat16}[name]
    o_host = o.detach().float().cpu().numpy()
    o_ref, _, _ = reference.attention_reference(*host[:3], causal=causal, **drop)
    o_nv = reference.attention_naive(*host[:3], causal=causal, dtype=naive_dtype, **drop)
    report = testing.judge("o", o_host, o_ref, o_nv, dtype=name)
    assert report.ok, f"{label} {report}"
    refs = reference.attention_backward_reference(host[3], *host[:3], causal=causal, o=o_host,
                                                  **drop)
    naives = reference.attention_backward_naive(host[3], *host[:3], causal=causal,
                                                dtype=naive_dtype, **drop)
    scale = testing.magnitude(*refs[:3])
    for nm, grad, ref, naive in zip(("dq", "dk", "dv"), grads, refs, naives):
        report = testing.judge(nm, grad.float().cpu().numpy(), ref, naive, dtype=name,
                               scale=scale)
        assert report.ok, f"{label} {report}"


@pytest.mark.parametrize("causal", [False, True])
def test_values_and_gradients_match_the_reference(causal):
    torch.manual_seed(11)
    check_against_reference("cpu", torch.float32, causal)


def test_manual_seed_reproduces_and_the_next_call_differs(device="cpu"):
    q, k, v, _ = _inputs(device)
    torch.manual_seed(3)
    first = ct.flash_attention(q, k, v, dropout_p=P)
    second = ct.flash_attention(q, k, v, dropout_p=P)
    torch.manual_seed(3)
    again = ct.flash_attention(q, k, v, dropout_p=P)
    assert torch.equal(first, again)
    assert not torch.equal(first, second)
    assert not torch.equal(first, ct.flash_attention(q, k, v))


def test_sdpa_takes_dropout_p():
    q, k, v, _ = _inputs()
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    torch.manual_seed(5)
    ours = ct.scaled_dot_product_attention(qt, kt, vt, dropout_p=P, enable_gqa=True)
    torch.manual_seed(5)
    direct = ct.flash_attention(q, k, v, dropout_p=P)
    assert torch.equal(ours, direct.transpose(1, 2))


@pytest.mark.parametrize("p, err, pattern", [
    (1.0, ValueError, r"^dropout_p: expected a real number in \[0, 1\), got 1.0"),
    (-0.1, ValueError, r"^dropout_p: expected a real number in \[0, 1\)"),
    ("0.1", TypeError, r"^dropout_p: expected a real number in \[0, 1\), got str"),
    (True, TypeError, r"^dropout_p: expected a real number in \[0, 1\), got bool"),
])
def test_bad_dropout_p_is_refused(p, err, pattern):
    q, k, v, _ = _inputs()
    with pytest.raises(err, match=pattern):
        ct.flash_attention(q, k, v, dropout_p=p)
    with pytest.raises(err, match=pattern):
        ct.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), dropout_p=p,
                                        enable_gqa=True)


def test_under_torch_compile(device="cpu"):
    """A graph break at the dropout call (the general path); the compiled step equals the
    eager one under the same seed, gradients included."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v, do = _inputs(device, dtype)

    def step(q_, k_, v_):
        return (ct.flash_attention(q_, k_, v_, causal=True, dropout_p=P) * do).sum()

    results = []
    for fn in (step, torch.compile(step)):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        torch.manual_seed(17)
        loss = fn(*leaves)
        loss.backward()
        results.append([loss.detach()] + [x.grad for x in leaves])
    for eager, compiled in zip(*results):  # dQ's atomics: not bit for bit; another mask
        torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)  # would be O(1) off


# -- CUDA tensors (the kernels) ---------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_values_and_gradients(dtype, causal):
    torch.cuda.manual_seed(13)
    check_against_reference("cuda", dtype, causal, label=f"cuda {dtype}")


@pytest.mark.gpu
def test_cuda_manual_seed_reproduces():
    test_manual_seed_reproduces_and_the_next_call_differs("cuda")


def _captured_step(leaves, do, causal=False):
    """A dropout step (forward and backward) warmed on a side stream, then captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiled, planned and recorded outside the capture
        for _ in range(2):
            ct.flash_attention(*leaves, causal=causal, dropout_p=P).backward(do)
    torch.cuda.current_stream().wait_stream(side)
    for x in leaves:
        x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o = ct.flash_attention(*leaves, causal=causal, dropout_p=P)
        o.backward(do)
    return graph, o


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_graph_replays_read_the_words_at_each_replay(monkeypatch, causal):
    """Under torch.cuda.graph the step's kernels read dropout's words from the device when
    they run: the test sets them between replays (torch's generator draws them in a real
    graph), and each replay matches the reference of its own words' mask."""
    q, k, v, do = _inputs("cuda", torch.bfloat16)
    words = torch.zeros(3, dtype=torch.int32, device="cuda")
    monkeypatch.setattr(ct, "dropout_words", lambda device: words)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    graph, o = _captured_step(leaves, do, causal)
    for values in ([5, 7, 11], [-3, 2**30, 99]):
        words.copy_(torch.tensor(values, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        seed, offset = ct.seed_offset_of(words)
        judge_step(o, [x.grad for x in leaves], (q, k, v, do), seed, offset, causal,
                   torch.bfloat16, label=f"replay of {values}")


@pytest.mark.gpu
def test_cuda_graph_replays_draw_new_masks():
    """torch's generator draws new words at each replay: another mask each time."""
    q, k, v, do = _inputs("cuda", torch.bfloat16)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    graph, o = _captured_step(leaves, do)
    outputs = []
    for _ in range(2):
        graph.replay()
        outputs.append(o.detach().clone())
    assert not torch.equal(outputs[0], outputs[1])


@pytest.mark.gpu
def test_cuda_under_torch_compile():
    test_under_torch_compile("cuda")
