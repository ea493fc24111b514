// cf_config_bwd.cuh -- the two ABI knobs only the dK/dV kernels read (flash_bwd*.cu but the
// dQ ones); the registry passes both to every bwd and bwd90 spec (specs.KernelSpec.defines).
// Apart from cf_config.cuh so that forward compilations never define them.
#pragma once

#include "cf_config.cuh"

#ifndef CF_DQ_ATOMIC
#define CF_DQ_ATOMIC 1  // 1: also add dQ into dq_accum with float atomics; 0: dK, dV only
#endif
#ifndef CF_DCHUNK
#define CF_DCHUNK CF_HEAD_DIM  // head-dim columns of dK, dV owned by one block (default: all)
#endif
