"""CuPy's NVRTC for the test modules that compile kernels without a GPU."""

from __future__ import annotations

import os

import pytest


def require_nvrtc():
    """CuPy's nvrtc module; where it is not installed, the calling module is skipped, except
    on CI, which installs the cuda13 extra: there the check must never skip."""
    try:
        from cupy_backends.cuda.libs import nvrtc
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("CuPy's NVRTC is not installed (extra 'cuda13' or 'cuda12')",
                    allow_module_level=True)
    return nvrtc
