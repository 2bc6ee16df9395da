"""What a schedule saves on a Stable-Diffusion-1.5-shaped UNet, on this CPU: time, not quality.

    .venv/bin/python scripts/sd15_cost.py --out runs/sd15-cost          # full size (about 10 minutes on 2 cores)
    .venv/bin/python scripts/sd15_cost.py --out /tmp/sd15 --tiny        # the same code path, in seconds

Builds the SD-1.5 UNet from its config (random weights: nothing is downloaded; the cost of a
network does not depend on its weights), 64x64 latents, CLIP-length (77 x 768) text conditioning
with classifier-free guidance (two branches per call, as the SD pipeline batches them). Writes the
MACs of a full step and of a partial step at every branch, and the wall-clock of DDIM-N against a
DeepCache-like schedule (a full step every 3, partial steps at branch 0 between) at batch 1 and 4.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from flexdiff.cost import measure_step_costs
from flexdiff.io import write_json, write_text
from flexdiff.samplers import DEFAULT_SCHEDULER_CONFIG
from flexdiff.sampling import Conditioning, initial_noise, sample
from flexdiff.schedule import Schedule

SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
TINY = dict(SD15, block_out_channels=(32, 32, 64, 64), cross_attention_dim=32, attention_head_dim=4, sample_size=16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=10, help="DDIM steps of both runs")
    ap.add_argument("--every", type=int, default=3, help="the DeepCache-like schedule: a full step every N")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="a small UNet of the same layout (to try the script)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = TINY if args.tiny else SD15
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg).eval().requires_grad_(False)
    params = sum(p.numel() for p in unet.parameters())
    text_len, dim = 77, cfg["cross_attention_dim"]

    t0 = time.perf_counter()
    costs = measure_step_costs(unet, guidance=True, cross_attention_len=text_len)
    count_seconds = time.perf_counter() - t0
    plain = Schedule.full("ddim", args.steps)
    cached = Schedule.deepcache("ddim", args.steps, args.every, 0)
    timings = []
    for batch in (int(b) for b in args.batches.split(",")):
        noise = initial_noise(batch, (4, cfg["sample_size"], cfg["sample_size"]), 0)
        cond = Conditioning(encoder_hidden_states=torch.randn(1, text_len, dim), negative=torch.zeros(1, text_len, dim),
                            guidance_scale=7.5)
        row = dict(batch=batch)
        for name, sched in (("plain", plain), ("deepcache", cached)):
            r = sample(unet, dict(DEFAULT_SCHEDULER_CONFIG), sched, noise, batch_size=batch, cond=cond)
            row[f"{name}_s"] = r.seconds
            print(f"batch {batch}, {sched.describe()}: {r.seconds:.1f} s", flush=True)
        row["speedup_wall"] = row["plain_s"] / row["deepcache_s"]
        timings.append(row)
    speedup_macs = costs.schedule_macs(plain) / costs.schedule_macs(cached)
    result = dict(config="tiny" if args.tiny else "SD-1.5", parameters=params, latent=(4, cfg["sample_size"], cfg["sample_size"]),
                  text=(text_len, dim), guidance=True, threads=args.threads, cpu=platform.processor() or platform.machine(),
                  step_costs=costs.to_dict(), macs_count_seconds=count_seconds, plain=plain.describe(),
                  cached=cached.describe(), speedup_macs=speedup_macs, timings=timings)
    write_json(args.out / "sd15_cost.json", result)
    lines = [f"{result['config']} UNet ({params / 1e6:,.0f} M parameters, random weights), latents "
             f"4x{cfg['sample_size']}x{cfg['sample_size']}, text {text_len}x{dim}, guidance (2 branches per call), "
             f"{args.threads} torch threads.", "",
             "| step | GMACs per image (both guidance branches) | share of a full step |", "|---|---|---|",
             f"| full | {costs.full * costs.guidance_factor / 1e9:,.1f} | 100% |"]
    lines += [f"| partial, branch {b} | {p * costs.guidance_factor / 1e9:,.1f} | {p / costs.full:.1%} |"
              for b, p in enumerate(costs.partial)]
    lines += ["", f"{cached.describe()} against {plain.describe()}: {speedup_macs:.2f}x fewer MACs.", "",
              "| batch | plain (s) | DeepCache-like (s) | wall-clock speed-up |", "|---|---|---|---|"]
    lines += [f"| {t['batch']} | {t['plain_s']:.1f} | {t['deepcache_s']:.1f} | {t['speedup_wall']:.2f}x |"
              for t in timings]
    write_text(args.out / "sd15_cost.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
