"""`make gpu-check`: flexdiff on a CUDA GPU, measured and written to docs/gpu.md.

    .venv/bin/python scripts/gpu_check.py --out docs/gpu.md                 # on a CUDA machine
    .venv/bin/python scripts/gpu_check.py --out /tmp/gpu.md --tiny --device cpu --no-bench   # the same code, in seconds

1. The device tests (tests/test_devices.py, tests/test_compile.py) on the device, in float16 and bfloat16.
2. SD-1.5- and SDXL-shaped UNets built from their configs (random weights: the cost of a network does not
   depend on them), float16, batch 1 and 4, eager and torch.compile'd: milliseconds per full step, per
   partial step at some branches, per null step; the wall-clock speed-up of DeepCache 1:3 and of a schedule of
   the search's segment shape ((full, partial b0, null) x 4) against their MACs speed-up.
3. The quick bench on the default model on the device (its time, and each row's cbFD against the README's
   CPU table: inside that row's interval or not).
Each part is written as it finishes, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from flexdiff.cost import _example_inputs, measure_step_costs  # noqa: E402
from flexdiff.devices import describe, resolve_device, resolve_dtype, synchronize  # noqa: E402
from flexdiff.engine import apply_schedule  # noqa: E402
from flexdiff.samplers import DEFAULT_SCHEDULER_CONFIG  # noqa: E402
from flexdiff.schedule import FULL, NULL, Schedule, partial  # noqa: E402

SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SDXL = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
TINY = {"SD-1.5 (tiny)": dict(SD15, block_out_channels=(32, 32, 64, 64), cross_attention_dim=32, attention_head_dim=4,
                              sample_size=16),
        "SDXL (tiny)": dict(SDXL, block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 1, 2),
                            cross_attention_dim=32, attention_head_dim=(2, 4, 4), sample_size=16,
                            addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32)}
STEPS = 12  # DDIM steps of every timed run


class Report:
    """docs/gpu.md, rewritten after every part."""

    def __init__(self, path: Path, header: str):
        self.path, self.parts = path, [header]

    def add(self, *lines: str) -> None:
        self.parts.append("\n".join(lines))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("\n\n".join(self.parts) + "\n")
        tmp.replace(self.path)
        print(self.parts[-1], flush=True)


def device_tests(device: str, dtypes: list[str]) -> list[str]:
    rows = ["## Device tests", "", "| dtype | result |", "|---|---|"]
    for dtype in dtypes:
        env = dict(os.environ, FLEXDIFF_TEST_DEVICE=device, FLEXDIFF_TEST_DTYPE=dtype)
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_devices.py", "tests/test_compile.py"],
                           cwd=ROOT, env=env, capture_output=True, text=True)
        last = (r.stdout.strip().splitlines() or ["(no output)"])[-1]
        rows.append(f"| {dtype} | {last} |")
    return rows


def _loop(unet, scheduler, schedule, x, kwargs, device):
    """One pipeline-like run (set_timesteps, the denoiser, scheduler.step per step); seconds, synchronized."""
    synchronize(device)
    t0 = time.perf_counter()
    scheduler.set_timesteps(**schedule.pipeline_kwargs())
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = unet(x, t, **kwargs).sample
            x = scheduler.step(eps, t, x).prev_sample
    synchronize(device)
    return time.perf_counter() - t0


def step_times(name: str, cfg: dict, device, dtype, batches, modes, branches_wanted,
               compiled_batches=(1,)) -> list[str]:
    """The step-cost rows of one UNet; compiled only at `compiled_batches` (inductor's compile time dominates a
    GPU check's budget: each (kind, branch) is one graph, made once and reused by every schedule)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg).eval().requires_grad_(False)
    costs = measure_step_costs(unet, cross_attention_len=77)
    nb = len(costs.partial)
    branches = sorted({b for b in branches_wanted if b < nb} | {nb - 1})
    unet.to(device=device, dtype=dtype)
    # a schedule of the search's segment shape: (full, partial at branch 0, null) x 4
    searched = Schedule("ddim", (FULL, partial(0), NULL) * (STEPS // 3))
    runs = {"full": Schedule.full("ddim", STEPS), "null": Schedule("ddim", (FULL,) + (NULL,) * (STEPS - 1))}
    runs.update({f"partial b{b}": Schedule("ddim", (FULL,) + (partial(b),) * (STEPS - 1)) for b in branches})
    runs["DeepCache 1:3 b0"] = Schedule.deepcache("ddim", STEPS, 3, 0)
    runs["segments"] = searched
    rows = [f"### {name}", "", f"{sum(p.numel() for p in unet.parameters()) / 1e6:,.0f} M parameters, "
            f"{describe(device, dtype)}, DDIM-{STEPS} runs, text 77 tokens, one call per step (guidance batched "
            "would double the batch).", "",
            "| batch | mode | full (ms/step) | " + " | ".join(f"partial b{b} (ms)" for b in branches) +
            " | null (ms) | DeepCache 1:3: wall / MACs speed-up | segments (F, P b0, N) x4: wall / MACs speed-up |",
            "|---|---|---|" + "---|" * len(branches) + "---|---|---|"]
    macs = {k: costs.schedule_macs(s) for k, s in runs.items()}
    for batch in batches:
        x0 = torch.randn(batch, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"]).to(device, dtype)
        kw = {k: v for k, v in _example_inputs(unet, 77).items() if k not in ("sample", "timestep")}
        kwargs = {k: (v.expand(batch, *v.shape[1:]) if torch.is_tensor(v) else
                      {a: b.expand(batch, *b.shape[1:]) for a, b in v.items()}) for k, v in kw.items()}
        for mode in modes:
            if mode == "compiled" and batch not in compiled_batches:
                continue
            seconds = {}
            torch._dynamo.reset()
            model = torch.compile(unet) if mode == "compiled" else unet
            for key, sched in runs.items():
                scheduler = DDIMScheduler.from_config(DEFAULT_SCHEDULER_CONFIG, timestep_spacing="trailing")
                pipe = type("Pipe", (), {})()
                pipe.unet, pipe.scheduler = model, scheduler
                with apply_schedule(pipe, sched):
                    _loop(model, scheduler, sched, x0, kwargs, device)  # warm-up (and the graphs it needs)
                    seconds[key] = min(_loop(model, scheduler, sched, x0, kwargs, device) for _ in range(2))
            full = seconds["full"] / STEPS
            per = {k: (seconds[k] - full) / (STEPS - 1) for k in seconds if k.startswith("partial") or k == "null"}

            def ratio(key):
                wall = seconds["full"] / seconds[key]
                m = macs["full"] / macs[key]
                return f"{wall:.2f}x / {m:.2f}x = {wall / m:.2f}"

            rows.append(f"| {batch} | {mode} | {1e3 * full:.2f} | " +
                        " | ".join(f"{1e3 * per[f'partial b{b}']:.2f} ({per[f'partial b{b}'] / full:.0%})" for b in branches) +
                        f" | {1e3 * per['null']:.2f} | {ratio('DeepCache 1:3 b0')} | "
                        f"{ratio('segments')} |")
    return rows


def readme_cbfd() -> dict[str, tuple[float, float]]:
    """The README's quick-bench rows: method -> (cbFD, its 95% half-width)."""
    out, column = {}, None
    for line in (ROOT / "README.md").read_text().splitlines():
        if not line.startswith("|"):
            column = None  # a table ended
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "method":  # a header: the cbFD column is found by its name
            column = cells.index("cbFD") if "cbFD" in cells else None
            continue
        if column is not None and len(cells) > column:
            m = re.fullmatch(r"([\d.]+) ± ([\d.]+)", cells[column])
            if m:
                out[cells[0]] = (float(m.group(1)), float(m.group(2)))
    return out


def quick_bench(device: str, dtype: str, out: Path) -> list[str]:
    t0 = time.perf_counter()
    r = subprocess.run([str(Path(sys.executable).parent / "flexdiff"), "bench", "--preset", "quick", "--device", device,
                        "--dtype", dtype, "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    rows = ["## The quick bench on the device", ""]
    if r.returncode != 0:
        return rows + [f"`flexdiff bench --preset quick --device {device} --dtype {dtype}` failed (exit {r.returncode}):",
                       "", "```", *r.stderr.strip().splitlines()[-5:], "```"]
    bench = json.loads((out / "bench.json").read_text())
    cpu = readme_cbfd()
    rows += [f"`flexdiff bench --preset quick --device {device} --dtype {dtype}`: {seconds / 60:.1f} min in all.", "",
             "| method | cbFD here | README (CPU, float32) | inside the CPU interval |", "|---|---|---|---|"]
    for row in bench.get("rows", []):
        name = row.get("label") or row.get("name")
        here = row.get("metrics", {}).get("cbfd", {}).get("value")
        ref = cpu.get(name)
        inside = "—" if ref is None or here is None else ("yes" if abs(here - ref[0]) <= ref[1] else "no")
        rows.append(f"| {name} | {here if here is None else f'{here:.2f}'} | "
                    f"{'—' if ref is None else f'{ref[0]:.2f} ± {ref[1]:.2f}'} | {inside} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "gpu.md")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16", help="of the UNet timings")
    ap.add_argument("--tiny", action="store_true", help="tiny UNets of the same layouts (to try the script)")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--compiled-models", default="SD-1.5", help="which UNets are also timed compiled")
    ap.add_argument("--compiled-batches", default="1", help="at which batch sizes")
    ap.add_argument("--branches", default="0,2,5", help="partial-step branches to time (and the deepest)")
    ap.add_argument("--test-dtypes", default="float16,bfloat16")
    ap.add_argument("--bench-dtype", default="auto")
    ap.add_argument("--bench", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--tests", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    report = Report(args.out, f"# flexdiff on a GPU\n\nWritten by `make gpu-check` (scripts/gpu_check.py) on {gpu}, "
                              f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}.")
    if args.tests:
        report.add(*device_tests(str(device), args.test_dtypes.split(",")))
    models = TINY if args.tiny else {"SD-1.5": SD15, "SDXL": SDXL}
    report.add("## Step costs", "", "Each partial step's share of a full step is in brackets. Wall / MACs is the "
               "share of the MACs speed-up the device delivers (1.00: all of it).")
    torch._dynamo.config.recompile_limit = 64  # one graph per (kind, branch, slot) over several schedules
    compiled_models = args.compiled_models.split(",")
    for name, cfg in models.items():
        modes = [m for m in args.modes.split(",") if m != "compiled" or any(name.startswith(c) for c in compiled_models)]
        report.add(*step_times(name, cfg, device, dtype, [int(b) for b in args.batches.split(",")], modes,
                               [int(b) for b in args.branches.split(",")],
                               tuple(int(b) for b in args.compiled_batches.split(","))))
    if args.bench:
        report.add(*quick_bench(str(device), args.bench_dtype, ROOT / "runs" / "bench-gpu"))


if __name__ == "__main__":
    main()
