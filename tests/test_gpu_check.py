"""benchmarks/gpu_check.sh, the one-call GPU check, dry-run on CPU: every step at a tiny size."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cyclegan.device import cpu_has_native_bf16

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_the_summaries(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(out), "PYTHON": sys.executable,
           "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["dry_run"] is True
    assert "skipped" in summary["cuda_tests"]["summary"] or "passed" in summary["cuda_tests"]["summary"]
    (bench,) = summary["train_step"]["results"]
    assert bench["size"] == 32 and set(bench["modes"]) == {"fp32", "bf16", "bf16+channels_last", "authors"}
    for mode, result in bench["modes"].items():
        if "bf16" in mode and not cpu_has_native_bf16():
            # train.precision bf16 is refused on a CPU without AVX512-BF16/AMX (slower than fp32 there).
            assert "bf16" in result.get("error", ""), (mode, result)
        else:
            assert result["s_per_iter"] > 0, (mode, result)
    recipe = summary["recipe"]["results"]
    assert recipe["steps"] > 0 and recipe["params"]["data"]["crop_size"] == 32
    scores = recipe["scores"]
    assert all(math.isfinite(scores[f"fid_{k}"]) for k in ("A2B", "B2A", "baseline"))
    # clean-FID too, to set beside the clean-fid leaderboard (clean-fid is in the project's venv)
    assert all(math.isfinite(scores[f"{m}_{k}"]) for m in ("cleanfid", "precision", "recall")
               for k in ("A2B", "B2A", "baseline"))
    assert scores["protocol"]["literature"]["cleanfid_mode"] == "clean"
    assert scores["protocol"]["counts"] == {"testA": 6, "testB": 6}
    markdown = (out / "gpu_check.md").read_text()
    assert "| 32 | fp32 |" in markdown and "| A2B |" in markdown and "clean-FID 75.17" in markdown
