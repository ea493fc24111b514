"""cuflash.xla_ffi hard edges: registration from many threads at once, and a handler that
never returns success (NULL) after a failure, even when reporting the failure fails.

CPU backend only; the child processes get this checkout's cuflash on PYTHONPATH.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import cuflash  # noqa: E402
import cuflash.jax as cj  # noqa: E402
from cuflash import xla_ffi  # noqa: E402

FIRST_CALLS_SCRIPT = Path(__file__).parent / "edges_scripts" / "first_jit_calls.py"
REPO_ROOT = Path(cuflash.__file__).resolve().parent.parent


def _ensure_registered() -> None:
    """One jitted call, so the targets are registered and the reserve error exists."""
    q = jnp.ones((1, 8, 1, 8), jnp.float32)
    jax.jit(lambda q: cj.flash_attention(q, q, q))(q).block_until_ready()


# -- item 1: registration races --------------------------------------------------------------


def test_first_jitted_calls_from_many_threads_in_fresh_processes():
    """8 fresh processes x 8 threads, each thread's first jitted call at the same moment.
    Before the lock: some processes crashed, others got 'Duplicate FFI handler registration'
    or 'No FFI handler registered'. About 5 s on 2 cores; the deterministic test below covers the same race."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu")

    def run_child(_):
        return subprocess.run([sys.executable, str(FIRST_CALLS_SCRIPT)], env=env,
                              capture_output=True, text=True, timeout=120)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run_child, range(8)))
    failures = [f"rc={r.returncode}\n{r.stdout[-600:]}{r.stderr[-600:]}" for r in results
                if r.returncode != 0]
    assert not failures, "\n---\n".join(failures)


def test_register_is_called_once_from_racing_threads_and_recorded_after(monkeypatch):
    """Deterministic version of the race: a slow XLA registration seen by 8 threads."""
    calls, seen_registered = [], []

    def slow_register(name, capsule, platform):
        seen_registered.append(xla_ffi.registered(name, platform))  # not yet recorded
        time.sleep(0.05)
        calls.append((name, platform))

    monkeypatch.setattr(jax.ffi, "register_ffi_target", slow_register)
    barrier = threading.Barrier(8)

    def register():
        barrier.wait()
        xla_ffi.register("cuflash_test_race", lambda call: None, "cpu")

    threads = [threading.Thread(target=register) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [("cuflash_test_race", "cpu")]
    assert seen_registered == [False]
    assert xla_ffi.registered("cuflash_test_race", "cpu")


def test_failed_registration_is_retried_and_its_callback_kept(monkeypatch):
    attempts = []

    def flaky_register(name, capsule, platform):
        attempts.append(capsule)
        if len(attempts) == 1:
            raise RuntimeError("XLA said no")

    monkeypatch.setattr(jax.ffi, "register_ffi_target", flaky_register)
    kept_before = len(xla_ffi._CALLBACKS)
    with pytest.raises(RuntimeError, match="XLA said no"):
        xla_ffi.register("cuflash_test_retry", lambda call: None, "cpu")
    assert not xla_ffi.registered("cuflash_test_retry", "cpu")
    xla_ffi.register("cuflash_test_retry", lambda call: None, "cpu")
    assert xla_ffi.registered("cuflash_test_retry", "cpu") and len(attempts) == 2
    # XLA may hold the first callback's address even though its registration raised
    assert len(xla_ffi._CALLBACKS) == kept_before + 2


# -- item 2: the handler never returns success after a failure -------------------------------


def _message_of(error: int) -> str:
    """Read and destroy an XLA_FFI_Error the handler returned (as XLA would)."""
    assert error, "the handler returned NULL (success) after a failure"
    with pytest.raises(xla_ffi.FfiCallError) as info:
        xla_ffi._check(ctypes.pointer(_api()), error, "handler")
    return str(info.value)


def _api() -> xla_ffi.Api:
    _ensure_registered()
    return ctypes.cast(xla_ffi._RESERVE.api, ctypes.POINTER(xla_ffi.Api)).contents


def _execute_frame(api) -> xla_ffi.CallFrame:
    """A minimal EXECUTE call frame with no buffers or attributes."""
    frame = xla_ffi.CallFrame()
    frame.struct_size = ctypes.sizeof(xla_ffi.CallFrame)
    frame.api = api
    frame.stage = xla_ffi.STAGE_EXECUTE
    return frame


def _raise(exc):
    def execute(call):
        raise exc

    return execute


class _UnprintableError(Exception):
    def __str__(self):
        raise RuntimeError("__str__ failed too")


def test_null_call_frame_returns_an_error():
    _api()
    handler = xla_ffi.make_handler("cuflash_test_null", lambda call: None)
    assert "reporting the failure failed too" in _message_of(handler(None))


def test_exception_whose_message_fails_returns_an_error():
    handler = xla_ffi.make_handler("cuflash_test_str", _raise(_UnprintableError()))
    frame = _execute_frame(ctypes.pointer(_api()))
    assert "reporting the failure failed too" in _message_of(handler(ctypes.pointer(frame)))


def test_frame_without_api_returns_the_reserve_error():
    """create_error has no API to use: the error made in advance goes back instead of NULL."""
    _api()
    handler = xla_ffi.make_handler("cuflash_test_no_api", _raise(ValueError("bad")))
    frame = _execute_frame(None)
    assert "reporting the failure failed too" in _message_of(handler(ctypes.pointer(frame)))


def test_reserve_is_refilled_after_use():
    handler = xla_ffi.make_handler("cuflash_test_refill", lambda call: None)
    for _ in range(3):
        _api()
        _message_of(handler(None))
        ok = _execute_frame(ctypes.pointer(_api()))
        assert handler(ctypes.pointer(ok)) is None  # success, and the reserve is made again


def test_ordinary_exception_keeps_its_message():
    handler = xla_ffi.make_handler("cuflash_test_plain", _raise(ValueError("q: expected x")))
    frame = _execute_frame(ctypes.pointer(_api()))
    message = _message_of(handler(ctypes.pointer(frame)))
    assert "cuflash_test_plain: ValueError: q: expected x" in message


def test_unprintable_exception_under_jit_is_raised_and_the_process_goes_on():
    xla_ffi.register("cuflash_test_unprintable", _raise(_UnprintableError()), "cpu")
    call = jax.ffi.ffi_call("cuflash_test_unprintable", jax.ShapeDtypeStruct((2,), jnp.float32))
    x = jnp.ones((2,), jnp.float32)
    with pytest.raises(Exception, match="failed too"):
        jax.jit(lambda x: call(x))(x).block_until_ready()
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda x: x + 1)(x)), 2)
