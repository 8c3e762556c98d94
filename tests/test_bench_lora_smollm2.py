"""benchmarks/bench_lora_smollm2.py on a tiny SmolLM2-shaped model: the JSON other tools read, and an
apples-to-apples comparison (same weights and batch on both sides: equal losses at step 0)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_cpu_run_writes_comparable_rows(tmp_path):
    out = tmp_path / "lora.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_lora_smollm2.py"), "--device", "cpu", "--tiny",
           "--batch", "2", "--seq", "16", "--steps", "2", "--repeat", "1", "--json", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| transformers + peft (baseline) |" in r.stdout

    res = json.loads(out.read_text())
    ours, base = res["rows"]
    assert [ours["name"], base["name"]] == ["gptlab + LoRA", "transformers + peft"]
    for row in (ours, base):
        assert row["tokens_per_s"] > 0 and row["step_ms"] > 0 and row["peak_mem_gib"] > 0
    assert res["ratio_tokens_per_s"] == ours["tokens_per_s"] / base["tokens_per_s"]
    assert res["ratio_peak_mem"] == ours["peak_mem_gib"] / base["peak_mem_gib"]
    assert res["config"]["batch"] == 2 and res["config"]["seq"] == 16 and res["config"]["dtype"] == "fp32"
    # same weights, LoRA B = 0 and the same first batch: the two sides compute the same loss
    assert ours["trainable_params"] == base["trainable_params"]
    assert abs(ours["loss_step0"] - base["loss_step0"]) < 1e-4
    # and the same LoRA A and optimizer: they train the same way
    assert abs(ours["loss_last"] - base["loss_last"]) < 1e-3
