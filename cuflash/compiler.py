"""From a ``KernelSpec`` to compiled code: NVRTC options, CuPy modules, resource reports.

Two consumers: ``get_kernel`` loads one module per (spec, device), memoized and backed by a
cubin cache on disk; ``compile_report`` runs NVRTC directly for any architecture, no GPU
needed, and parses ptxas' register / spill / shared-memory report.

The cubin cache is shared by every process on a machine: each entry is compiled by one
process while the others wait on its lock (pytest-xdist workers all precompiling the same
specs compiled each one once per worker before), and its key leaves out where the sources
live, so a cache built from one checkout serves another of the same sources.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import struct
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .constants import SMEM_FLOOR
from .specs import KernelSpec, compile_arch, forced_arch


@lru_cache(maxsize=1)
def kernels_dir() -> Path:
    """``kernels_cu/``: inside the installed package, or beside it in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "kernels_cu", here.parent / "kernels_cu"):
        if (candidate / "cf_common.cuh").is_file():
            return candidate
    raise FileNotFoundError(f"kernels_cu/ not found next to {here}; the installation is broken")


_INCLUDE = re.compile(rb'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)


@lru_cache(maxsize=None)
def source_files(source: str) -> tuple[str, ...]:
    """``source`` and every kernels_cu/ file it includes, directly or through a header,
    sorted: every quoted include, whatever #if surrounds it (a superset is only a key)."""
    seen, todo = set(), [source]
    while todo:
        name = todo.pop()
        if name in seen or not (kernels_dir() / name).is_file():
            continue
        seen.add(name)
        todo += [m.decode() for m in _INCLUDE.findall((kernels_dir() / name).read_bytes())]
    return tuple(sorted(seen))


@lru_cache(maxsize=None)
def source_hash(source: str) -> str:
    """Hash of the kernel file ``source`` and the headers it includes: its cache keys change
    when any of them does, and only then (an edit to one kernel keeps the others' cubins,
    and a cubin pack built ahead stays good for them)."""
    h = hashlib.sha256()
    for name in source_files(source):
        h.update(name.encode())
        h.update((kernels_dir() / name).read_bytes())
    return h.hexdigest()[:16]


def read_source(spec: KernelSpec) -> str:
    return (kernels_dir() / spec.source).read_text()


def nvrtc_options(spec: KernelSpec) -> list[str]:
    """Compile options shared by the runtime build and the ahead-of-time report."""
    opts = ["--std=c++17", f"-I{kernels_dir()}",
            f"-DCF_SOURCE_HASH=0x{source_hash(spec.source)}ULL"]
    opts += [f"-D{k}={v}" for k, v in spec.defines.items()]
    return opts


# -- runtime: one CuPy module per (spec, device) ---------------------------------------------

@dataclass
class LoadedKernel:
    function: object  # cupy.RawKernel, or cupy.cuda.function.Function (arch-specific)
    seconds: float  # wall time of the first get (compile, or disk-cache hit)
    module: object = None  # keeps the module that owns ``function`` loaded


_loaded: dict[tuple[str, int], LoadedKernel] = {}


def get_kernel(spec: KernelSpec, device_id: int) -> LoadedKernel:
    """The spec's entry point on this device, compiled on first use."""
    key = (spec.name, device_id, forced_arch())  # a forced arch loads other code
    hit = _loaded.get(key)
    if hit is not None:
        return hit
    import cupy

    start = time.perf_counter()
    with cupy.cuda.Device(device_id):
        arch = f"sm_{cupy.cuda.Device(device_id).compute_capability}"
        target = compile_arch(spec, arch)
        if forced_arch() not in (None, arch):  # planned as an older GPU: its PTX, JIT-compiled
            module, function = _load_module(spec, _nvrtc_ptx(spec, forced_arch()))
        elif target != arch or _nvrtc_targets(arch):  # sm_90a, or an arch NVRTC knows
            module, function = _load_module(spec, _nvrtc_cubin(spec, target))
        else:  # a GPU newer than this NVRTC: CuPy's module compiles the newest PTX it can
            module = cupy.RawModule(code=read_source(spec), options=tuple(nvrtc_options(spec)),
                                    backend="nvrtc")
            function = module.get_function(spec.entry)
            if spec.smem_bytes > SMEM_FLOOR:  # above it the kernel must opt in
                function.max_dynamic_shared_size_bytes = spec.smem_bytes
        if spec.kind == "bwd_pre":  # the module's second kernel, loaded with the first
            convert = module.get_function("flash_bwd_dq_convert")
            _loaded[(spec.name + ":convert", device_id, forced_arch())] = \
                LoadedKernel(convert, 0.0)
    loaded = LoadedKernel(function, time.perf_counter() - start, module)
    _loaded[key] = loaded
    return loaded


@lru_cache(maxsize=None)
def _nvrtc_targets(arch: str) -> bool:
    """Whether the loaded NVRTC can build a cubin for ``arch`` ("sm_90")."""
    from cupy_backends.cuda.libs import nvrtc

    return int(arch[3:]) in nvrtc.getSupportedArchs()


def cubin_entry(spec: KernelSpec, arch: str) -> tuple[list[str], Path]:
    """The NVRTC options of ``spec``'s cubin for ``arch`` and its place in the cache (the
    loaded NVRTC's version in its key)."""
    from cupy_backends.cuda.libs import nvrtc

    opts = nvrtc_options(spec) + [f"--gpu-architecture={arch}", "-ftz=true"]
    return opts, cubin_cache_path(spec, arch, opts, nvrtc.getVersion())


def _nvrtc_cubin(spec: KernelSpec, arch: str) -> bytes:
    """NVRTC straight to a cubin for ``arch`` ("sm_90", "sm_90a"), cached on disk.

    Every kernel goes this way (CuPy's RawModule appends its own ``-arch`` and cannot build
    arch-specific ``sm_90a`` code, which wgmma needs); the options mirror CuPy's
    (``-ftz=true``). One process compiles an entry; others wanting it wait for its lock.
    """
    opts, path = cubin_entry(spec, arch)
    cubin = read_cached_cubin(path)
    if cubin is None:
        with _entry_lock(path):
            cubin = read_cached_cubin(path)  # built by another process while this one waited
            if cubin is None:
                started = time.perf_counter()
                _, cubin = _nvrtc_compile(spec, arch, opts)
                write_cached_cubin(path, cubin)
                _log_compile(spec, arch, time.perf_counter() - started)
    return cubin


def _log_compile(spec: KernelSpec, arch: str, seconds: float) -> None:
    """One line per NVRTC build (a cache miss) to the file CUFLASH_COMPILE_LOG names, if
    any: where a GPU test run's time went when a cubin pack was carried (bench/gpu_suite.sh
    sets it)."""
    log = os.environ.get("CUFLASH_COMPILE_LOG")
    if not log:
        return
    try:
        with open(log, "a") as out:
            out.write(f"{seconds:7.1f} s  pid {os.getpid()}  {spec.name}  {arch}\n")
    except OSError:
        pass  # a diagnostic: never the reason a compile fails


def cubin_cache_path(spec: KernelSpec, arch: str, opts: list[str], nvrtc_version) -> Path:
    """Where the cubin of ``spec`` for ``arch``, built with ``opts`` by NVRTC
    ``nvrtc_version`` ((major, minor)), is kept. The include path is left out of the key:
    ``CF_SOURCE_HASH`` (in ``opts``) already names the contents of every header it reads."""
    keyed = [o for o in opts if not o.startswith("-I")]
    key = hashlib.sha256("\0".join([read_source(spec), *keyed,
                                    str(tuple(nvrtc_version))]).encode())
    cache_dir = Path(os.environ.get("CUPY_CACHE_DIR", Path.home() / ".cupy" / "kernel_cache"))
    return cache_dir / f"cuflash_{spec.name}_{arch}_{key.hexdigest()[:24]}.cubin"


class _entry_lock:
    """An exclusive ``flock`` on ``cuflash_locks/<entry>.lock`` in the cache directory, for
    one compile (lock files stay: removing one would race with a process about to lock it).

    ``flock`` belongs to the open file, so threads of one process exclude each other too.
    Where the lock file cannot be made (a read-only or missing cache directory) nothing is
    locked: the cost is a duplicate compile, as before locks.
    """

    def __init__(self, path: Path):
        self.path = path.parent / "cuflash_locks" / (path.name + ".lock")
        self.fd = None

    def __enter__(self):
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError:
            if self.fd is not None:
                os.close(self.fd)
            self.fd = None
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing the file releases its lock
        return False


# A cached cubin is this header, then the cubin: a half-written or damaged file (another
# process or thread writing, a full disk, a crash) reads as a miss, never as code to load.
_CACHE_MAGIC = b"cuflash-cubin-v1"
_CACHE_HEADER = struct.Struct(f"<{len(_CACHE_MAGIC)}sQ32s")  # magic, size, sha256


def read_cached_cubin(path: Path) -> bytes | None:
    """The cubin stored at ``path``, or None when absent, unreadable or failing its check."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if len(data) < _CACHE_HEADER.size:
        return None
    magic, size, digest = _CACHE_HEADER.unpack_from(data)
    cubin = data[_CACHE_HEADER.size:]
    if magic != _CACHE_MAGIC or size != len(cubin) or hashlib.sha256(cubin).digest() != digest:
        return None
    return cubin


def write_cached_cubin(path: Path, cubin: bytes) -> None:
    """Store ``cubin`` at ``path`` atomically: a temporary file of its own in the same
    directory (unique per writer, threads included), then a rename over ``path``."""
    header = _CACHE_HEADER.pack(_CACHE_MAGIC, len(cubin), hashlib.sha256(cubin).digest())
    try:  # a cache that cannot be written only costs a recompile next time
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(header + cubin)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass


def _nvrtc_compile(spec: KernelSpec, arch: str, opts: list[str],
                   ptx: bool = False) -> tuple[str, bytes]:
    """One NVRTC compilation of ``spec``'s source -> (log, cubin), or (log, PTX) for a virtual
    target (``ptx=True``); a failure raises with the log."""
    from cupy_backends.cuda.libs import nvrtc

    program = nvrtc.createProgram(read_source(spec), spec.source, [], [])
    try:
        try:
            nvrtc.compileProgram(program, opts)
        except Exception as exc:
            raise RuntimeError(f"{spec.name} for {arch} failed to compile:\n"
                               f"{nvrtc.getProgramLog(program)}") from exc
        image = nvrtc.getPTX(program) if ptx else nvrtc.getCUBIN(program)
        return nvrtc.getProgramLog(program), image if isinstance(image, bytes) else image.encode()
    finally:
        nvrtc.destroyProgram(program)


def _load_module(spec: KernelSpec, image: bytes):
    """(module, function) for a cubin or PTX image of ``spec``, opted in to its shared memory."""
    from cupy.cuda import function as cuda_function
    from cupy_backends.cuda.api import driver

    module = cuda_function.Module()
    module.load(image)
    function = module.get_function(spec.entry)
    if spec.smem_bytes > SMEM_FLOOR:  # above it the kernel must opt in
        driver.funcSetAttribute(function.ptr,
                                driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                spec.smem_bytes)
    return module, function


def _nvrtc_ptx(spec: KernelSpec, arch: str) -> bytes:
    """NVRTC to PTX for ``arch``'s virtual target (sm_75 -> compute_75), not cached.

    For ``CUFLASH_FORCE_ARCH``: the driver JIT-compiles this PTX for the GPU that is present,
    so an H200 runs exactly the code a Turing GPU would (CF_TURING and all).
    """
    target = f"compute_{arch[3:]}"
    opts = nvrtc_options(spec) + [f"--gpu-architecture={target}", "-ftz=true"]
    return _nvrtc_compile(spec, target, opts, ptx=True)[1]


def get_convert_kernel(spec: KernelSpec, device_id: int) -> LoadedKernel:
    """``flash_bwd_dq_convert``, which lives in the preprocess module."""
    get_kernel(spec, device_id)
    return _loaded[(spec.name + ":convert", device_id, forced_arch())]


# -- ahead of time: NVRTC for any arch, no GPU ------------------------------------------------

@dataclass(frozen=True)
class CompileReport:
    spec: str
    arch: str
    function: str
    registers: int
    stack_bytes: int
    spill_stores: int
    spill_loads: int
    static_smem: int
    dynamic_smem: int
    seconds: float

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


_FUNC_RE = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_STACK_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS_RE = re.compile(r"Used (\d+) registers")
_SMEM_RE = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict[str, dict[str, int]]:
    """ptxas -v output -> {function: {registers, stack, spill_stores, spill_loads, smem}}."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        if (m := _FUNC_RE.search(line)):
            current = out.setdefault(m.group(1), dict(registers=0, stack=0, spill_stores=0,
                                                      spill_loads=0, smem=0))
        elif current is not None and (m := _STACK_RE.search(line)):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                           spill_loads=int(m.group(3)))
        elif current is not None and (m := _REGS_RE.search(line)):
            current["registers"] = int(m.group(1))
            if (s := _SMEM_RE.search(line)):
                current["smem"] = int(s.group(1))
    return out


def compile_report(spec: KernelSpec, arch: str) -> list[CompileReport]:
    """Compile ``spec`` for ``arch`` (e.g. "sm_90") with NVRTC and report each kernel."""
    start = time.perf_counter()
    opts = nvrtc_options(spec) + [f"--gpu-architecture={compile_arch(spec, arch)}",
                                  "--ptxas-options=-v"]
    log, _ = _nvrtc_compile(spec, arch, opts)
    seconds = time.perf_counter() - start
    return [CompileReport(spec=spec.name, arch=arch, function=fn, registers=r["registers"],
                          stack_bytes=r["stack"], spill_stores=r["spill_stores"],
                          spill_loads=r["spill_loads"], static_smem=r["smem"],
                          dynamic_smem=spec.smem_bytes, seconds=seconds)
            for fn, r in parse_ptxas_log(log).items()]
