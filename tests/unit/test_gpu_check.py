"""`make gpu-check`'s script in its CPU dry run (tests/gpu/gpu_check.py), so that it cannot
rot between GPU runs: the decode step with the Triton kernel (interpreted) and with gather +
SDPA at tiny sizes in bfloat16 and float16, their logits compared, figures written; the
engine, HTTP and async scheduling benchmarks through the command lines the GPU run uses, at
toy sizes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.unit.triton_interpret import needs_triton

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_writes_its_figures(tmp_path: Path) -> None:
    needs_triton()
    out = tmp_path / "gpu_check.json"
    result = subprocess.run(
        [sys.executable, "-m", "tests.gpu.gpu_check", "--dry-run", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["dry_run"] is True and report["passed"] is True
    assert "tests_gpu" not in report  # no tests/gpu without CUDA
    rows = report["decode_step"]
    assert {(r["dtype"], r["case"]) for r in rows} == {
        (dtype, case) for dtype in ("bfloat16", "float16") for case in ("ragged", "one long row")
    }
    for row in rows:
        assert row["triton_ms"] > 0 and row["gather_ms"] > 0 and row["matmuls_ms"] > 0
        # The two attention paths agree (the script fails past its own, looser bound).
        assert row["max_logit_diff"] < (0.02 if row["dtype"] == "bfloat16" else 0.003), row
        assert row["gather_bucket_blocks"] * report["block_size"] >= row["max_context"]
    # The engine and HTTP benchmarks' GPU command lines, run at toy sizes on the CPU.
    runs = report["benchmarks"]
    codes = {name: run["returncode"] for name, run in runs.items()}
    assert codes == {"engine": 0, "http": 0, "async_scheduling": 0}
    assert "--device cpu" in runs["engine"]["command"]
    for written in ("engine_cpu.json", "http_e2e.json", "async_scheduling_cpu.json"):
        assert json.loads((tmp_path / "benchmarks" / written).read_text(encoding="utf-8"))
