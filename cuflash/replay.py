"""A call's launches recorded once per layout, then replayed with each call's addresses.

A repeated call of a layout (same shapes, strides, dtypes, flags, device) launches the same
kernels with the same grids and the same scalar arguments; only the arrays' addresses and the
stream differ. So the first call of a layout runs the ordinary launch code with stand-in
addresses (:class:`Address`: "array i plus a byte offset") and ``launch`` records what it
would have launched instead of launching it; :class:`Replay` keeps those launches with the
stand-ins as slots, and every call (the first included) fills the slots with its addresses and
enqueues them. Nothing of the argument packing is written twice: the recording runs the code
that a call without the cache would run (``tests/test_replay.py`` checks the two agree).

What a replay costs per launch: one ``struct.pack_into`` of the parameter buffer and one
``cuLaunchKernel``; no plan, no selection, no per-argument Python objects. A kernel that
loads with TMA also takes tensor maps, which hold addresses: a map's slot is made again from
the call's address (``tensor_map.encode``, which remembers recent ones).
"""

from __future__ import annotations

import struct
from typing import Callable, NamedTuple

from . import launch
from .tensor_map import TensorMap


class Address:
    """A stand-in for the address of a call's array ``index`` plus ``offset`` bytes, as the
    launch code computes it (``ptr + b0 * stride``, ``workspace + delta_offset``)."""

    __slots__ = ("index", "offset")

    def __init__(self, index: int, offset: int = 0):
        self.index, self.offset = index, offset

    def __add__(self, other):
        if not isinstance(other, int):
            return NotImplemented
        return Address(self.index, self.offset + other)

    __radd__ = __add__

    def __bool__(self):  # a stand-in is an array that is there (absent arrays are 0)
        return True

    def __repr__(self):
        return f"Address({self.index}, {self.offset})"


def addresses(count: int) -> tuple[Address, ...]:
    """Stand-ins for a call's ``count`` arrays, in the order the replay will be given them."""
    return tuple(Address(i) for i in range(count))


class _Step(NamedTuple):
    """One recorded launch (or memset, ``function`` None) with its address slots."""

    function: int | None
    grid: tuple
    threads: int
    smem: int
    packer: struct.Struct | None
    template: tuple  # the arguments, slots as 0
    slots: tuple  # (argument position, array index, byte offset, TensorMap or None)
    what: Callable[[], str] | None
    memset_bytes: int = 0
    dependent: bool = False  # launch.launch_packed_dependent


def _step(record: launch.Record) -> _Step:
    slots, template = [], []
    for i, a in enumerate(record.args):
        if isinstance(a, Address):
            slots.append((i, a.index, a.offset, None))
            a = 0
        elif isinstance(a, TensorMap):
            if isinstance(a.ptr, Address):  # made per call from the call's address
                slots.append((i, a.ptr.index, a.ptr.offset, a))
                a = b""
            else:
                a = a.encoded()
        template.append(a)
    slots, template = tuple(slots), tuple(template)
    if record.function is None:
        return _Step(None, (), 0, 0, None, template, slots, None, record.memset_bytes)
    return _Step(record.function, record.grid, record.threads, record.smem,
                 launch.param_packer(record.signature), template, slots, record.what,
                 dependent=record.dependent)


class Replay:
    """The launches of one layout's call, recorded by :meth:`record`; calling it enqueues
    them with the call's addresses (in the order of the recording's stand-ins) on ``stream``."""

    def __init__(self, records: list):
        self.steps = tuple(_step(r) for r in records)

    @classmethod
    def record(cls, enqueue: Callable[[int], None]) -> "Replay":
        """Run ``enqueue(stream)`` (launch code called with :func:`addresses` stand-ins) with
        its launches recorded, not run."""
        with launch.recording() as records:
            enqueue(launch.RECORDED_STREAM)
        return cls(records)

    def __call__(self, ptrs: tuple, stream: int) -> None:
        for step in self.steps:
            args = list(step.template)
            for position, index, offset, tensor_map in step.slots:
                args[position] = (ptrs[index] + offset if tensor_map is None
                                  else tensor_map.encoded_at(ptrs[index] + offset))
            if step.function is None:
                launch.memset_async(args[0], step.memset_bytes, stream)
            else:
                enqueue = launch.launch_packed_dependent if step.dependent else \
                    launch.launch_packed
                enqueue(step.function, step.grid, step.threads, step.smem, step.packer, args,
                        stream, step.what)
