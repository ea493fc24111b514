"""cf_sm90.cuh's two ways of building a wgmma descriptor for a k-step (CF_DESC_ADD), mirrored
in Python: masking and shifting the step's address, or adding offset / 16 to the tile's
descriptor. The knob is only sound if they agree for every tile a kernel can hold and every
step offset its templates produce; the GPU test (test_gpu_desc_add.py) checks the outputs."""

from __future__ import annotations

import pytest

from cuflash import specs

SMEM = specs.ARCH_SMEM_OPTIN["sm_90"] + 1024  # the opt-in limit plus the reserved kilobyte


def masked(tile: int, offset: int, lbo: int, sbo: int) -> int:  # sm90_desc(tile + offset)
    return (((tile + offset) & 0x3FFFF) >> 4) | ((lbo >> 4) << 16) | ((sbo >> 4) << 32) | (1 << 62)


def added(tile: int, offset: int, lbo: int, sbo: int) -> int:  # sm90_desc_at, CF_DESC_ADD 1
    lo = ((((tile & 0x3FFFF) >> 4) | ((lbo >> 4) << 16)) + (offset >> 4)) & 0xFFFFFFFF
    return (((sbo >> 4) | (1 << 30)) << 32) | lo


def steps(rows: int, k_steps: int):
    """(offset, lbo) of sm90_desc_kmajor<rows> and sm90_desc_mnmajor<rows> for each k-step."""
    for kk in range(k_steps):
        yield (kk >> 2) * (rows * 128) + (kk & 3) * 32, 16
        yield kk * 16 * 128, rows * 128


@pytest.mark.parametrize("rows", [64, 80, 96, 128, 192, 256])
def test_both_forms_agree_inside_shared_memory(rows):
    for tile in range(0, SMEM, 128):  # tiles and row offsets are whole 128-byte rows
        for offset, lbo in steps(rows, 16):
            if tile + offset >= SMEM:
                continue
            assert masked(tile, offset, lbo, 1024) == added(tile, offset, lbo, 1024), \
                (rows, tile, offset)


def test_the_forms_part_past_the_address_field():
    """Past 2^18 bytes the masked form wraps and the added one carries into the next field:
    the identity needs every address below it, which shared memory (<= 228 KB) keeps."""
    assert masked(0x3FF80, 0x100, 16, 1024) != added(0x3FF80, 0x100, 16, 1024)
