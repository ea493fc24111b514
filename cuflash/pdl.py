"""Programmatic dependent launch (Hopper and newer): ``cuLaunchKernelEx`` through ctypes.

A kernel launched with ``CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`` may start
while the kernel before it on the stream still runs: once every block of that kernel has
executed ``griddepcontrol.launch_dependents`` (or ended), the dependent grid's blocks are
scheduled as SMs free up, and each waits at its ``griddepcontrol.wait`` until the kernel
before has ended and its writes are visible (kernels_cu/cf_common.cuh's ``pdl_*``). What is
saved is the dependent kernel's launch latency and its blocks' start-up, a few microseconds:
it matters where a short kernel follows a long one (decode's combine after its split). A
dependent launch of a kernel that does not wait is a race, so only kernels built to wait are
launched this way.

CuPy's driver module has ``launchKernel`` only; the structs below mirror cuda.h (CUDA 12 / 13):
``CUlaunchAttribute`` is an id, padding to 8 bytes, and a 64-byte value union;
``CUlaunchConfig`` the grid, the block, the dynamic shared memory, the stream and the
attributes. ``tests/test_pdl.py`` checks the layouts against those sizes.
"""

from __future__ import annotations

import ctypes
import threading

PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CUlaunchAttributeID


class LaunchAttribute(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4),
                ("value", ctypes.c_int),  # the union's first int (the allowed flag here)
                ("value_rest", ctypes.c_char * 60)]


class LaunchConfig(ctypes.Structure):
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint),
                ("gridDimZ", ctypes.c_uint), ("blockDimX", ctypes.c_uint),
                ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(LaunchAttribute)), ("numAttrs", ctypes.c_uint)]


class _Config(threading.local):
    """Each thread's config and attribute, reused by every dependent launch of the thread
    (the driver reads them during the call)."""

    def __init__(self):
        self.attribute = LaunchAttribute(id=PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
        self.config = LaunchConfig(blockDimY=1, blockDimZ=1, numAttrs=1,
                                   attrs=ctypes.pointer(self.attribute))
        self.address = ctypes.addressof(self.config)


_config = _Config()
_launch_ex = None


def _driver_launch_ex():
    global _launch_ex
    if _launch_ex is None:
        fn = ctypes.CDLL("libcuda.so.1").cuLaunchKernelEx  # the driver CuPy already loaded
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        fn.restype = ctypes.c_int
        _launch_ex = fn
    return _launch_ex


def launch(function: int, grid: tuple, threads: int, smem: int, stream: int,
           extra_address: int) -> int:
    """``cuLaunchKernelEx`` of CUfunction ``function`` as a programmatic dependent of the
    stream's previous kernel, its parameters given by the ``extra`` array at
    ``extra_address`` (launch.py's parameter buffer). Returns the driver's CUresult."""
    config = _config.config
    config.gridDimX, config.gridDimY, config.gridDimZ = grid
    config.blockDimX, config.sharedMemBytes, config.hStream = threads, smem, stream or None
    return _driver_launch_ex()(_config.address, function, None, extra_address)
