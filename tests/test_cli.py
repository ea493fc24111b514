"""``python -m cuflash`` on a CPU-only machine: help, version, arch choices, messages, progress.

The compile tests build a handful of specs only (``--dtype`` / ``--head-dim``); the full
matrix is tests/test_compile.py's.
"""

import subprocess
import sys
import types

import pytest

import cuflash
from cuflash import aot, cli, environment, specs


def _nvrtc_missing():
    return environment.nvrtc_unavailable_reason() is not None


def _run(*args, **kw):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                          **kw)


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for command in ("info", "check", "compile", "warmup", "bench"):
        assert command in out


def test_python_dash_m_without_a_command_prints_help():
    r = _run("-m", "cuflash")
    assert r.returncode == 0 and "usage: python -m cuflash" in r.stdout, r.stderr


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"cuflash {cuflash.__version__}"


def test_unknown_arch_lists_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["compile", "--arch", "sm_70"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'sm_70'" in err and "sm_75" in err and "sm_120" in err


def test_compile_without_cupy_says_what_to_install(monkeypatch, capsys):
    # import raises ImportError, also where an earlier test imported the real package
    for name in ("cupy_backends", "cupy_backends.cuda", "cupy_backends.cuda.libs",
                 "cupy_backends.cuda.libs.nvrtc"):
        monkeypatch.setitem(sys.modules, name, None)
    assert cli.main(["compile", "--arch", "sm_80"]) == 2
    err = capsys.readouterr().err
    assert "CuPy is not installed" in err and "cuflash[cuda13]" in err
    assert "Traceback" not in err


def test_compile_without_arch_or_gpu_asks_for_one(monkeypatch, capsys):
    if _nvrtc_missing():
        pytest.skip("CuPy's NVRTC is not installed")
    monkeypatch.setattr(environment, "gpu_unavailable_reason", lambda: "no GPU here")
    assert cli.main(["compile"]) == 2
    assert "give --arch" in capsys.readouterr().err


def test_warmup_without_gpu_says_why(monkeypatch, capsys):
    monkeypatch.setattr(environment, "gpu_unavailable_reason", lambda: "no NVIDIA driver")
    assert cli.main(["warmup"]) == 2
    assert "needs a usable GPU: no NVIDIA driver" in capsys.readouterr().err


def test_compile_a_few_specs_in_a_spawned_pool_with_progress():
    """Through ``python -m``: spawned workers re-import cuflash.__main__ and must not rerun it."""
    if _nvrtc_missing():
        pytest.skip("CuPy's NVRTC is not installed")
    r = _run("-m", "cuflash", "compile", "--arch", "sm_75", "--dtype", "float16",
             "--head-dim", "64", "-j", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    n = len(aot.compile_work(["sm_75"], False, ["float16"], [64]))
    assert f"compiling {n} specs for sm_75: {n}/{n}," in r.stderr  # the running count
    assert "zero spills" in r.stdout and len(r.stdout.splitlines()) == 1


def test_pools_are_spawned_not_forked(monkeypatch):
    seen = {}

    class Recorder:
        def __init__(self, max_workers, mp_context):
            seen["method"] = mp_context.get_start_method()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(aot, "ProcessPoolExecutor", Recorder)
    assert aot.run_parallel(len, [], 2, "nothing") == []
    assert seen["method"] == "spawn"


def test_progress_is_a_running_count_with_elapsed_time(capsys):
    progress = aot.Progress(3, "compiling 3 specs", every_s=0.0)
    for _ in range(3):
        progress.step()
    lines = capsys.readouterr().err.split("\r")
    assert [line.split(",")[0] for line in lines if line] == [
        "compiling 3 specs: 1/3", "compiling 3 specs: 2/3", "compiling 3 specs: 3/3"]
    assert lines[-1].rstrip().endswith(" s")


def test_selected_specs_filter_by_dtype_and_head_dim():
    chosen = aot.selected_specs(specs.facts_for_arch("sm_90"), ["float16"], [40, 64])
    assert {s.dtype for s in chosen} == {"float16"}
    assert {s.head_dim for s in chosen if s.kind != "bwd_pre"} == {64}
    # (the deterministic mode at head_dim 64 is bwd90's too: ordered dQ; bwd_dq stays for
    # windows)
    assert {s.kind for s in chosen} == {"fwd90", "bwd90", "bwd_dq", "bwd_pre"}


def test_info_is_fast_and_imports_no_framework():
    code = ("import sys, time; t = time.perf_counter(); from cuflash.cli import main; "
            "main(['info']); print('imported', sorted({'torch', 'jax'} & set(sys.modules)), "
            "round(time.perf_counter() - t, 2))")
    r = _run("-c", code)
    assert r.returncode == 0, r.stderr
    assert "imported []" in r.stdout
    assert "GPU" in r.stdout


def test_info_says_why_no_gpu_is_usable(monkeypatch, capsys):
    monkeypatch.setattr(environment, "gpu_unavailable_reason",
                        lambda: "no NVIDIA driver is installed (libcuda could not be loaded)")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "GPU: none usable: no NVIDIA driver is installed" in out
    assert "CPU arrays run the NumPy path" in out


# -- the reasons, with a stand-in for CuPy ------------------------------------------------------

def _fake_cupy(driver=13000, runtime=13020, count=1, cc="90"):
    def device_count():
        if isinstance(count, Exception):
            raise count
        return count

    rt = types.SimpleNamespace(driverGetVersion=lambda: driver,
                               runtimeGetVersion=lambda: runtime, getDeviceCount=device_count)
    device = types.SimpleNamespace(id=0, compute_capability=cc)
    return types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=rt, Device=lambda: device))


@pytest.mark.parametrize("fake, expected", [
    (dict(), None),
    (dict(cc="75"), None),
    (dict(cc="120"), None),
    (dict(driver=0), "no NVIDIA driver is installed"),
    (dict(driver=12040), "driver supports CUDA 12.4, but this CuPy is built for CUDA 13.2: "
                         "install the extra for your driver (cuflash[cuda12])"),
    (dict(count=0), "the driver sees no GPU"),
    (dict(count=RuntimeError("cudaErrorNoDevice")), "cudaErrorNoDevice"),
    (dict(cc="70"), "GPU 0: sm_70 is older than Turing"),
])
def test_gpu_unavailable_reason(monkeypatch, fake, expected):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(**fake))
    reason = environment.gpu_unavailable_reason()
    assert reason is None if expected is None else expected in reason


def test_gpu_reason_without_cupy_says_cpu_needs_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    reason = environment.gpu_unavailable_reason()
    assert "CuPy is not installed (CPU arrays need none)" in reason


def test_installed_version_reads_metadata_without_importing():
    assert environment.installed_version("numpy") is not None
    assert environment.installed_version("surely-not-a-package") is None


def test_bench_runs_the_source_tree_sweep(capsys):
    """``bench`` runs bench/attention_sweep.py from a checkout (--help needs no GPU or torch)."""
    assert cli.bench_dir() is not None
    assert cli.main(["bench", "--help"]) == 0
    assert "python bench/attention_sweep.py" in capsys.readouterr().out


def test_bench_outside_a_checkout_says_where_the_benchmark_is(monkeypatch, capsys):
    monkeypatch.setattr(cli, "bench_dir", lambda: None)
    assert cli.main(["bench", "--quick"]) == 2
    assert "ships with the source tree only" in capsys.readouterr().err
