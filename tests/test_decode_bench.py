"""bench/decode.py without a GPU: --help, and the table it prints from a result."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "decode.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_decode", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_needs_no_gpu():
    out = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--parts" in out.stdout and "copy bandwidth" in out.stdout


def test_table_reports_the_bars():
    bench = _module()
    timing = lambda tb: {"tb_s": tb, "eager_tb_s": tb * 0.9, "ms": 1.0, "eager_ms": 1.1}
    main = {"batch": 8, "cache": 8192, "heads_kv": 8, "kv_bytes": 1, "vs_cudnn": 1.05,
            "of_copy": 0.9, "done": True, "cuflash_plan": {"splits": 6, "spec": "x"},
            **{name: timing(3.9) for name in bench.IMPLS}}
    main["sdpa_flash"] = {"error": "RuntimeError: no kernel"}
    paged = {"batch": 8, "cache": 8192, "heads_kv": 8, "contiguous": timing(4.0),
             "paged": {16: timing(3.8), 256: {"error": "x"}}}
    qlen = {"batch": 8, "cache": 8192, "heads_kv": 8,
            "q_len": {n: dict(timing(4.0 / n), plan={"spec": f"r{n}"}) for n in (1, 2)}}
    text = bench.table({"device": "GPU", "copy_tb_s": 4.3, "main": [main], "paged": [paged],
                        "qlen": [qlen]})
    assert "copy ceiling 4.30" in text and "yes" in text and "3.41" in text  # the cuDNN
    assert "16: 3.80 (95%)" in text and "256: n/a" in text
    assert "q_len 2: 2.00 (50%, r2)" in text
    assert "sdpa_flash: RuntimeError" in text
