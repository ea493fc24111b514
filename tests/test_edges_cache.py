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
    return sorted(p.name for p in tmp_path.iterdir() if p.is_file())


def test_second_call_reads_the_cache(stub_nvrtc, tmp_path):
    assert compiler._nvrtc_cubin(SPEC, "sm_90a") == CUBIN
    assert compiler._nvrtc_cubin(SPEC, "sm_90a") == CUBIN
    assert stub_nvrtc == ["sm_90a"]
    (name,) = _cache_files(tmp_path)
    assert name.startswith(f"cuflash_{SPEC.name}_sm_90a_") and name.endswith(".cubin")


def test_compile_log_has_a_line_per_build_not_per_hit(stub_nvrtc, tmp_path, monkeypatch):
    """CUFLASH_COMPILE_LOG (set by bench/gpu_suite.sh): one line for each NVRTC build, none
    for a cache hit, so a GPU run shows which kernels a carried pack did not hold."""
    log = tmp_path / "logs" / "compiles.txt"
    log.parent.mkdir()
    monkeypatch.setenv("CUFLASH_COMPILE_LOG", str(log))
    compiler._nvrtc_cubin(SPEC, "sm_90a")
    compiler._nvrtc_cubin(SPEC, "sm_90a")
    (line,) = log.read_text().splitlines()
    assert SPEC.name in line and line.endswith("sm_90a")


@pytest.mark.parametrize("damage", ["truncated", "flipped-byte", "no-header", "empty"])
def test_damaged_cache_file_is_recompiled_not_loaded(stub_nvrtc, tmp_path, damage):
    compiler._nvrtc_cubin(SPEC, "sm_90a")
    (path,) = tmp_path.glob("*.cubin")
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


def test_threads_wanting_one_entry_compile_it_once(stub_nvrtc):
    barrier = threading.Barrier(8)

    def work():
        barrier.wait()
        assert compiler._nvrtc_cubin(SPEC, "sm_90a") == CUBIN

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stub_nvrtc == ["sm_90a"]


_PROCESS = """
import sys, time
from cuflash import compiler, specs
spec = specs.select_forward(specs.DeviceFacts("h100", "sm_90", 132, 227 * specs.KIB),
                            "bfloat16", 128, False)
def compile_stub(spec, arch, opts):
    with open(sys.argv[1], "a") as log:
        log.write("compiled\\n")
    time.sleep(0.5)  # long enough that the other processes arrive while it works
    return "", b"cubin" * 1000
compiler._nvrtc_compile = compile_stub
assert compiler._nvrtc_cubin(spec, "sm_90a") == b"cubin" * 1000
"""


def test_processes_wanting_one_entry_compile_it_once(tmp_path):
    """pytest-xdist workers precompile the same specs at once: one compiles, the rest read."""
    import subprocess
    import sys

    log = tmp_path / "compiles.log"
    env = dict(os.environ, CUPY_CACHE_DIR=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, "-c", _PROCESS, str(log)], env=env)
             for _ in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0] * 4
    assert log.read_text().splitlines() == ["compiled"]


def test_cache_key_ignores_where_the_sources_live(tmp_path, monkeypatch):
    """A cache built from one checkout serves another of the same sources (a GPU machine
    given a cache built elsewhere): the include path is not part of the key."""
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path))
    opts = compiler.nvrtc_options(SPEC) + ["--gpu-architecture=sm_90a", "-ftz=true"]
    moved = [("-I/elsewhere/kernels_cu" if o.startswith("-I") else o) for o in opts]
    assert moved != opts
    here = compiler.cubin_cache_path(SPEC, "sm_90a", opts, (13, 0))
    assert compiler.cubin_cache_path(SPEC, "sm_90a", moved, (13, 0)) == here
    assert compiler.cubin_cache_path(SPEC, "sm_90a", opts, (13, 5)) != here
    other = [o for o in opts if not o.startswith("-DCF_SOURCE_HASH")] + ["-DCF_SOURCE_HASH=1"]
    assert compiler.cubin_cache_path(SPEC, "sm_90a", other, (13, 0)) != here


@pytest.fixture
def kernel_copy(monkeypatch, tmp_path):
    """kernels_cu/ copied to tmp_path/kernels_cu, the compiler reading it there."""
    import shutil

    copy = tmp_path / "kernels_cu"
    shutil.copytree(compiler.kernels_dir(), copy)
    monkeypatch.setattr(compiler, "kernels_dir", lambda: copy)
    for cached in (compiler.source_files, compiler.source_hash):
        cached.cache_clear()
    yield copy
    for cached in (compiler.source_files, compiler.source_hash):
        cached.cache_clear()


def _hashes(sources):
    for cached in (compiler.source_files, compiler.source_hash):
        cached.cache_clear()
    return [compiler.source_hash(s) for s in sources]


def test_a_kernel_edit_renews_that_kernels_keys_only(kernel_copy):
    """The cache key hashes a spec's kernel file and the headers it includes: editing one
    kernel keeps the other kernels' cubins (a cubin pack built ahead stays good for them),
    a header renews every kernel that includes it, and a file no kernel includes none."""
    fwd, bwd, pre = "flash_fwd_sm90_ws.cu", "flash_bwd_sm90_ws.cu", "flash_bwd_pre.cu"
    assert "cf_sm90.cuh" in compiler.source_files(fwd)
    assert "cf_sm90.cuh" not in compiler.source_files(pre)
    before = _hashes([fwd, bwd, pre])
    with open(kernel_copy / bwd, "a") as out:
        out.write("\n// an edit\n")
    after_bwd = _hashes([fwd, bwd, pre])
    assert after_bwd[0] == before[0] and after_bwd[2] == before[2]
    assert after_bwd[1] != before[1]
    with open(kernel_copy / "cf_sm90.cuh", "a") as out:  # the Hopper kernels' header
        out.write("\n// an edit\n")
    after_header = _hashes([fwd, bwd, pre])
    assert after_header[0] != after_bwd[0] and after_header[1] != after_bwd[1]
    assert after_header[2] == before[2]
    (kernel_copy / "unused.cuh").write_text("// included by nothing\n")
    assert _hashes([fwd, bwd, pre]) == after_header
    opts = compiler.nvrtc_options(SPEC)
    assert f"-DCF_SOURCE_HASH=0x{compiler.source_hash(SPEC.source)}ULL" in opts
