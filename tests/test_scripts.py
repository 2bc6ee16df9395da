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


def test_convergence_check_runs_on_a_flow_transformer_run(tmp_path):
    """The model card's check on a training run's snapshots: a flow model gets its own teacher (flow Euler) and the
    step ladder; two random-weight snapshots stand in for a run."""
    import json

    from flexdiff.models import DEFAULT_LABEL_TOKENS, build_default_transformer, save_model
    from flexdiff.samplers import FLOW_SCHEDULER_CONFIG

    run = tmp_path / "run"
    for step, seed in ((2, 0), (3, 1)):
        save_model(build_default_transformer(seed=seed), dict(FLOW_SCHEDULER_CONFIG),
                   run / "snapshots" / f"step-{step:06d}", DEFAULT_LABEL_TOKENS)
    (run / "losses.json").write_text(json.dumps([0.5, 0.4, 0.3]))
    (run / "training_summary.json").write_text(json.dumps({"wall_time_s": 1.0}))
    # resumed with a larger --steps and still running: the checkpoint has the longer curve and time
    import torch
    torch.save({"losses": [0.5, 0.4, 0.3, 0.25, 0.2], "elapsed": 9.0, "step": 5}, run / "checkpoint.pt")
    out = tmp_path / "check"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "convergence.py"), "--run", str(run), "--ship", "2",
                        "--extended", "3", "--samples", "24", "--curve-samples", "12", "--n-boot", "10", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((out / "convergence.json").read_text())
    assert set(result["ladder"]) == {"5", "10", "20"}
    assert {"teacher_better_than_its_20_step_run", "step_ladder_improves"} <= set(result["checks"])
    assert result["converged"] == all(result["checks"].values())
    assert (result["total_steps"], result["wall_time_s"]) == (5, 9.0)
    assert result["teacher_separated_up_to"] in (None, 5, 10, 20)
    assert result["training_converged"] == all(v for k, v in result["checks"].items()
                                               if k not in ("teacher_better_than_its_20_step_run", "step_ladder_improves"))
    assert "flow-euler-100" in (out / "convergence.md").read_text()


def test_hook_reach_counts_each_hook_setting_on_a_transformer(tmp_path):
    """The reach table's command: each hook setting's counted MACs fraction on a (random-weight) FLUX-shaped model;
    a grid entry out of range is one line and a nonzero exit before any sampling."""
    import json

    from flexdiff.models import DEFAULT_LABEL_TOKENS, build_default_transformer, save_model
    from flexdiff.samplers import FLOW_SCHEDULER_CONFIG

    model = tmp_path / "model"
    save_model(build_default_transformer(seed=0), dict(FLOW_SCHEDULER_CONFIG), model, DEFAULT_LABEL_TOKENS)
    script = str(ROOT / "scripts" / "hook_reach.py")
    out = tmp_path / "reach"
    r = subprocess.run([sys.executable, script, "--model", str(model), "--grid", "fbc:0.5,taylorseer:3",
                        "--samples", "4", "--batch-size", "2", "--steps", "6", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((out / "hook_reach.json").read_text())["rows"]
    assert [(row["hook"], row["setting"]) for row in rows] == [("fbc", 0.5), ("taylorseer", 3.0)]
    for row in rows:
        assert 0 < row["fraction_min"] <= row["fraction"] <= row["fraction_max"] <= 1.0 + 1e-9
        assert row["speedup"] == 1 / row["fraction"]
    assert rows[1]["fraction"] < 0.9  # TaylorSeer (lite) at interval 3 skips most blocks of most calls
    assert "FirstBlockCache" in (out / "hook_reach.md").read_text()
    bad = subprocess.run([sys.executable, script, "--model", str(model), "--grid", "fbc:1.5", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "FirstBlockCache threshold 1.5" in bad.stderr and len(bad.stderr.splitlines()) == 1
