"""The device scripts run here in their tiny modes, so `make gpu-check` and the compile benchmark do not rot
between the rare runs on a GPU."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_its_timing_part_on_the_cpu_in_tiny_mode(tmp_path):
    out = tmp_path / "gpu.md"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--out", str(out), "--tiny",
                        "--device", "cpu", "--dtype", "bfloat16", "--no-bench", "--no-tests", "--modes", "eager",
                        "--batches", "1", "--branches", "0"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    text = out.read_text()
    assert "### SD-1.5 (tiny)" in text and "### SDXL (tiny)" in text and "| 1 | eager |" in text


def test_gpu_check_reads_the_readme_table_it_compares_with():
    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_check

    rows = gpu_check.readme_cbfd()
    assert "teacher DDIM-100" in rows and rows["teacher DDIM-100"][1] > 0


def test_transformer_cost_runs_in_tiny_mode(tmp_path):
    import json

    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "transformer_cost.py"), "--out", str(tmp_path),
                        "--tiny", "--threads", "1"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "transformer_cost.json").read_text())
    for row in data["costs"]:
        assert row["partial"] and all(0 < p["macs"] < row["full"] for p in row["partial"])
    assert "FluxTransformer2DModel" in (tmp_path / "transformer_cost.md").read_text()
