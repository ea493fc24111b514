// cf_config.cuh -- the compile-time ABI (docs/kernel_abi.md, "Compilation"): one default each.
//
// cuflash always passes these as -D (specs.KernelSpec.defines, decode.py's spec .defines),
// so a default here only decides what a standalone `nvcc -arch=sm_90 -c kernels_cu/FILE.cu`
// builds: bfloat16, head_dim 128, 4 warps, 16 query rows and 16 keys per warp, two stages.
// A file that takes only other values sets its own default before including this one:
// cf_simt.cuh CF_DTYPE 2 for the float32 files, the Hopper files and flash_bwd_split.cu
// CF_WARPS 8 (flash_bwd_sm90.cu and flash_bwd_split.cu also CF_BLOCK_M 64). The decode-only knobs (CF_ROWS, CF_KEYS, CF_MIN_BLOCKS)
// stay in flash_decode.cu / flash_decode_mma.cu; the backward-only ones are in
// cf_config_bwd.cuh, so forward compilations do not see them.
#pragma once

// -- data and tile -------------------------------------------------------------------------
#ifndef CF_DTYPE
#define CF_DTYPE 1  // storage type elem_t: 0 = float16, 1 = bfloat16, 2 = float32
#endif
#ifndef CF_HEAD_DIM
#define CF_HEAD_DIM 128  // head-dim bucket: a multiple of 32 up to 256 (true head_dim: run time)
#endif
#ifndef CF_HEAD_DIM_V
#define CF_HEAD_DIM_V CF_HEAD_DIM  // v's and o's head_dim when it differs (issue #15's pairs,
                                   // exact, whole panels): flash_fwd_sm90.cu, flash_bwd_sm90.cu
#endif
#ifndef CF_WARPS
#define CF_WARPS 4  // warps per thread block
#endif
#ifndef CF_BLOCK_M
#define CF_BLOCK_M (16 * CF_WARPS)  // query rows per tile
#endif
#ifndef CF_BLOCK_N
#define CF_BLOCK_N (16 * CF_WARPS)  // key rows per tile (decode_mma: per ring stage)
#endif
#ifndef CF_STAGES
#define CF_STAGES (CF_DTYPE == 2 ? 1 : 2)  // loads in flight; the float32 kernels take only 1
#endif

// -- mask, score modifiers, sequence layout (their logic: cf_mask.cuh, cf_seq.cuh) ------------
#ifndef CF_MASK
#define CF_MASK 0  // 0 none, 1 causal, 2 local (a sliding window)
#endif
#ifndef CF_SOFTCAP
#define CF_SOFTCAP 0  // 1: scores pass through softcap * tanh(s / softcap)
#endif
#ifndef CF_ALIBI
#define CF_ALIBI 0  // 1: scores get the ALiBi bias slope * (k - q)
#endif
#ifndef CF_SINKS
#define CF_SINKS 0  // 1: the forwards fold per-head sinks into m, l; the preprocess: dsinks
#endif
#ifndef CF_BLOCK_SPARSE
#define CF_BLOCK_SPARSE 0  // 1: a block mask skips whole tiles (cf_mask.cuh, docs/block_sparse.md)
#endif
#ifndef CF_DROPOUT
#define CF_DROPOUT 0  // 1: P is dropped by a Philox mask (cf_philox.cuh, docs/dropout.md)
#endif
#ifndef CF_VARLEN
#define CF_VARLEN 0  // 1: packed sequences, rows found through cu_seqlens
#endif

// -- tuning ---------------------------------------------------------------------------------
#ifndef CF_EXP2_FMA
#define CF_EXP2_FMA 0  // forward softmax: of every 8 scores a lane holds per row, this many
                       // take fma_exp2 (FMA pipe) instead of the SFU's ex2 (cf_fwd.cuh)
#endif
#ifndef CF_ALIBI_ABS_ONLY
#define CF_ALIBI_ABS_ONLY 0  // 1: the 16-bit forwards take ALiBi's |distance| form on every
                             // tile, no row offsets (cf_mask.cuh's modify_s; an A/B knob)
#endif

#ifndef CF_SOURCE_HASH
#define CF_SOURCE_HASH 0  // hash of the kernel's sources: a cache key only, no code reads it
#endif
