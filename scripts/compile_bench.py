"""Eager against torch.compile on the default model: the teacher and searched schedules, wall-clock beside MACs.

    .venv/bin/python scripts/compile_bench.py --out runs/compile-bench            # about 10 minutes on 2 cores
    .venv/bin/python scripts/compile_bench.py --out /tmp/cb --batch 8 --quick     # the same code, in a minute

Each schedule runs on the same noise through flexdiff's engine and sampling loop, once eager and once with
the UNet compiled (torch.compile, inductor); a warm-up batch (which compiles) is run first and not timed.
Each schedule is applied to a freshly compiled UNet (the engine hooks the module it wraps), so each (kind,
branch) the schedule uses is one graph, made at its warm-up. Writes compile_bench.md / .json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from flexdiff.cost import measure_step_costs, timing_machine
from flexdiff.devices import placement, synchronize
from flexdiff.engine import StepEngine
from flexdiff.io import write_json, write_text
from flexdiff.models import load_model
from flexdiff.samplers import make_scheduler, set_timesteps
from flexdiff.sampling import _sample_batch, initial_noise, null_conditioning
from flexdiff.schedule import Schedule

ROOT = Path(__file__).resolve().parents[1]
SEARCHED = ("flexiffusion-distance-16x", "flexiffusion-fid-25x", "autodiffusion-25x")


def timed(unet, scheduler_config, sched, noise, cond, batch, repeats):
    """Seconds per image of `sched` over `noise` (after one untimed warm-up batch), and the images."""
    scheduler = make_scheduler(sched.sampler, scheduler_config)
    device = placement(unet)[0]
    with StepEngine(unet, sched, scheduler) as engine:
        set_timesteps(scheduler, sched)
        _sample_batch(unet, scheduler, engine, noise[:batch], cond)  # warm-up: compiles the graphs
        best, images = float("inf"), None
        for _ in range(repeats):
            synchronize(device)
            t0 = time.perf_counter()
            outs = []
            for start in range(0, len(noise), batch):
                set_timesteps(scheduler, sched)
                outs.append(_sample_batch(unet, scheduler, engine, noise[start:start + batch], cond))
            synchronize(device)
            best, images = min(best, time.perf_counter() - t0), torch.cat(outs)
    return best / len(noise), images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="teacher DDIM-20 and one searched schedule")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model()
    unet = model.unet
    costs = measure_step_costs(unet)
    teacher = Schedule.full("ddim", 20 if args.quick else 100, name="teacher")
    schedules = [teacher, Schedule.deepcache("ddim", teacher.num_steps, 3, 0, name="DeepCache 1:3 b0")]
    schedules += [Schedule.load(ROOT / "docs" / "schedules" / f"{n}.json") for n in SEARCHED[:1 if args.quick else None]]
    noise = initial_noise(args.samples, (1, 16, 16), seed=0)
    cond = null_conditioning(unet)
    rows = []
    for sched in schedules:
        eager_s, eager_images = timed(unet, model.scheduler_config, sched, noise, cond, args.batch, args.repeats)
        torch._dynamo.reset()  # each schedule compiled afresh, as a user running one schedule would
        counters.clear()
        comp_s, comp_images = timed(torch.compile(unet), model.scheduler_config, sched, noise, cond, args.batch,
                                    args.repeats)
        rows.append(dict(name=sched.name or sched.describe(), schedule=sched.describe(),
                         macs=costs.schedule_macs(sched), eager_s=eager_s, compiled_s=comp_s,
                         graph_breaks=sum(counters["graph_break"].values()),
                         max_diff=float((eager_images - comp_images).abs().max())))
        print(rows[-1], flush=True)
    base = rows[0]
    for r in rows:
        r["speedup_macs"] = base["macs"] / r["macs"]
        r["speedup_wall_eager"] = base["eager_s"] / r["eager_s"]
        r["speedup_wall_compiled"] = base["compiled_s"] / r["compiled_s"]
    args.out.mkdir(parents=True, exist_ok=True)
    result = dict(machine=timing_machine(*placement(unet)), samples=args.samples, batch=args.batch,
                  torch=torch.__version__, rows=rows)
    write_json(args.out / "compile_bench.json", result)
    lines = [f"Default model, {args.samples} samples at batch {args.batch}, {args.threads} torch threads, "
             f"torch {torch.__version__}; ms per image, best of {args.repeats} after a warm-up batch.", "",
             "| schedule | MACs speed-up | eager ms | compiled ms | compiled / eager | wall speed-up (compiled) "
             "| wall / MACs (compiled) | wall / MACs (eager) | graph breaks | max abs diff |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} ({r['schedule']}) | {r['speedup_macs']:.2f}x | {1e3 * r['eager_s']:.2f} | "
                     f"{1e3 * r['compiled_s']:.2f} | {r['eager_s'] / r['compiled_s']:.2f}x faster | "
                     f"{r['speedup_wall_compiled']:.2f}x | {r['speedup_wall_compiled'] / r['speedup_macs']:.2f} | "
                     f"{r['speedup_wall_eager'] / r['speedup_macs']:.2f} | {r['graph_breaks']} | {r['max_diff']:.1e} |")
    write_text(args.out / "compile_bench.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
