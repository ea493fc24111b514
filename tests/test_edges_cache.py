"""The on-disk cubin cache (cuflash.compiler, issue #9 item 10): unique temporary files per
writer, threads included, and every read verified (size and sha256) before the bytes are
used as code. NVRTC is replaced by a stub: no GPU, no compiler needed."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

pytest.importorskip("cupy_backends.cuda.libs.nvrtc")

from cuflash import compiler, specs  # noqa: E402

H100 = specs.DeviceFacts("h100", "sm_90", 132, 227 * specs.KIB)
SPEC = specs.select_forward(H100, "bfloat16", 128, False)
CUBIN = hashlib.sha256(b"seed").digest() * (1 << 16)  # 2 MiB: writes take a while


@pytest.fixture
def stub_nvrtc(monkeypatch, tmp_path):
    """CUPY_CACHE_DIR in tmp_path; NVRTC replaced by a stub that counts its compilations."""
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path))
    compiled = []

    def compile_stub(spec, arch, opts):
        compiled.append(arch)
        return "", CUBIN

    monkeypatch.setattr(compiler, "_nvrtc_compile", compile_stub)
    return compiled


def _cache_files(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir())


def test_second_call_reads_the_cache(stub_nvrtc, tmp_path):
    assert compiler._nvrtc_cubin(SPEC, "sm_90a") == CUBIN
    assert compiler._nvrtc_cubin(SPEC, "sm_90a") == CUBIN
    assert stub_nvrtc == ["sm_90a"]
    (name,) = _cache_files(tmp_path)
    assert name.startswith(f"cuflash_{SPEC.name}_sm_90a_") and name.endswith(".cubin")


@pytest.mark.parametrize("damage", ["truncated", "flipped-byte", "no-header", "empty"])
def test_damaged_cache_file_is_recompiled_not_loaded(stub_nvrtc, tmp_path, damage):
    compiler._nvrtc_cubin(SPEC, "sm_90a")
    (path,) = tmp_path.iterdir()
    data = path.read_bytes()
    damaged = {"truncated": data[: len(data) // 2],
               "flipped-byte": data[:-1] + bytes([data[-1] ^ 1]),
               "no-header": CUBIN[: len(CUBIN) // 2],  # a half-written cubin of the old format
               "empty": b""}[damage]
    path.write_bytes(damaged)
    assert compiler._nvrtc_cubin(SPEC, "sm_90a") == CUBIN
    assert len(stub_nvrtc) == 2
    assert compiler.read_cached_cubin(path) == CUBIN  # and the cache is repaired


def test_threads_share_the_cache_safely(stub_nvrtc, tmp_path):
    """8 threads compile and write the same entry at once, and read it while others write:
    each gets the whole cubin, and no temporary file is left behind."""
    barrier = threading.Barrier(8)
    results, errors = [], []

    def work():
        barrier.wait()
        try:
            for _ in range(5):
                results.append(compiler._nvrtc_cubin(SPEC, "sm_90a"))
                compiler.write_cached_cubin(next(tmp_path.glob("*.cubin")), CUBIN)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 40 and all(r == CUBIN for r in results)
    (name,) = _cache_files(tmp_path)
    assert name.endswith(".cubin")


def test_unwritable_cache_only_costs_a_recompile(stub_nvrtc, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"")
    monkeypatch.setenv("CUPY_CACHE_DIR", str(blocker))
    assert compiler._nvrtc_cubin(SPEC, "sm_90a") == CUBIN
    assert compiler._nvrtc_cubin(SPEC, "sm_90a") == CUBIN
    assert len(stub_nvrtc) == 2
    assert os.path.isfile(blocker)
