"""A stand-in for a framework's CUDA arrays on the CPU: the host-path tests run
``cuflash.fastpath`` / ``cuflash.decode``'s CUDA code with NumPy arrays, their host addresses
for device addresses, and the launches recorded instead of run."""

from __future__ import annotations

import contextlib

import numpy as np

from cuflash import launch


class NumpyBackend:
    """fastpath's Backend duck type over host arrays (addresses are host addresses)."""

    float32, uint8 = np.float32, np.uint8

    def layout(self, a):
        return (a.shape, a.strides, a.dtype, 0)

    def operand(self, a):
        item = a.itemsize
        return launch.Operand(a.ctypes.data, *(s // item for s in a.strides[:3]), item)

    def ptr(self, a):
        return a.ctypes.data

    def empty(self, shape, dtype, like):
        return np.empty(shape, dtype=dtype or like.dtype)

    def empty_stats(self, shape, like):
        both = np.empty((2, *shape), dtype=np.float32)  # one allocation, as CuPy's backend
        return both[0], both[1]

    def fill(self, a, value):
        a.fill(value)

    def poison(self, a):
        a.fill(np.nan)

    def device_index(self, a):
        return 0

    def stream(self):
        return 1234

    def on_device(self, index):
        return contextlib.nullcontext()
