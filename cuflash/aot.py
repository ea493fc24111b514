"""Ahead-of-time builds: compile reports for any arch, and warming a GPU's kernel caches.

Both run many NVRTC compilations in a pool of processes started with ``spawn``, never
``fork``: a forked child of a process whose threads (JAX's, CuPy's) hold locks can deadlock.
A running count with the elapsed time goes to stderr while they work.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from typing import Callable, Sequence

from . import specs
from .constants import DTYPES
from .specs import DeviceFacts, KernelSpec


class Progress:
    """``label: 37/195, 21 s`` on stderr: rewritten in place on a terminal, else a line
    every ``every_s`` seconds and at the end (logs stay short)."""

    def __init__(self, total: int, label: str, stream=None, every_s: float = 10.0):
        self.total, self.label, self.done = total, label, 0
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.start = self.last = time.perf_counter()
        self.every_s = every_s

    def step(self) -> None:
        self.done += 1
        now = time.perf_counter()
        if self.tty or now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            end = "\n" if self.done == self.total or not self.tty else ""
            self.stream.write(f"\r{self.label}: {self.done}/{self.total}, "
                              f"{now - self.start:.0f} s{end}")
            self.stream.flush()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


def run_parallel(fn: Callable, items: Sequence, jobs: int, label: str) -> list:
    """``[fn(item) for item in items]`` over ``jobs`` spawned processes, with progress.

    ``fn`` must be a module-level function (spawned workers import it by name).
    """
    progress = Progress(len(items), label)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=context) as pool:
        futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
        results: list = [None] * len(items)
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            progress.step()
    return results


# -- which specs -----------------------------------------------------------------------------------

def selected_specs(facts: DeviceFacts, dtypes: Sequence[str] | None = None,
                   head_dims: Sequence[int] | None = None,
                   mods: specs.ModFlags = specs.NO_MODS) -> list[KernelSpec]:
    """The specs ``facts``' GPU selects, for the given dtypes and head_dims (default: all)."""
    chosen = specs.all_specs(facts, mods=mods)
    if dtypes:
        chosen = [s for s in chosen if s.dtype in dtypes]
    if head_dims:
        buckets = {specs.head_dim_bucket(d) for d in head_dims}
        chosen = [s for s in chosen if s.kind == "bwd_pre" or s.head_dim in buckets]
    return chosen


# -- compile reports (no GPU) -------------------------------------------------------------------

def compile_work(archs: Sequence[str], all_budgets: bool, dtypes: Sequence[str] | None = None,
                 head_dims: Sequence[int] | None = None, *, varlen: bool = False,
                 block_sparse: bool = False, dropout: bool = False,
                 device_rng: bool = False) -> list[tuple[KernelSpec, str]]:
    """(spec, arch) for every spec the selector can pick on each arch (and smaller budgets),
    optionally only for some dtypes and head_dims. ``varlen``: those specs compiled for
    packed sequences instead (what the selector picks for varlen calls; no decode kernels);
    ``block_sparse``: for block masks instead (likewise); ``dropout``: for dropout;
    ``device_rng``: for dropout with the words in device memory (specs.with_device_rng)."""
    dropout = dropout or device_rng
    mods = specs.ModFlags(varlen=varlen, block_sparse=block_sparse, dropout=dropout)
    work = []
    for arch in archs:
        limit = specs.ARCH_SMEM_OPTIN[arch]
        budgets = [None] if not all_budgets else [
            b * specs.KIB for b in specs.BUDGETS_KIB if b * specs.KIB <= limit]
        seen: set[str] = set()
        for budget in budgets:
            facts = specs.facts_for_arch(arch, budget)
            # a hypothetical GPU has no SM count, so the ordered dQ kernels come without
            # their rotated walk: compile that form too, as a large GPU selects it
            large = replace(facts, sm_count=128)
            for spec in selected_specs(facts, dtypes, head_dims, mods):
                spec = specs.with_device_rng(spec) if device_rng else spec
                for form in (spec, specs.with_ordered_rotation(spec, large)):
                    if form.name not in seen:
                        seen.add(form.name)
                        work.append((form, arch))
        if not varlen and not block_sparse and not dropout:
            work += [(spec, arch) for spec in pair_specs(arch, dtypes, head_dims)
                     if spec.name not in seen]
            work += [(spec, arch) for spec in decode_specs(arch, dtypes, head_dims)]
    return work


# Modifier sets that exercise each kernel's modifier code: none, each alone, softcap with
# ALiBi (their own backward loop), and the five score / sequence knobs together.
MOD_COMBOS = (specs.NO_MODS,
              *(specs.ModFlags(**{n: True}) for n in ("window", "softcap", "alibi", "sinks",
                                                       "varlen")),
              specs.ModFlags(softcap=True, alibi=True), specs.ModFlags(*[True] * 5))


def modifier_work(archs: Sequence[str], budgets_kib: Sequence[int] = (),
                  combos: Sequence[specs.ModFlags] = MOD_COMBOS, *,
                  pairs: bool = False) -> list[tuple[KernelSpec, str]]:
    """(spec, arch) for every spec the selectors pick on each arch (and at ``budgets_kib``)
    under each modifier set of ``combos``, then the decode kernels (and with ``pairs`` the
    kernels of v's own head_dim), each once."""
    seen, work = set(), []

    def add(spec, arch):
        if (spec.name, arch) not in seen:
            seen.add((spec.name, arch))
            work.append((spec, arch))

    for arch in archs:
        limit = specs.ARCH_SMEM_OPTIN[arch]
        budgets = [None] + [b * specs.KIB for b in budgets_kib if b * specs.KIB <= limit]
        for mods in combos:
            for budget in budgets:
                for spec in selected_specs(specs.facts_for_arch(arch, budget), mods=mods):
                    add(spec, arch)
        for spec in decode_specs(arch):
            add(spec, arch)
        for spec in pair_specs(arch) if pairs else ():
            add(spec, arch)
    return work


def pair_specs(arch: str, dtypes: Sequence[str] | None = None,
               head_dims: Sequence[int] | None = None) -> list[KernelSpec]:
    """The Hopper kernels with v's own head_dim (specs.select_forward_pair /
    select_backward_pair) for every pair of whole-panel widths they take, causal or not, at
    ``arch``'s own shared memory (none on other archs)."""
    facts = specs.facts_for_arch(arch)
    if arch not in specs.WGMMA_ARCHS:
        return []
    widths = specs.PAIR_WIDTHS_V
    out = []
    for dtype in (d for d in ("float16", "bfloat16") if not dtypes or d in dtypes):
        for d, dv in ((d, dv) for d in widths for dv in widths if d != dv):
            if head_dims and d not in head_dims:
                continue
            for causal in (False, True):
                out.append(specs.select_forward_pair(facts, dtype, d, dv, causal))
                if d in specs.BWD90_PAIR_BUCKETS and dv < d:
                    out.append(specs.select_backward_pair(facts, dtype, d, dv, causal, False))
    return out


def decode_specs(arch: str, dtypes: Sequence[str] | None = None,
                 head_dims: Sequence[int] | None = None) -> list:
    """The KV-cache decode kernels (cuflash.decode) built for ``arch``: every spec its
    selector can return, for the dtypes the arch has (Turing has no bfloat16)."""
    from . import decode

    allowed = [d for d in DTYPES
               if (not dtypes or d in dtypes) and not (d == "bfloat16" and arch == "sm_75")]
    chosen = decode.all_decode_specs(allowed, arch)
    if head_dims:
        buckets = {decode.head_dim_bucket(d) for d in head_dims}
        chosen = [s for s in chosen if s.head_dim in buckets]
    return chosen


@dataclass(frozen=True)
class CompileFailure:
    spec: str
    arch: str
    error: str


def report_one(item: tuple[KernelSpec, str]):
    """A worker: ptxas reports of one (spec, arch), or a ``CompileFailure`` with the log."""
    from .compiler import compile_report

    spec, arch = item
    try:
        return compile_report(spec, arch)
    except RuntimeError as exc:
        return [CompileFailure(spec.name, arch, str(exc))]


# -- warmup: fill the caches a GPU's first calls read ----------------------------------------------

def warm_one(item: tuple[KernelSpec, int]) -> float:
    """A worker: load one spec on the device the way a first call does; seconds it took.

    ``get_kernel`` is the very path a call takes, so it fills the same cache: cuflash's
    cubins, in ``CUPY_CACHE_DIR``.
    """
    from .compiler import get_kernel

    spec, device_id = item
    return get_kernel(spec, device_id).seconds
