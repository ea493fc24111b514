"""cuflash as an attention implementation of Hugging Face transformers (issue #14;
the decode route, issue #16).

    import cuflash.transformers  # registers the implementation "cufa"
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="cufa")

Importing this module registers ``ATTN_IMPLEMENTATION`` with transformers' ``AttentionInterface``
(the attention function) and ``AttentionMaskInterface`` (the mask the model builds for it).
The name has no "flash" in it: transformers 5 takes any implementation name containing
"flash" for a request of the flash-attn package (or a hub kernel) and tries to load that.

The mask is FlashAttention's: the model hands us the 2-D padding mask (batch, kv_len), True
for real tokens, or None when nothing is padded; causal, sliding windows, soft-capping and
sinks come from the arguments. Each call takes one of these routes (``choose_route``):

* padding (or packed sequences, found from ``position_ids`` or given as ``cu_seq_lens_*``):
  the valid tokens are gathered into FlashAttention-2's packed varlen layout, attended with
  ``cuflash.torch.flash_attention_varlen`` and scattered back (padded query rows get 0);
* decoding (no padding, at most ``DECODE_MAX_Q_LEN`` queries against more keys than
  queries, i.e. a K/V cache, no sinks, nothing that needs a gradient):
  ``cuflash.torch.attention_with_kvcache``, the split-KV decode kernel (docs/decode.md),
  reading transformers' (batch, heads_kv, seq, head_dim) cache in place;
* no padding and no score modifier: ``cuflash.torch.flash_attention`` (dense; CUDA kernels);
* a sliding window, soft-capping or sinks without padding: the varlen call with one
  sequence per batch row (the dense torch function does not take the modifiers here yet).

Causal masks align bottom-right per sequence, which is transformers' alignment when the
queries are the last tokens (prefill and decoding, left padding, right padding without a
cache). GQA runs without repeating K and V. Attention dropout (training with
``config.attention_dropout``) runs on the dense route, or with padding or packed sequences
on the varlen route (each sequence dropped as its batch row of a dense call), the mask
drawn from torch's generator (docs/dropout.md).

Where it runs: every route on CPU and CUDA tensors (the varlen route on CUDA runs the
kernels compiled with CF_VARLEN, docs/varlen.md; the decode route on the CPU runs the
NumPy mirror of the decode kernel, cuflash/decode_cpu.py).
"""

from __future__ import annotations

import weakref

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from . import decode, fastpath
from .decode_checks import MAX_Q_LEN
from .torch import attention_with_kvcache, flash_attention, flash_attention_varlen

__all__ = ["ATTN_IMPLEMENTATION", "DECODE_MAX_Q_LEN", "attention_forward", "choose_route",
           "register"]

ATTN_IMPLEMENTATION = "cufa"
# Queries per call that take the decode kernel: all it takes (decode_checks.MAX_Q_LEN, a
# generation step or a speculative-decoding check of up to 8 drafted tokens). The kernel
# packs q_len x group query rows per kv head into one block (up to 64 rows with tensor
# cores, 32 at head_dim 256; docs/decode.md), so Llama-style groups of 4-8 at q_len 8
# still read K/V once; more rows take several row tiles, each re-reading the key range,
# which is still no more than the dense kernel reads (one block per query head, each
# reading its kv head's K/V). Longer queries (prefill, chunked prefill) take the dense
# kernels. Read at call time, so a benchmark can set it to 0 to time the dense route.
DECODE_MAX_Q_LEN = MAX_Q_LEN


def _window(sliding_window, causal: bool):
    """transformers' sliding window of n tokens (a query sees itself and the n - 1 before
    it, as its sdpa mask ``q - n < k <= q``) as cuflash's (left, right)."""
    if sliding_window is None:
        return None
    left = int(sliding_window) - 1
    return (left, -1 if causal else left)


def _check_supported(kwargs) -> None:
    if kwargs.get("output_attentions"):
        raise ValueError("output_attentions: cuflash never forms the attention matrix; use "
                         "attn_implementation='eager' to get attention weights")


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None,
                      dropout: float = 0.0, scaling: float | None = None,
                      sliding_window: int | None = None, softcap: float | None = None,
                      is_causal: bool | None = None, s_aux: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, **kwargs):
    """transformers' attention-function signature: query (batch, heads, seqlen_q,
    head_dim), key and value (batch, heads_kv, seqlen_k, head_dim), attention_mask the 2-D
    padding mask or None. Returns (output (batch, seqlen_q, heads, head_dim), None)."""
    _check_supported(kwargs)
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"attention_mask: expected the 2-D padding mask (batch, kv_len) that "
                         f"the '{ATTN_IMPLEMENTATION}' mask function builds, got shape "
                         f"{tuple(attention_mask.shape)}")
    causal = bool(module.is_causal if is_causal is None else is_causal)
    options = dict(causal=causal, softmax_scale=scaling,
                   window=_window(sliding_window, causal), softcap=softcap or None,
                   sinks=None if s_aux is None else s_aux.float())
    # (batch, seqlen, heads, d) views, no copy: transformers' caches are (batch, heads_kv,
    # seq, d), so head_dim stays contiguous, which is all cuflash asks of the strides
    # (interop._check_last_axis; decode._operands passes the other three strides
    # to the kernel, and check_alignment wants them 16-byte multiples: head_dim % 8 == 0).
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    packed = None if attention_mask is not None else _packed_offsets(q, k, position_ids, kwargs)
    if dropout:  # transformers passes 0.0 outside training
        options = dict(options, dropout_p=dropout)
        if attention_mask is not None:
            return _padded(q, k, v, attention_mask.bool(), options), None
        if packed is not None:
            return _varlen(q, k, v, *packed, options), None
        return flash_attention(q, k, v, **options), None
    route = choose_route(
        padded=attention_mask is not None, packed=packed is not None, seqlen_q=q.shape[1],
        seqlen_k=k.shape[1], same_head_dims=k.shape == v.shape, sinks=s_aux is not None,
        modifiers=options["window"] is not None or options["softcap"] is not None,
        needs_grad=any(x.requires_grad for x in (q, k, v)))
    if route == "padded":
        return _padded(q, k, v, attention_mask.bool(), options), None
    if route == "packed":
        return _varlen(q, k, v, *packed, options), None
    if route == "decode":
        return _decode(q, k, v, causal, scaling, options["window"], options["softcap"]), None
    if route == "dense":
        return flash_attention(q, k, v, causal=causal, softmax_scale=scaling), None
    batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
    rows = torch.arange(batch + 1, dtype=torch.int32, device=q.device)
    return _varlen(q, k, v, rows * seqlen_q, rows * seqlen_k, options), None


def _decode(q, k, v, causal: bool, scaling, window, softcap) -> torch.Tensor:
    """The decode route: eager CUDA calls go straight to the decode kernel's host path
    (a generation step makes one call per layer, and its host time is the step's), others
    through ``cuflash.torch.attention_with_kvcache`` (traceable by torch.compile)."""
    if q.is_cuda and not torch.compiler.is_compiling():
        backend = fastpath.backend_for((q, k, v), False, None)  # None: not plain CUDA
        if backend is not None:
            flags = dict(causal=causal, softmax_scale=scaling, window=window, softcap=softcap,
                         num_splits=None)
            return decode.decode_cuda(backend, q, k, v, {}, flags)[0]
    return attention_with_kvcache(q, k, v, causal=causal, softmax_scale=scaling,
                                  window=window, softcap=softcap)


def choose_route(*, padded: bool, packed: bool, seqlen_q: int, seqlen_k: int,
                 same_head_dims: bool, sinks: bool, modifiers: bool, needs_grad: bool) -> str:
    """Which cuflash call serves one attention call (pure; the module docstring says why):
    "padded", "packed" (varlen with offsets), "decode" (the K/V-cache kernel), "dense", or
    "rows" (varlen, one sequence per batch row: window / softcap / sinks).

    Decode wants a cache (more keys than queries), at most DECODE_MAX_Q_LEN queries, K and V
    of one shape (its v_cache is k_cache's shape), no sinks (it has none yet) and no
    gradient (it has no backward: a training step with a cache keeps the dense route)."""
    if padded:
        return "padded"
    if packed:
        return "packed"
    if (seqlen_q <= DECODE_MAX_Q_LEN and seqlen_k > seqlen_q and same_head_dims
            and not sinks and not needs_grad):
        return "decode"
    return "rows" if modifiers or sinks else "dense"


def _varlen(q, k, v, cu_q, cu_k, options):
    """Sequences laid out back to back along (batch * seqlen): pack, attend, unpack."""
    batch, seqlen_q = q.shape[:2]
    flat = [x.reshape(-1, *x.shape[2:]) for x in (q, k, v)]
    max_q, max_k = (int((cu[1:] - cu[:-1]).max()) for cu in (cu_q, cu_k))
    o = flash_attention_varlen(*flat, cu_q, cu_k, max_q, max_k, **options)
    return o.reshape(batch, seqlen_q, *o.shape[1:])


def _offsets(valid: torch.Tensor) -> torch.Tensor:
    """int32 (batch + 1,) offsets of the valid tokens of each row, packed."""
    counts = valid.sum(dim=1, dtype=torch.int32)
    return torch.nn.functional.pad(counts.cumsum(0, dtype=torch.int32), (1, 0))


def _padded(q, k, v, mask, options):
    """Gather the valid tokens (mask True) into the packed layout, attend, scatter back.

    The queries are the last seqlen_q positions of the mask (they are the newest tokens);
    a static cache longer than the mask is cut to it, as transformers' flash path does."""
    batch, seqlen_q = q.shape[:2]
    k, v = k[:, :mask.shape[1]], v[:, :mask.shape[1]]
    valid_q = mask[:, -seqlen_q:]
    index_q, index_k = valid_q.reshape(-1).nonzero()[:, 0], mask.reshape(-1).nonzero()[:, 0]
    q_p = q.reshape(-1, *q.shape[2:]).index_select(0, index_q)
    k_p, v_p = (x.reshape(-1, *x.shape[2:]).index_select(0, index_k) for x in (k, v))
    cu_q, cu_k = _offsets(valid_q), _offsets(mask)
    max_q, max_k = (int((cu[1:] - cu[:-1]).max()) for cu in (cu_q, cu_k))
    o_p = flash_attention_varlen(q_p, k_p, v_p, cu_q, cu_k, max_q, max_k, **options)
    o = o_p.new_zeros(batch * seqlen_q, *o_p.shape[1:]).index_copy(0, index_q, o_p)
    return o.reshape(batch, seqlen_q, *o.shape[1:])


def _packed_offsets(q, k, position_ids, kwargs):
    """(cu_q, cu_k) when several sequences are packed into one row without padding
    ("padding-free" training): given as cu_seq_lens_q / cu_seq_lens_k, or found where
    position_ids do not step by 1. None for an ordinary batch."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:
        return cu_q.to(torch.int32), cu_k.to(torch.int32)
    if position_ids is None or q.shape[0] != 1 or q.shape[1] != k.shape[1] or q.shape[1] < 2:
        return None
    pos = position_ids.reshape(-1)
    if pos.numel() != q.shape[1]:
        return None
    if torch.compiler.is_compiling():
        return _offsets_of(pos)
    # Finding the breaks reads the positions on the host (a sync). A model hands every layer
    # the same position_ids tensor, so the answer is kept for that tensor while it is
    # unchanged (its version counter): one sync per forward pass, not one per layer.
    global _last_positions
    ref, version, known = _last_positions
    if ref is not None and ref() is position_ids and version == position_ids._version:
        return known
    known = _offsets_of(pos)
    _last_positions = (weakref.ref(position_ids), position_ids._version, known)
    return known


_last_positions: tuple = (None, None, None)  # (weakref to position_ids, version, offsets)


def _offsets_of(pos: torch.Tensor):
    breaks = (torch.diff(pos) != 1).nonzero()[:, 0] + 1  # where a new sequence starts
    if breaks.numel() == 0:
        return None
    ends = torch.tensor([0, pos.numel()], device=pos.device)
    cu = torch.cat([ends[:1], breaks, ends[1:]]).to(torch.int32)
    return cu, cu


def register() -> None:
    """Register (again) the attention and mask functions under ``ATTN_IMPLEMENTATION``."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, flash_attention_mask)


register()
