"""Eager against torch.compile: the teacher, static caches, searched schedules and (on a transformer) diffusers'
cache hooks, wall-clock beside MACs, with the graph breaks and recompiles each one causes.

    .venv/bin/python scripts/compile_bench.py --out runs/compile-bench            # the UNet default, ~8 min
    .venv/bin/python scripts/compile_bench.py --model default-transformer --hook-steps 50 \\
        --hooks fbc:0.15,taylorseer:4,magcache:0.2,pab:2,fastercache:2 \\
        --schedule runs/bench-transformer/searches/<search>/best_schedule.json --out runs/compile-transformer
    .venv/bin/python scripts/compile_bench.py --out /tmp/cb --batch 8 --samples 16 --quick   # the same code, fast

Each row runs on the same noise through flexdiff's sampling loop, once eager and once with the denoiser compiled
(torch.compile, inductor); a warm-up batch (which compiles) runs first and is not timed. Each row gets a fresh
compile (`torch._dynamo.reset()`), as a user running one schedule would. Graph breaks are dynamo's count over the
row; recompiles are the graphs dynamo made *after* the warm-up batch (0: the warm-up compiled everything the run
needs). A hook's MACs are counted from what ran on the warm-up batch (torch's FLOP counter, eager). Writes
compile_bench.md / .json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch._dynamo
from torch._dynamo.utils import counters
from torch.utils.flop_counter import FlopCounterMode

from flexdiff.anatomy import call_anatomy, is_transformer, noise_shape
from flexdiff.bench.methods import parse_hook_peers
from flexdiff.bench.peers import HookPeer, _hooked_copy, _reset, calibrate_magcache
from flexdiff.cost import measure_step_costs, timing_machine
from flexdiff.devices import placement, synchronize
from flexdiff.engine import StepEngine
from flexdiff.io import write_json, write_text
from flexdiff.models import load_model
from flexdiff.samplers import default_sampler, make_scheduler, set_timesteps
from flexdiff.sampling import _sample_batch, initial_noise, null_conditioning, sample
from flexdiff.schedule import Schedule

ROOT = Path(__file__).resolve().parents[1]
SEARCHED = ("flexiffusion-distance-16x", "flexiffusion-fid-25x", "autodiffusion-25x")  # the UNet default's


def _unique_graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def timed(model, scheduler_config, sched, noise, cond, batch, repeats, before_batch=lambda: None):
    """(seconds per image of `sched` over `noise`, the images, graphs made after the warm-up batch). One engine
    for the warm-up and the timed batches, as one `sample` call or one `apply_schedule` block has (a new engine
    re-registers its hooks, which compiles once more: docs/compile.md)."""
    device = placement(model)[0]
    scheduler = make_scheduler(sched.sampler, scheduler_config)
    tokens = call_anatomy(model).image_tokens(tuple(noise.shape[1:]))
    with StepEngine(model, sched, scheduler) as engine:
        def run(start):
            before_batch()
            set_timesteps(scheduler, sched, tokens)
            part = cond.rows(start, start + batch) if cond is not None else None
            return _sample_batch(model, scheduler, engine, noise[start:start + batch], part)

        run(0)  # warm-up: compiles the graphs
        warm = _unique_graphs()
        best, images = float("inf"), None
        for _ in range(repeats):
            synchronize(device)
            t0 = time.perf_counter()
            outs = [run(s) for s in range(0, len(noise), batch)]
            synchronize(device)
            best, images = min(best, time.perf_counter() - t0), torch.cat(outs)
    return best / len(noise), images, _unique_graphs() - warm


def _row(name, schedule_text, macs, eager, compiled, error=None):
    row = dict(name=name, schedule=schedule_text, macs=macs, error=error)
    if compiled is not None:
        (eager_s, eager_images, _), (comp_s, comp_images, recompiles) = eager, compiled
        row.update(eager_s=eager_s, compiled_s=comp_s, graph_breaks=sum(counters["graph_break"].values()),
                   recompiles=recompiles, max_diff=float((eager_images - comp_images).abs().max()))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default=None, help="a model folder or 'default-transformer' (default: the UNet)")
    ap.add_argument("--schedule", type=Path, action="append", default=[], help="a searched schedule (repeatable)")
    ap.add_argument("--hooks", default="", help="diffusers' cache hooks, KIND:SETTING,... (transformers)")
    ap.add_argument("--hook-steps", type=int, default=50)
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a 20-step teacher and one searched schedule")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    model, config = loaded.unet, loaded.scheduler_config
    costs = measure_step_costs(model)
    base = default_sampler(config)
    teacher = Schedule.full(base, 20 if args.quick else 100, name="teacher")
    is_unet = not is_transformer(model)
    cut = 0 if is_unet else len(costs.partial) // 2  # the transformer: a middle cut, FORA-style
    schedules = [teacher, Schedule.deepcache(base, teacher.num_steps, 3, cut,
                                             name=f"{'DeepCache' if is_unet else 'FORA-style'} 1:3")]
    files = args.schedule or ([ROOT / "docs" / "schedules" / f"{n}.json" for n in SEARCHED] if args.model is None else [])
    schedules += [Schedule.load(f) for f in files[:1 if args.quick else None]]
    noise = initial_noise(args.samples, noise_shape(model), seed=0)
    cond = null_conditioning(model)
    rows = []
    for sched in schedules:
        eager = timed(model, config, sched, noise, cond, args.batch, args.repeats)
        torch._dynamo.reset()
        counters.clear()
        compiled = timed(torch.compile(model), config, sched, noise, cond, args.batch, args.repeats)
        rows.append(_row(sched.name or sched.describe(), sched.describe(), costs.schedule_macs(sched), eager, compiled))
        print(rows[-1], flush=True)
    peers = [HookPeer(k, s, args.hook_steps, base) for k, s in parse_hook_peers(args.hooks)] if args.hooks else []
    for peer in peers:
        first = cond.rows(0, args.batch) if cond is not None else None
        try:
            ratios = calibrate_magcache(model, config, peer, noise[:args.batch], first) if peer.kind == "magcache" \
                else None
            hooked = _hooked_copy(model, peer, ratios)
            with FlopCounterMode(display=False) as counter:
                _reset(hooked)
                sample(hooked, config, peer.base, noise[:args.batch], batch_size=args.batch, cond=first)
            macs = counter.get_total_flops() / 2 / min(args.batch, len(noise))
            eager = timed(hooked, config, peer.base, noise, cond, args.batch, args.repeats, lambda: _reset(hooked))
            torch._dynamo.reset()
            counters.clear()
            compiled = timed(torch.compile(hooked), config, peer.base, noise, cond, args.batch, args.repeats,
                             lambda: _reset(hooked))
            rows.append(_row(peer.name, "run-time cache", macs, eager, compiled))
        except Exception as e:  # listed with the reason, not dropped
            rows.append(_row(peer.name, "run-time cache", None, None, None,
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
        print(rows[-1], flush=True)
    ref = rows[0]
    for r in rows:
        if r.get("compiled_s") is not None:
            r["speedup_macs"] = ref["macs"] / r["macs"]
            r["speedup_wall_eager"] = ref["eager_s"] / r["eager_s"]
            r["speedup_wall_compiled"] = ref["compiled_s"] / r["compiled_s"]
    args.out.mkdir(parents=True, exist_ok=True)
    result = dict(model=str(loaded.path), machine=timing_machine(*placement(model)), samples=args.samples,
                  batch=args.batch, threads=args.threads, torch=torch.__version__, rows=rows)
    write_json(args.out / "compile_bench.json", result)
    lines = [f"{type(model).__name__} ({loaded.path.name}), {args.samples} samples at batch {args.batch}, "
             f"{args.threads} torch threads, torch {torch.__version__}; ms per image, best of {args.repeats} after a "
             "warm-up batch; recompiles: graphs made after the warm-up batch.", "",
             "| method | MACs speed-up | eager ms | compiled ms | compiled / eager | wall speed-up (compiled) "
             "| wall / MACs (compiled) | wall / MACs (eager) | graph breaks | recompiles | max abs diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("compiled_s") is None:
            lines.append(f"| {r['name']} | could not run: {r['error']} |||||||||")
            continue
        lines.append(f"| {r['name']} ({r['schedule']}) | {r['speedup_macs']:.2f}x | {1e3 * r['eager_s']:.2f} | "
                     f"{1e3 * r['compiled_s']:.2f} | {r['eager_s'] / r['compiled_s']:.2f}x faster | "
                     f"{r['speedup_wall_compiled']:.2f}x | {r['speedup_wall_compiled'] / r['speedup_macs']:.2f} | "
                     f"{r['speedup_wall_eager'] / r['speedup_macs']:.2f} | {r['graph_breaks']} | {r['recompiles']} "
                     f"| {r['max_diff']:.1e} |")
    write_text(args.out / "compile_bench.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
