"""benchmarks/gpu_suite.py --smoke on the CPU: keeps the GPU suite from rotting between GPU runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_smoke_writes_markdown_and_json(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("OUT", None)
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke",
                        "--parts", "pretrain,decode", "--out", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "== pretrain" in p.stderr and "== decode" in p.stderr  # progress lines

    md = (tmp_path / "gpu_suite.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| part |"))
    assert "| ratio |" in header and "| baseline |" in header
    assert "transformers GPT2LMHeadModel, eager" in md and "transformers generate" in md

    result = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert result["meta"]["smoke"] and set(result["parts"]) == {"pretrain", "decode"}
    for name, part in result["parts"].items():
        assert part["status"] == "ok", (name, part)
        assert part["rows"] and all(r["ratio"] > 0 for r in part["rows"])
    assert {r["metric"] for r in result["parts"]["decode"]["rows"]} == {"greedy tokens/s, batch 1",
                                                                       "greedy tokens/s, batch 4"}


def test_gpu_suite_rejects_unknown_part(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--parts", "nope",
                        "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 2 and "unknown parts ['nope']" in p.stderr


def load_suite():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_failing_part_and_missing_lora_leave_the_table(tmp_path, monkeypatch):
    suite = load_suite()
    monkeypatch.setattr(suite, "ROOT", tmp_path)  # no benchmarks/bench_lora_smollm2.py there

    def broken(args, device):
        raise RuntimeError("CUDA out of memory | tried to allocate\nsecond line")

    def fine(args, device):
        return [suite.summary("decode", "greedy tokens/s, batch 1", 30.0, "transformers generate", 10.0)], [], "n"

    monkeypatch.setattr(suite, "part_pretrain", broken)
    monkeypatch.setattr(suite, "part_decode", fine)
    code = suite.main(["--smoke", "--parts", "pretrain,decode,lora", "--out", str(tmp_path / "out")])
    assert code == 1  # a part failed
    parts = json.loads((tmp_path / "out" / "gpu_suite.json").read_text())["parts"]
    assert parts["pretrain"] == {**parts["pretrain"], "status": "error",
                                 "error": "RuntimeError: CUDA out of memory | tried to allocate"}
    assert parts["lora"]["status"] == "missing" and parts["decode"]["rows"][0]["ratio"] == 3.0
    md = (tmp_path / "out" / "gpu_suite.md").read_text()
    assert "CUDA out of memory / tried" in md and "| 3.00x |" in md and "does not exist yet" in md
