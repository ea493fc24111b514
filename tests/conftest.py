"""Shared pytest setup: the ``gpu`` marker and the hypothesis profile.

Tests marked ``@pytest.mark.gpu`` need a CUDA GPU through CuPy; they are skipped (with the
reason) when CuPy is missing or sees no device, so the whole suite runs on CPU-only CI.
The hypothesis profile ``ci`` (no deadline: first calls compile kernels or import frameworks)
is loaded unless HYPOTHESIS_PROFILE names another. CUFLASH_TEST_SHARD="k/M" keeps the k-th of M
shards (1 <= k <= M) of the collected tests (``shard_of_each``: whole files where they fit):
the GPU suite has outgrown one session's device time, and shards let sessions take it in
turns (bench/gpu_suite.sh shard).
"""

from __future__ import annotations

import faulthandler
import functools
import os
import time
import zlib

import pytest
from hypothesis import settings

settings.register_profile("ci", deadline=None)
settings.register_profile("dev", deadline=None, max_examples=20)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU via CuPy")


@functools.lru_cache(maxsize=None)
def gpu_unavailable_reason() -> str | None:
    """None when CuPy can use a CUDA device, else why not."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install
        return f"cupy not importable ({type(exc).__name__}: {exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver, no device
        return f"no CUDA device ({type(exc).__name__}: {exc})"
    if count == 0:
        return "no CUDA device (getDeviceCount() == 0)"
    return None


def parse_shard(text: str) -> tuple[int, int]:
    """"k/M" -> (k, M), 1 <= k <= M; a ValueError naming CUFLASH_TEST_SHARD otherwise."""
    try:
        k, m = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"CUFLASH_TEST_SHARD: expected k/M (e.g. 3/10), got {text!r}") from None
    if not 1 <= k <= m:
        raise ValueError(f"CUFLASH_TEST_SHARD: expected 1 <= k <= M, got {text!r}")
    return k, m


def shard_of_each(nodeids: list[str], m: int) -> list[int]:
    """The shard (1..m) of each test id: whole files where they fit, so a shard compiles a
    module's kernels ahead only where it runs that module (gpu_helpers.module_setup
    compiles all of them). Files go largest first to the least loaded shard; a file larger
    than a shard's share is dealt out test by test (a stable crc32 of the id). The same ids
    give the same shards on every machine."""
    by_file: dict[str, list[int]] = {}
    for i, nodeid in enumerate(nodeids):
        by_file.setdefault(nodeid.split("::")[0], []).append(i)
    share = len(nodeids) / m
    load, out = [0] * m, [0] * len(nodeids)
    for path in sorted(by_file, key=lambda f: (-len(by_file[f]), f)):
        members = by_file[path]
        if len(members) > share:
            for i in members:
                out[i] = zlib.crc32(nodeids[i].encode()) % m + 1
                load[out[i] - 1] += 1
            continue
        target = min(range(m), key=lambda j: (load[j], j))
        load[target] += len(members)
        for i in members:
            out[i] = target + 1
    return out


@pytest.hookimpl(trylast=True)  # after -m / -k have deselected: shards of what would run
def pytest_collection_modifyitems(config, items):
    shard = os.environ.get("CUFLASH_TEST_SHARD")
    if shard:
        k, m = parse_shard(shard)
        shards = shard_of_each([item.nodeid for item in items], m)
        config.hook.pytest_deselected(items=[x for x, j in zip(items, shards) if j != k])
        items[:] = [x for x, j in zip(items, shards) if j == k]
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    reason = gpu_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU via CuPy: {reason}")
    for item in gpu_items:
        item.add_marker(skip)


def pytest_runtest_logreport(report):
    """With CUFLASH_FAILURE_LOG set, each failing test's id, error message and place are
    appended there as it fails: a GPU call cut off by its time limit prints no summary, and its dots
    do not say which test failed. With CUFLASH_DURATION_LOG set, each phase of a test that
    took a second or more is appended there (setup holds a module's ahead-of-time compile):
    where a GPU call's time went, even if it was cut off. (Under xdist the controller writes:
    it hears of every worker's reports as they come.)"""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    durations = os.environ.get("CUFLASH_DURATION_LOG")
    if durations and report.duration >= 1.0:
        worker = getattr(report, "node", None)
        with open(durations, "a") as out:
            out.write(f"{report.duration:8.1f} s  {report.when:8} "
                      f"{getattr(worker, 'gateway', None) and worker.gateway.id or '-':4} "
                      f"{report.nodeid}\n")
    path = os.environ.get("CUFLASH_FAILURE_LOG")
    if not path or not report.failed:
        return
    lines = str(report.longrepr).strip().splitlines() or [""]
    error = next((x for x in lines if x.startswith("E ")), "")  # the message, then where
    with open(path, "a") as out:
        out.write(f"{report.nodeid} ({report.when}): {error[:300]} | {lines[-1][:200]}\n")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """With CUFLASH_TEST_TIMEOUT set (seconds), a test that runs longer ends its process
    after printing every thread's stack (faulthandler): under xdist the worker's crash fails
    that test by name and a fresh worker takes the rest, where a hung kernel would otherwise
    hold the whole stage until its time limit (session 34)."""
    seconds = float(os.environ.get("CUFLASH_TEST_TIMEOUT") or 0)
    if seconds > 0:
        faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        yield
    finally:
        if seconds > 0:
            faulthandler.cancel_dump_traceback_later()


_running: dict[str, float] = {}  # test id -> its start, seconds since the epoch


def _write_running() -> None:
    path = os.environ.get("CUFLASH_RUNNING_LOG")
    if not path or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    with open(path + ".tmp", "w") as out:
        out.writelines(f"started {time.strftime('%H:%M:%S', time.gmtime(t))} UTC  {nodeid}\n"
                       for nodeid, t in _running.items())
    os.replace(path + ".tmp", path)


def pytest_runtest_logstart(nodeid, location):
    """With CUFLASH_RUNNING_LOG set, the tests started and not yet finished, rewritten as
    each starts and ends: a stage killed by its time limit leaves there the tests that were
    still running (session 34: a hung kernel stalled a shard with no test named)."""
    _running[nodeid] = time.time()
    _write_running()


def pytest_runtest_logfinish(nodeid, location):
    _running.pop(nodeid, None)
    _write_running()


@pytest.fixture
def smem_budget():
    """Call with a budget in KiB to plan tiles for it; reset to the device's afterwards."""
    from cuflash import specs

    def set_kib(kib: int | None) -> None:
        specs.set_smem_budget(None if kib is None else kib * specs.KIB)

    yield set_kib
    specs.set_smem_budget(None)
