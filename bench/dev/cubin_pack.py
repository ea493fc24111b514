"""Build kernels on this machine into a cubin cache to carry to the GPU machine, so its test
calls spend their minutes on tests instead of NVRTC (session 30: most of a GPU test file's
time was compiling; the whole suite no longer fits a session's device time).

    CUPY_CACHE_DIR=$PWD/.cubin_cache python bench/dev/cubin_pack.py --selection \
        --tests tests/test_gpu_*.py tests/test_edges_gpu.py --archive .cubin_pack.tar.xz -j 2

then `carry: [".cubin_pack.tar.xz"]`: bench/gpu_suite.sh unpacks it into .cubin_cache (where
no such folder came) and points CUPY_CACHE_DIR there. xz keeps about a twelfth: the whole
suite's 3,749 cubins, 204 MiB, in 16.6 MiB (session 33; about 30 minutes to build on two
cores, 4 to pack). Without `--archive` the folder itself is the pack, up to `--budget-mib`
(default 48: the device tool sends 64 MiB in all, the tracked tree's 11 MiB included), for
`carry: [".cubin_cache"]`; `--shard k/M` adds a GPU test shard's files (tests/conftest.py).

What it builds: with `--selection` every spec the selector can pick on sm_90
(`cuflash.aot.compile_work`, what `python -m cuflash compile` builds: most GPU tests compile
from it), then every spec the named GPU test modules compile ahead (their `_module_specs`,
planned for an H100 / H200: sm_90, 232,448 bytes of shared memory, 132 SMs). Each through
`compiler._nvrtc_cubin`, the runtime's own cache path and key, so the device reads them as
its own entries; entries already in the folder are kept, so a rebuild after a registry
change compiles only the new specs.

The key includes NVRTC's version and the hash of the spec's kernel file and the headers it
includes (compiler.source_hash): build with the device's NVRTC (the image's is 13.0:
`python -m cuflash info` there; here `pip install nvidia-cuda-nvrtc==13.0.88` in a separate
venv), and rebuild after a kernel change: the kernels whose file or headers changed get new
keys, the rest keep theirs (a header shared by all, such as cf_common.cuh, renews every
entry). A miss only costs the compile it would have cost anyway; gpu_suite.sh logs each
(logs/compiles.txt, CUFLASH_COMPILE_LOG).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
H100 = dict(name="NVIDIA H100 80GB HBM3", arch="sm_90", sm_count=132, smem_optin=232448)


def module_specs(test_files: list[str]) -> list:
    """The specs each test module compiles ahead, planned as on an H100 / H200."""
    from cuflash import launch, specs

    facts = specs.DeviceFacts(**H100)
    launch.device_facts = lambda device_id=0: facts  # no GPU here: the planner asks for one
    sys.path.insert(0, str(ROOT / "tests"))
    out = []
    for path in test_files:
        try:
            module = importlib.import_module(Path(path).stem)
        except BaseException as exc:  # pytest.importorskip's Skipped is a BaseException
            if isinstance(exc, KeyboardInterrupt):
                raise
            print(f"{path}: not imported ({type(exc).__name__}: {str(exc)[:80]})", flush=True)
            continue
        build = getattr(module, "_module_specs", None)
        if build is None:
            print(f"{path}: no _module_specs (compiles at first use)", flush=True)
            continue
        found = [s for s in build() if s is not None]
        print(f"{path}: {len(found)} specs", flush=True)
        out += found
    return out


def shard_files(shard: str) -> list[str]:
    """The test files of GPU test shard ``shard`` ("k/M"), by pytest's own collection."""
    import subprocess

    listing = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only", "-q",
         "-p", "no:cacheprovider", "tests"], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "CUFLASH_TEST_SHARD": shard}).stdout
    return list(dict.fromkeys(line.split("::")[0] for line in listing.splitlines()
                              if "::" in line))


def selection_specs() -> list:
    from cuflash import aot

    work = aot.compile_work(["sm_90"], all_budgets=False)
    for flag in ("varlen", "block_sparse", "dropout", "device_rng"):
        work += aot.compile_work(["sm_90"], all_budgets=False, **{flag: True})
    return [spec for spec, _ in work]


def build_one(spec) -> tuple[str, int, str, str]:
    """Build (or find) one spec's cubin: its name, size, error if any, and cache file name."""
    from cuflash import compiler, specs

    arch = specs.compile_arch(spec, "sm_90")
    entry = compiler.cubin_entry(spec, arch)[1].name
    try:
        cubin = compiler._nvrtc_cubin(spec, arch)
        return spec.name, len(cubin), "", entry
    except Exception as exc:  # a spec that does not compile is the tests' to report
        return spec.name, 0, f"{type(exc).__name__}: {str(exc)[:200]}", entry


def folder_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.cubin")) / 2 ** 20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tests", nargs="*", default=[], help="GPU test modules")
    ap.add_argument("--shard", default=None, help="a GPU test shard's files too (k/M)")
    ap.add_argument("--selection", action="store_true", help="every spec the selector picks")
    ap.add_argument("--budget-mib", type=float, default=48.0)
    ap.add_argument("-j", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--archive", default=None,
                    help="then write the folder's cubins into this .tar.xz (no budget then)")
    args = ap.parse_args()
    if "CUPY_CACHE_DIR" not in os.environ:
        raise SystemExit("CUPY_CACHE_DIR: expected the folder to build into (e.g. .cubin_cache)")
    folder = Path(os.environ["CUPY_CACHE_DIR"])
    folder.mkdir(parents=True, exist_ok=True)
    from cupy_backends.cuda.libs import nvrtc

    print(f"NVRTC {nvrtc.getVersion()} into {folder}", flush=True)
    files = args.tests + (shard_files(args.shard) if args.shard else [])
    # the selection first: most GPU tests (those without _module_specs) compile from it
    todo = (selection_specs() if args.selection else []) + module_specs(
        list(dict.fromkeys(files)))
    unique = list({spec.name: spec for spec in todo}.values())
    print(f"{len(unique)} specs to build", flush=True)
    built = failed = 0
    entries = set()  # this build's cache files: the archive leaves older keys out
    with ProcessPoolExecutor(args.j) as pool:
        step = 4 * args.j  # in batches, so the budget is checked as the folder grows
        for start in range(0, len(unique), step):
            if not args.archive and folder_mib(folder) >= args.budget_mib:
                print(f"budget of {args.budget_mib} MiB reached: {len(unique) - start} specs "
                      f"left to the device", flush=True)
                break
            for name, size, error, entry in pool.map(build_one, unique[start:start + step]):
                entries.add(entry)
                built += not error
                failed += bool(error)
                if error:
                    print(f"  {name}: {error}", flush=True)
            print(f"{min(start + step, len(unique))}/{len(unique)}, "
                  f"{folder_mib(folder):.1f} MiB", flush=True)
    print(f"built {built}, failed {failed}; {folder_mib(folder):.1f} MiB in {folder}")
    if args.archive:
        write_archive(folder, Path(args.archive), entries)
    return 0


def write_archive(folder: Path, archive: Path, entries: set[str]) -> None:
    """The folder's cubins of this build (``entries``: not those an older source left
    behind), flat, into an xz tar (gpu_suite.sh unpacks it on the device)."""
    import tarfile

    everything = sorted(folder.glob("*.cubin"))
    cubins = [path for path in everything if path.name in entries]
    if len(cubins) < len(everything):
        print(f"{len(everything) - len(cubins)} cubins of older sources left out", flush=True)
    partial = archive.with_name(archive.name + ".partial")
    with tarfile.open(partial, "w:xz", preset=6) as tar:
        for path in cubins:
            tar.add(path, arcname=path.name)
    partial.replace(archive)
    mib = sum(path.stat().st_size for path in cubins) / 2 ** 20
    print(f"{len(cubins)} cubins, {mib:.1f} MiB, into {archive} "
          f"({archive.stat().st_size / 2 ** 20:.1f} MiB)", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
