"""What besides the device changes the plan: a ``Config`` read from the environment once.

The selector and the planners are pure: they take the device's facts and a ``Config``, and
read no environment variable. The caller reads it: ``raw()`` is the cheap per-call key (the
values as the environment holds them, a plan-memo key), ``parse(raw())`` the ``Config`` a
plan miss is computed with.

- ``CUFLASH_SMEM_BUDGET`` (bytes, or e.g. ``99K``) or ``set_smem_budget``: plan tiles for at
  most this much shared memory per block, so a larger GPU runs a smaller one's tiles.
- ``CUFLASH_DISABLE_WGMMA=1``: no Hopper-only (wgmma) kernels; the portable ones instead.
- ``CUFLASH_FORCE_ARCH`` (e.g. ``sm_75``): plan and build as on that (older) GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .archs import ARCH_SMEM_OPTIN
from .constants import KIB, SMEM_FLOOR


@dataclass(frozen=True)
class Config:
    smem_budget: int | None = None  # bytes; None: the device's opt-in maximum
    wgmma: bool = True  # Hopper-only kernels where the device has wgmma
    forced_arch: str | None = None  # plan and build as on this arch


_budget_override: int | None = None  # set_smem_budget's value; before the environment's


def set_smem_budget(budget: int | None) -> None:
    """Plan tiles for at most ``budget`` bytes of shared memory per block (None: the device's)."""
    global _budget_override
    if budget is not None and (not isinstance(budget, int) or budget < SMEM_FLOOR):
        raise ValueError(f"smem budget: expected an int of at least {SMEM_FLOOR} bytes or None, "
                         f"got {budget!r}")
    _budget_override = budget


# os.environ's own dict (bytes keys on POSIX): one plain lookup per variable, where
# os.environ.get encodes the key and decodes the value on every call (a per-call cost here).
_ENVIRON = getattr(os.environ, "_data", None)
ENV_KEYS = ("CUFLASH_SMEM_BUDGET", "CUFLASH_DISABLE_WGMMA", "CUFLASH_FORCE_ARCH")
_RAW_KEYS = tuple(os.environ.encodekey(k) for k in ENV_KEYS) if _ENVIRON is not None else ()


def env_reader(name: str):
    """A per-call reader of one variable's raw value (bytes or str; None when unset), from
    os.environ's own dict where it has one (no key encoding per call)."""
    if _ENVIRON is not None:
        key = os.environ.encodekey(name)
        return lambda: _ENVIRON.get(key)
    return lambda: os.environ.get(name)


def raw() -> tuple:
    """The Python-set budget and the variables' raw values: cheap, for memo keys."""
    if _ENVIRON is not None:
        return (_budget_override, *map(_ENVIRON.get, _RAW_KEYS))
    return (_budget_override, *map(os.environ.get, ENV_KEYS))


def _text(value) -> str:
    return (value.decode() if isinstance(value, bytes) else value or "").strip()


def parse(raw_values: tuple) -> Config:
    """The ``Config`` of ``raw()``'s values; raises ``ValueError`` naming a bad variable."""
    budget, raw_budget, raw_wgmma, raw_arch = raw_values
    if budget is None:
        budget = _parse_budget(_text(raw_budget))
    return Config(smem_budget=budget, wgmma=_text(raw_wgmma) != "1",
                  forced_arch=_parse_arch(_text(raw_arch)))


def current() -> Config:
    """The configuration the environment and ``set_smem_budget`` give now."""
    return parse(raw())


def _parse_budget(text: str) -> int | None:
    if not text:
        return None
    try:
        value = int(text[:-1]) * KIB if text[-1] in "kK" else int(text)
    except ValueError:
        raise ValueError(f"CUFLASH_SMEM_BUDGET: expected bytes or e.g. '99K', got {text!r}") from None
    if value < SMEM_FLOOR:
        raise ValueError(f"CUFLASH_SMEM_BUDGET: expected at least 48K, got {text!r}")
    return value


def _parse_arch(text: str) -> str | None:
    if not text:
        return None
    if text not in ARCH_SMEM_OPTIN:
        raise ValueError(f"CUFLASH_FORCE_ARCH: expected one of {', '.join(ARCH_SMEM_OPTIN)}, "
                         f"got {text!r}")
    return text
