"""cuflash: exact FlashAttention forward and backward for any DLPack array.

CUDA arrays (CuPy, PyTorch, JAX) run tensor-core kernels compiled at first use by NVRTC
through CuPy; CPU arrays (NumPy, PyTorch, JAX) run a blockwise NumPy implementation of the
same algorithm. Results come back in the caller's own array type, zero-copy.
"""

from .api import attention, attention_backward, attention_forward
from .decode import attention_with_kvcache  # decoding against a K/V cache (issue #16)
from .merge import merge_attention
from .stats import SoftmaxStats
from .varlen import (VarlenStats, attention_varlen, attention_varlen_backward,  # issue #14
                     attention_varlen_forward)

__version__ = "0.1.0"

__all__ = [
    "SoftmaxStats",
    "VarlenStats",
    "attention",
    "attention_backward",
    "attention_forward",
    "attention_varlen",
    "attention_varlen_backward",
    "attention_varlen_forward",
    "attention_with_kvcache",
    "merge_attention",
    "__version__",
]
