"""What this machine offers cuflash: installed packages, NVRTC, a usable GPU or why not.

Nothing here imports a framework: versions come from package metadata, so ``python -m
cuflash info`` stays fast. Each ``*_reason`` function returns None when all is well, else one
sentence a user can act on (which extra to install, which driver is missing).
"""

from __future__ import annotations

import os
from importlib import metadata

# Distributions that provide each module, in the order they are looked up.
_DISTRIBUTIONS = {
    "cupy": ("cupy-cuda13x", "cupy-cuda12x", "cupy"),
    "torch": ("torch",),
    "jax": ("jax",),
}

_INSTALL_HINT = ("pip install 'cuflash[cuda13]' (NVIDIA driver 580 or newer) or "
                 "'cuflash[cuda12]' (driver 525 or newer)")


def installed_version(module: str) -> str | None:
    """``module``'s installed version from package metadata (no import), None if absent."""
    for dist in _DISTRIBUTIONS.get(module, (module,)):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def nvrtc_unavailable_reason() -> str | None:
    """Why kernels cannot be compiled here (no GPU needed to compile), or None."""
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()  # loads libnvrtc
    except ImportError:
        return f"CuPy is not installed, and kernels are compiled with its NVRTC: {_INSTALL_HINT}"
    except Exception as exc:  # CuPy present, libnvrtc missing or broken
        return (f"CuPy cannot load NVRTC ({type(exc).__name__}: {exc}); the cuda13 / cuda12 "
                f"extras install it from PyPI: {_INSTALL_HINT}")
    return None


def gpu_unavailable_reason() -> str | None:
    """None when cuflash can run on CuPy's current device, else why not."""
    try:
        import cupy
    except ImportError:
        return f"CuPy is not installed (CPU arrays need none): {_INSTALL_HINT}"
    except Exception as exc:
        return f"CuPy failed to import ({type(exc).__name__}: {exc})"
    runtime = cupy.cuda.runtime
    try:
        driver, built_for = runtime.driverGetVersion(), runtime.runtimeGetVersion()
    except Exception as exc:
        return f"the CUDA driver could not be queried ({type(exc).__name__}: {exc})"
    if driver == 0:
        return "no NVIDIA driver is installed (libcuda could not be loaded)"
    if driver // 1000 < built_for // 1000:
        return (f"the NVIDIA driver supports CUDA {_cuda(driver)}, but this CuPy is built for "
                f"CUDA {_cuda(built_for)}: install the extra for your driver "
                f"(cuflash[cuda{driver // 1000}]) or a newer driver")
    try:
        count = runtime.getDeviceCount()
    except Exception as exc:
        return f"the driver reports an error ({type(exc).__name__}: {exc})"
    if count == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return "the driver sees no GPU" + (
            f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")
    return _device_reason(cupy.cuda.Device())


def _device_reason(device) -> str | None:
    from . import specs

    reason = specs.arch_unsupported_reason(f"sm_{device.compute_capability}")
    return f"GPU {device.id}: {reason}" if reason else None


def _cuda(version: int) -> str:
    """CUDA's integer version (12040) as "12.4"."""
    return f"{version // 1000}.{version % 1000 // 10}"


def kernel_cache_dir() -> str:
    """Where compiled kernels are kept: cuflash's cubins, in CuPy's cache directory."""
    # CuPy's documented default; CuPy 14 no longer exposes a getter for it.
    return os.environ.get("CUPY_CACHE_DIR", os.path.expanduser("~/.cupy/kernel_cache"))
