"""cuflash.jax.attention_with_kvcache under jax.jit on a CUDA GPU (``gpu`` tests; skipped
without a GPU or a CUDA-enabled JAX).

The XLA FFI target of ``cuflash.jax_decode`` against the eager call (the same kernels and
plan: equal bit for bit) and the float64 reference (tests/decode_helpers.py's rule): MHA and
GQA, q_len 1 and 4, lengths given, paged caches, window / softcap / ALiBi, appends through
the aliased cache buffers, automatic splits with XLA's scratch; a decode loop of appends in
one jitted lax.fori_loop (donated caches); the target inside XLA's command buffers (CUDA
graphs) against the same loop outside them, in child processes (XLA_FLAGS are read once).
o and lse are NaN-poisoned first (CUFLASH_POISON=1).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cuflash import decode, jax_decode

try:
    import decode_helpers as dh
    import gpu_helpers as gh
except ImportError:  # tests/ collected as a package
    from tests import decode_helpers as dh
    from tests import gpu_helpers as gh

pytestmark = pytest.mark.gpu

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

ARRAYS = ("q", "k_cache", "v_cache", "k_new", "v_new", "cache_seqlens", "block_table",
          "alibi_slopes")
TESTS_DIR = Path(__file__).resolve().parent


@pytest.fixture(scope="module", autouse=True)
def gpu_env():
    yield from gh.gpu_module_env()


@pytest.fixture(scope="module")
def jax_gpu():
    import jax

    return jax, gh.jax_gpu_device()


def _dtypes_here():
    from cuflash import launch, specs

    return specs.arch_dtypes(launch.device_facts(0).arch)


def _on_device(jax, device, kw: dict) -> dict:
    return {n: jax.device_put(np.ascontiguousarray(kw[n]), device) for n in ARRAYS
            if kw.get(n) is not None}


def _step(case: dict):
    static = dict(causal=case["causal"], softmax_scale=case["softmax_scale"],
                  num_splits=case["num_splits"], window=case.get("window"),
                  softcap=case.get("softcap"), return_softmax_lse=True)

    def step(arrays):
        import cuflash.jax as cj

        return cj.attention_with_kvcache(**arrays, **static)

    return step


def _check_jit(jax, device, case: dict):
    """jit == eager bit for bit, both against the reference; the returned caches hold the
    append; the operands are untouched. Returns the jitted results."""
    kw, truth = dh.make_kvcache_inputs(case)
    arrays = _on_device(jax, device, kw)
    fn = _step(case)
    jitted = jax.jit(fn)
    assert jax_decode.TARGET in jitted.lower(arrays).as_text()
    got = jitted(arrays)
    eager = fn(arrays)
    label = dh.describe(case)
    assert len(got) == len(eager) == (4 if case.get("seqlen_new") else 2), label
    for a, b in zip(got, eager):
        assert list(a.devices())[0] == device
        np.testing.assert_array_equal(gh.to_host(a), gh.to_host(b), err_msg=label)
    mods = {n: truth[n] for n in ("window", "softcap", "alibi_slopes") if n in truth}
    dh.assert_decode_matches(gh.to_host(got[0]), gh.to_host(got[1]), kw["q"], truth["k"],
                             truth["v"], truth["lens"], causal=case["causal"],
                             softmax_scale=case["softmax_scale"], dtype=case["dtype"],
                             label=f"jit {label}", **mods)
    if case.get("seqlen_new"):
        table = kw.get("block_table")
        for got_cache, want in zip(got[2:], (truth["k"], truth["v"])):
            np.testing.assert_array_equal(dh.logical(gh.to_host(got_cache), table), want,
                                          err_msg=label)
    for n, x in arrays.items():  # not donated: never written
        np.testing.assert_array_equal(gh.to_host(x), np.asarray(kw[n]), err_msg=f"{n} {label}")
    return got


LAYOUTS = [  # (heads, heads_kv, q_len)
    (8, 8, 1), (8, 8, 4), (16, 4, 1), (16, 4, 4)]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("paged, seqlen_new", [(None, 0), (16, 0), (None, 2), (64, 1)],
                         ids=["contiguous", "paged16", "append", "paged64_append"])
@pytest.mark.parametrize("heads, heads_kv, q_len", LAYOUTS,
                         ids=[f"h{h}kv{k}q{q}" for h, k, q in LAYOUTS])
def test_jit_matches_eager_and_reference_gpu(jax_gpu, heads, heads_kv, q_len, paged,
                                             seqlen_new, dtype):
    if dtype not in _dtypes_here():
        pytest.skip(f"{dtype} not on this GPU")
    jax, device = jax_gpu
    rng = np.random.default_rng()
    case = dict(batch=3, q_len=q_len, heads=heads, heads_kv=heads_kv, head_dim=128,
                seqlen_cache=700, cache_seqlens=[700 - seqlen_new, 0, 333], causal=True,
                dtype=dtype, num_splits=None, softmax_scale=None,
                seed=int(rng.integers(2**32)), page_size=paged, seqlen_new=seqlen_new)
    _check_jit(jax, device, case)


MODS = [dict(window=(40, 0)), dict(softcap=20.0), dict(alibi="heads"),
        dict(window=(100, 3), softcap=5.0, alibi="batch_heads")]


@pytest.mark.parametrize("mods", MODS, ids=["window", "softcap", "alibi", "all"])
@pytest.mark.parametrize("q_len, causal", [(1, True), (4, True), (4, False)])
def test_jit_score_modifiers_gpu(jax_gpu, mods, q_len, causal):
    jax, device = jax_gpu
    dtype = "bfloat16" if "bfloat16" in _dtypes_here() else "float16"
    rng = np.random.default_rng()
    case = dict(batch=2, q_len=q_len, heads=8, heads_kv=2, head_dim=64, seqlen_cache=500,
                cache_seqlens=[497, 120], causal=causal, dtype=dtype, num_splits=3,
                softmax_scale=0.2, seed=int(rng.integers(2**32)), page_size=32, seqlen_new=2,
                **mods)
    _check_jit(jax, device, case)


LONG = [(1, 1, 5000, 8, 8, 128, None), (2, 4, 3000, 16, 2, 64, 64), (3, 1, 2500, 8, 1, 256, None)]


@pytest.mark.parametrize("batch, q_len, cache, heads, heads_kv, head_dim, paged", LONG)
def test_jit_automatic_splits_use_xla_scratch_gpu(jax_gpu, batch, q_len, cache, heads,
                                                  heads_kv, head_dim, paged):
    """Long caches split automatically: the traced scratch is the plan's workspace and the
    jitted result equals the eager one."""
    jax, device = jax_gpu
    dtype = "bfloat16" if "bfloat16" in _dtypes_here() else "float16"
    shape = decode.DecodeShape(batch, q_len, cache if not paged else -(-cache // paged) * paged,
                               heads, heads_kv, head_dim, dtype, paged or 0)
    plan = decode.decode_plan(shape, None, 0)
    assert plan.num_splits > 1 and jax_decode.scratch_bytes(shape, None) == \
        plan.workspace_bytes > 0, plan
    rng = np.random.default_rng()
    lens = [cache] + [int(x) for x in rng.integers(0, cache + 1, batch - 1)]
    case = dict(batch=batch, q_len=q_len, heads=heads, heads_kv=heads_kv, head_dim=head_dim,
                seqlen_cache=cache, cache_seqlens=lens, causal=True, dtype=dtype,
                num_splits=None, softmax_scale=None, seed=int(rng.integers(2**32)),
                page_size=paged)
    _check_jit(jax, device, case)


def test_jit_scratch_traced_too_small_raises_gpu(jax_gpu, monkeypatch):
    """Traced as if without a GPU backend (no scratch), a problem that splits raises a clear
    error when it runs instead of writing past XLA's buffer."""
    jax, device = jax_gpu
    case = dict(batch=1, q_len=1, heads=8, heads_kv=8, head_dim=128, seqlen_cache=5000,
                cache_seqlens=None, causal=False, dtype="float32", num_splits=None,
                softmax_scale=None, seed=1)
    kw, _ = dh.make_kvcache_inputs(case)
    monkeypatch.setattr(jax_decode, "_local_cuda_devices", lambda: ())
    with pytest.raises(Exception, match="scratch: the plan on CUDA device"):
        jax.block_until_ready(jax.jit(_step(case))(_on_device(jax, device, kw)))


# -- a decode loop -----------------------------------------------------------------------------


def loop_problem(seed: int, dtype: str, steps: int = 6):
    """Host arrays of a paged GQA decode loop: one token a step appended and attended."""
    rng = np.random.default_rng(seed)
    dt = dh.NP_DTYPES[dtype]
    b, hk, h, d, page, max_pages = 3, 2, 8, 128, 16, 5
    pages = b * max_pages + 1
    table = rng.permutation(pages)[:b * max_pages].reshape(b, max_pages).astype(np.int32)
    k, v = rng.standard_normal((2, pages, page, hk, d), np.float32).astype(dt)
    q = rng.standard_normal((steps, b, 1, h, d), np.float32).astype(dt)
    k_new, v_new = rng.standard_normal((2, steps, b, 1, hk, d), np.float32).astype(dt)
    lens = np.array([0, 37, max_pages * page - steps], np.int32)
    return dict(k=k, v=v, lens=lens, q=q, k_new=k_new, v_new=v_new, table=table)


def make_loop(jax, steps: int):
    """jit(fori_loop over steps) of append + attend, caches and lengths carried; returns
    (k, v, lens, outs, lses)."""
    import jax.numpy as jnp

    import cuflash.jax as cj

    def run(k, v, lens, q, k_new, v_new, table):
        def body(i, carry):
            k, v, lens, outs, lses = carry
            o, lse, k, v = cj.attention_with_kvcache(
                q[i], k, v, k_new=k_new[i], v_new=v_new[i], cache_seqlens=lens,
                block_table=table, causal=True, return_softmax_lse=True)
            return k, v, lens + 1, outs.at[i].set(o), lses.at[i].set(lse)

        outs = jnp.zeros(q.shape, q.dtype)
        lses = jnp.zeros((steps, q.shape[1], q.shape[3], 1), jnp.float32)
        return jax.lax.fori_loop(0, steps, body, (k, v, lens, outs, lses))

    return jax.jit(run, donate_argnums=(0, 1))


def check_loop(p: dict, got, dtype: str, label: str) -> None:
    """Each step's o / lse against the reference over the cache as it stood then."""
    k, v = (dh.logical(p[n], p["table"]) for n in ("k", "v"))  # gathered: copies
    lens = p["lens"].copy()
    for i in range(p["q"].shape[0]):
        for e in range(k.shape[0]):
            k[e, lens[e]], v[e, lens[e]] = p["k_new"][i, e, 0], p["v_new"][i, e, 0]
        lens = lens + 1
        dh.assert_decode_matches(got["outs"][i], got["lses"][i], p["q"][i], k, v, lens,
                                 causal=True, softmax_scale=None, dtype=dtype,
                                 label=f"{label} step {i}")
    np.testing.assert_array_equal(dh.logical(got["k"], p["table"]), k, err_msg=label)
    np.testing.assert_array_equal(got["lens"], lens, err_msg=label)


def _run_loop(jax, device, p: dict) -> dict:
    put = lambda x: jax.device_put(x, device)  # noqa: E731
    steps = p["q"].shape[0]
    out = make_loop(jax, steps)(*(put(p[n]) for n in ("k", "v", "lens", "q", "k_new",
                                                      "v_new", "table")))
    return {n: gh.to_host(x) for n, x in zip(("k", "v", "lens", "outs", "lses"), out)}


def test_jit_decode_loop_gpu(jax_gpu):
    """Appends and attends in one jitted fori_loop (caches donated, carried in place): every
    step against the reference, equal to the same steps run eagerly."""
    jax, device = jax_gpu
    import cuflash.jax as cj

    dtype = "bfloat16" if "bfloat16" in _dtypes_here() else "float16"
    p = loop_problem(int(np.random.default_rng().integers(2**32)), dtype)
    got = _run_loop(jax, device, p)
    check_loop(p, got, dtype, "fori_loop")
    put = lambda x: jax.device_put(x, device)  # noqa: E731
    k, v, lens, table = put(p["k"]), put(p["v"]), put(p["lens"]), put(p["table"])
    for i in range(p["q"].shape[0]):  # eager steps: the same kernels, bit for bit
        o, lse, k, v = cj.attention_with_kvcache(
            put(p["q"][i]), k, v, k_new=put(p["k_new"][i]), v_new=put(p["v_new"][i]),
            cache_seqlens=lens, block_table=table, causal=True, return_softmax_lse=True)
        lens = lens + 1
        np.testing.assert_array_equal(gh.to_host(o), got["outs"][i])
        np.testing.assert_array_equal(gh.to_host(lse), got["lses"][i])
    np.testing.assert_array_equal(gh.to_host(k), got["k"])


# -- XLA's command buffers (CUDA graphs), in child processes ----------------------------------

_CHILD = """
import json, sys
import numpy as np
import jax
sys.path[:0] = [{tests!r}, {root!r}]
import test_gpu_jax_decode as t
from cuflash import jax_decode
dtype, seeds, out = {dtype!r}, {seeds!r}, {out!r}
device = jax.devices("gpu")[0]
run = t.make_loop(jax, 6)
p = t.loop_problem(seeds[0], dtype)
args = [jax.device_put(p[n], device) for n in ("k", "v", "lens", "q", "k_new", "v_new", "table")]
hlo = run.lower(*args).compile().as_text()
results = {{}}
for seed in seeds:  # several executions: a captured graph replays with new inputs
    p = t.loop_problem(seed, dtype)
    got = t._run_loop(jax, device, p)
    t.check_loop(p, got, dtype, f"seed {{seed}}")
    np.savez(f"{{out}}_{{seed}}.npz", **got)
print(json.dumps({{"in_command_buffer": t.target_in_command_buffer(hlo)}}))
"""


def target_in_command_buffer(hlo: str) -> bool:
    """Whether the compiled HLO runs the decode target inside a command buffer: in a
    ``command_buffer`` computation (XLA outlines each captured sequence into one) or in a
    computation it reaches (the body of a while loop captured whole)."""
    bodies, name = {}, None
    for line in hlo.splitlines():
        if line.rstrip().endswith("{") and not line.startswith((" ", "HloModule")):
            name = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            bodies[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None:
            bodies[name].append(line)
    callees = {n: set(re.findall(r"(?:body|condition|to_apply|calls|branch_computations)="
                                 r"\{?%?([\w.\-]+)", "\n".join(lines)))
               | set(re.findall(r"branch_computations=\{([^}]*)\}", "\n".join(lines)))
               for n, lines in bodies.items()}
    seen, todo = set(), [n for n in bodies if "command_buffer" in n]
    while todo:
        n = todo.pop()
        if n in seen or n not in bodies:
            continue
        seen.add(n)
        todo += [c.strip().lstrip("%") for cs in callees[n] for c in cs.split(",")]
    target = f'custom_call_target="{jax_decode.TARGET}"'
    return any(target in line for n in seen for line in bodies[n])


def _child(tmp_path, name: str, dtype: str, seeds, xla_flags: str, **env) -> tuple[bool, list]:
    out = str(tmp_path / name)
    code = _CHILD.format(tests=str(TESTS_DIR), root=str(TESTS_DIR.parent), dtype=dtype,
                         seeds=list(seeds), out=out)
    child_env = dict(os.environ, XLA_FLAGS=xla_flags, CUFLASH_POISON="1",
                     XLA_PYTHON_CLIENT_PREALLOCATE="false", **env)
    r = subprocess.run([sys.executable, "-c", code], env=child_env, capture_output=True,
                       text=True, timeout=540)
    assert r.returncode == 0, f"{name}: rc {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    flag = json.loads(r.stdout.strip().splitlines()[-1])["in_command_buffer"]
    return flag, [dict(np.load(f"{out}_{s}.npz")) for s in seeds]


def test_jit_decode_loop_in_xla_command_buffers_gpu(jax_gpu, tmp_path):
    """The decode loop with XLA's command buffers forced on (every fusion, custom call and
    the while loop, however short the sequence): the replays (new inputs each run) equal the
    same loop with command buffers off, and the reference. The target is registered without
    the command-buffer trait by default, so XLA keeps it out of its graphs."""
    dtype = "bfloat16" if "bfloat16" in _dtypes_here() else "float16"
    seeds = [int(s) for s in np.random.default_rng().integers(2**31, size=3)]
    graphs = ("--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL,WHILE,CONDITIONAL "
              "--xla_gpu_graph_min_graph_size=1")
    captured, with_graphs = _child(tmp_path, "graphs", dtype, seeds, graphs)
    assert not captured, "the target has no command-buffer trait, yet XLA captured it"
    plain, without = _child(tmp_path, "plain", dtype, seeds, "--xla_gpu_enable_command_buffer=")
    assert not plain
    for a, b in zip(with_graphs, without):
        for n in a:
            np.testing.assert_array_equal(a[n], b[n], err_msg=n)
