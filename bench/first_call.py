"""How long a user waits for the first result: ``import cuflash`` -> first forward + backward.

For each (dtype, head_dim, causal) two fresh Python processes run the same call:

* cold: ``CUPY_CACHE_DIR`` points at a new, empty temporary directory, so every kernel the
  call selects is compiled by NVRTC (what a new machine sees on its first call);
* warm: the same directory again, now filled by the cold run (every later process).

Each child imports its array library first (not cuflash's cost), then times ``import
cuflash``, the first forward and the first backward (synchronized), and reports the seconds
each kernel took to load (``compiler.get_kernel``: compile or disk-cache hit). Targets
(issue #17): cold < 10 s, warm < 0.5 s for one combination.

    python bench/first_call.py --out bench/results                # bf16, head_dim 64 and 128
    python bench/first_call.py --out /tmp/fc --dtype float16 --head-dim 128 --causal 1

Needs a CUDA GPU and CuPy; writes first_call_<device>_<date>.json into --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (batch, seqlen, heads): small, so the kernels' own run time is negligible next to loading.
SHAPE = (2, 1024, 8)


def child(dtype: str, head_dim: int, causal: bool) -> dict:
    """Runs in the fresh process: time import + first forward + first backward."""
    import cupy
    import ml_dtypes
    import numpy as np

    batch, seqlen, heads = SHAPE
    np_dtype = {"float16": np.float16, "float32": np.float32,
                "bfloat16": ml_dtypes.bfloat16}[dtype]
    rng = np.random.default_rng(0)
    q, k, v, do = (cupy.asarray(rng.standard_normal((batch, seqlen, heads, head_dim))
                                .astype(np_dtype)) for _ in range(4))
    cupy.cuda.Device().synchronize()

    t0 = time.perf_counter()
    import cuflash
    from cuflash import compiler

    t_import = time.perf_counter()
    o, stats = cuflash.attention_forward(q, k, v, causal=causal)
    cupy.cuda.Device().synchronize()
    t_fwd = time.perf_counter()
    cuflash.attention_backward(do, q, k, v, o, stats, causal=causal)
    cupy.cuda.Device().synchronize()
    t_bwd = time.perf_counter()
    loads = {name: round(k.seconds, 3) for (name, *_), k in compiler._loaded.items()
             if not name.endswith(":convert")}
    return dict(import_s=t_import - t0, forward_s=t_fwd - t_import, backward_s=t_bwd - t_fwd,
                total_s=t_bwd - t0, kernel_load_s=loads)


def run_child(dtype: str, head_dim: int, causal: bool, cache_dir: str) -> dict:
    env = dict(os.environ, CUPY_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, __file__, "--child", dtype, str(head_dim),
                          str(int(causal))], env=env, capture_output=True, text=True,
                         timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"child failed ({dtype}, d{head_dim}, causal={causal}):\n"
                           f"{out.stdout}\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def device_info() -> dict:
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    from cupy_backends.cuda.libs import nvrtc

    return dict(device=name, arch=f"sm_{cupy.cuda.Device().compute_capability}",
                cupy=cupy.__version__, nvrtc=".".join(map(str, nvrtc.getVersion())),
                cpus=os.cpu_count())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=False, help="directory for the JSON")
    p.add_argument("--dtype", nargs="+", default=["bfloat16"],
                   choices=["float16", "bfloat16", "float32"])
    p.add_argument("--head-dim", nargs="+", type=int, default=[64, 128])
    p.add_argument("--causal", nargs="+", type=int, default=[0], choices=[0, 1])
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        dtype, head_dim, causal = args.child
        print(json.dumps(child(dtype, int(head_dim), causal == "1")))
        return 0
    if not args.out:
        p.error("--out is required")

    rows = []
    print(f"{'dtype':<9} {'d':>4} {'causal':>6} {'cold s':>7} {'warm s':>7} "
          f"{'import s':>8}  kernels (cold load s)")
    for dtype in args.dtype:
        for head_dim in args.head_dim:
            for causal in map(bool, args.causal):
                with tempfile.TemporaryDirectory(prefix="cuflash_cache_") as cache:
                    cold = run_child(dtype, head_dim, causal, cache)
                    warm = run_child(dtype, head_dim, causal, cache)
                rows.append(dict(dtype=dtype, head_dim=head_dim, causal=causal,
                                 cold=cold, warm=warm))
                loads = ", ".join(f"{n} {s:.1f}" for n, s in cold["kernel_load_s"].items())
                print(f"{dtype:<9} {head_dim:>4} {int(causal):>6} {cold['total_s']:>7.2f} "
                      f"{warm['total_s']:>7.2f} {warm['import_s']:>8.2f}  {loads}")
    result = dict(info=device_info(), date=datetime.date.today().isoformat(),
                  shape_batch_seqlen_heads=SHAPE, rows=rows,
                  targets=dict(cold_s=10.0, warm_s=0.5))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = result["info"]["device"].lower().replace(" ", "-")
    path = out / f"first_call_{slug}_{result['date']}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
