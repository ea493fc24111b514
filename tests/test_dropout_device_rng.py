"""Dropout with the seed in device memory (``CF_DROP_RNG_PTR``, ``specs.with_device_rng``;
docs/dropout.md), on the CPU: the kernels' parameter letters, the launch functions switching
to the device-word kernels and packing their arguments (a recording launcher in place of the
driver), and the JAX targets' choice between host words and device words. The kernels
compile spill-free in tests/test_compile.py; on a GPU, tests/test_gpu_jax_dropout.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from cuflash import jax_modifiers, launch, philox, specs
from cuflash import plan as planning

SM80 = specs.facts_for_arch("sm_80")
DROP = specs.ModFlags(dropout=True)
RNG = 0x7F0000001000  # a stand-in device address of the three words


def _shape(causal=False, mods=DROP, batch=2):
    return planning.Shape(batch, 300, 300, 4, 2, 64, "bfloat16", causal, mods)


def test_device_rng_kernels_take_one_pointer_for_the_three_words():
    spec = planning.plan_forward(_shape(), SM80).kernel.spec
    rng_spec = specs.with_device_rng(spec)
    assert specs.device_rng(rng_spec) and not specs.device_rng(spec)
    plain, device = launch.signature_of(spec), launch.signature_of(rng_spec)
    assert plain.endswith(launch.DROP) and device.endswith(launch.DROP_RNG)
    assert plain[:-len(launch.DROP)] == device[:-len(launch.DROP_RNG)]
    dense = planning.plan_forward(_shape(mods=specs.NO_MODS), SM80).kernel.spec
    assert specs.with_device_rng(dense) == dense  # no dropout: nothing to read


def test_dropout_args_with_words_on_the_device():
    host = launch.dropout_args(0.25, 2**40 + 5, 9, heads=4)
    device = launch.dropout_args(0.25, None, 0, heads=4, rng=RNG)
    assert host.kernel_args(3) == (5, 2**8, 9, philox.keep_threshold(0.25),
                                   philox.keep_scale(0.25), 12)
    assert device.kernel_args(3) == (RNG, philox.keep_threshold(0.25),
                                     philox.keep_scale(0.25), 12)
    kernel = planning.plan_forward(_shape(), SM80).kernel
    assert host.kernel(kernel) is kernel
    switched = device.kernel(kernel)
    assert specs.device_rng(switched.spec) and switched.grid == kernel.grid
    dense = planning.plan_forward(_shape(mods=specs.NO_MODS), SM80).kernel
    assert device.kernel(dense) is dense


class _Recorder:
    def __init__(self):
        self.launches = []

    def __call__(self, kernel, device_id, grid_z, signature, args, stream, shape,
                 convert=False):
        launch.param_packer(signature).pack(*args)  # the driver's buffer: types and count
        self.launches.append((kernel.spec, signature, args))


@pytest.mark.parametrize("deterministic", [False, True])
def test_launches_switch_to_device_words_forward_and_backward(monkeypatch, deterministic):
    record = _Recorder()
    monkeypatch.setattr(launch, "_launch", record)
    monkeypatch.setattr(launch, "memset_async", lambda *a: None)
    monkeypatch.setattr(launch, "_convert", lambda *a, **k: None)
    shape = _shape(causal=True, batch=3)
    op = launch.Operand(0x10000, 300 * 4 * 64, 4 * 64, 64, 2)
    kv = launch.Operand(0x20000, 300 * 2 * 64, 2 * 64, 64, 2)
    drop = launch.dropout_args(0.1, None, 0, heads=4, rng=RNG)
    fwd = planning.plan_forward(shape, SM80)
    launch.run_forward(fwd, op, kv, kv, op, 0x30000, 0x40000, 0.125, 0, 0, drop=drop)
    bwd = planning.plan_backward(shape, SM80, deterministic)
    launch.run_backward(bwd, op, op, kv, kv, op, 0x30000, 0x40000, op, kv, kv, 0.125,
                        0x50000, 0, 0, drop=drop)
    dropout_launches = [(s, sig, a) for s, sig, a in record.launches if s.mods.dropout]
    kinds = {s.kind for s, _, _ in dropout_launches}
    assert "fwd" in kinds and ({"bwd", "bwd_dq"} & kinds)
    if deterministic and bwd.dq is not None:
        assert "bwd_dq" in kinds
    for spec, signature, args in dropout_launches:
        assert specs.device_rng(spec), spec.name
        assert signature.endswith(launch.DROP_RNG)
        tail = args[-4:]
        assert tail[0] == RNG and tail[1] == philox.keep_threshold(0.1), spec.name
    # without device words the same launches take the planned kernels and the three values
    record.launches.clear()
    host = launch.dropout_args(0.1, 77, 5, heads=4)
    launch.run_forward(fwd, op, kv, kv, op, 0x30000, 0x40000, 0.125, 0, 0, drop=host)
    spec, signature, args = record.launches[0]
    assert spec == fwd.kernel.spec and args[-6:-3] == (77, 0, 5)


def test_jax_targets_keep_device_words_on_the_device():
    options = jax_modifiers.Options(causal=False, softmax_scale=0.125, window=None,
                                    softcap=None, alibi=False, sinks=False, dropout_p=0.2)
    words = np.array([5, 1, 9], np.uint32)
    assert options.dropout_kwargs([words]) == dict(dropout_p=0.2, dropout_seed=5 + 2**32,
                                                   dropout_offset=9)
    on_device = SimpleNamespace(dtype=np.dtype(np.uint32), shape=(3,))  # a CuPy stand-in
    assert options.dropout_kwargs([on_device]) == dict(dropout_p=0.2, dropout_rng=on_device)
    assert options.split and options.extra_ndims() == [1]
    assert jax_modifiers.Options(**{**options.__dict__, "dropout_p": 0.0}).dropout_kwargs(
        [words]) == {}


@pytest.mark.parametrize("words, match", [
    (SimpleNamespace(dtype=np.dtype(np.int32), shape=(3,),
                     flags=SimpleNamespace(c_contiguous=True)), "int32"),
    (SimpleNamespace(dtype=np.dtype(np.uint32), shape=(2,),
                     flags=SimpleNamespace(c_contiguous=True)), r"shape \(2,\)"),
])
def test_bad_device_words_are_refused(words, match):
    with pytest.raises(ValueError, match=f"dropout_rng: expected a contiguous uint32.*{match}"):
        launch.rng_address(words)
