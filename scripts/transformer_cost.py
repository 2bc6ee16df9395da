"""MACs per step kind of SD3- and FLUX-shaped transformers built from their published configs, and CPU wall-clock.

    .venv/bin/python scripts/transformer_cost.py --out runs/transformer-cost            # real sizes (minutes)
    .venv/bin/python scripts/transformer_cost.py --out /tmp/tc --tiny                   # the same code path, seconds

MACs are counted on the real shapes at 1,024 x 1,024 pixels (128 x 128 latents: 4,096 image tokens), with the
text length each pipeline uses (SD3: 77 CLIP + 256 T5 tokens; FLUX.1-dev: 512 T5 tokens), attention included,
by torch's FLOP counter on the meta device (no weights are made: the cost of a network does not depend on its
weights, and FLUX's 12 B parameters would not fit in this machine's memory). SD3 batches classifier-free
guidance (two rows per call); FLUX.1-dev is guidance-distilled (one). Wall-clock: the SD3-medium transformer
with random weights on this CPU at batch 1 and a smaller image (`--wall-size`, latents), a full step against
partial steps at a few branches (best of `--repeats`).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

from flexdiff.anatomy import anatomy
from flexdiff.cost import measure_step_costs
from flexdiff.engine import StepEngine
from flexdiff.io import write_json, write_text
from flexdiff.schedule import FULL, Schedule, partial

SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                  attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                  caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
TINY_SD3 = dict(SD3_MEDIUM, num_layers=6, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                caption_projection_dim=16, pooled_projection_dim=32, sample_size=16, pos_embed_max_size=16)
TINY_FLUX = dict(FLUX_DEV, num_layers=2, num_single_layers=4, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))


def _costs(cls, cfg: dict, text_len: int, guidance: bool, latent_size: int | None = None) -> dict:
    with torch.device("meta"):
        model = cls(**cfg).eval().requires_grad_(False)
    anat = anatomy(model)
    params = sum(p.numel() for p in model.parameters())
    if latent_size is not None:  # FLUX: the latents the costs are counted at
        model.flexdiff_latent_size = latent_size
    c = measure_step_costs(model, guidance=guidance, cross_attention_len=text_len)
    return dict(name=cls.__name__, params=params, blocks=anat.depth, text_tokens=text_len,
                full=c.full * c.guidance_factor, guidance_factor=c.guidance_factor,
                partial=[dict(branch=b, first=anat.branches[b][0], last=anat.branches[b][1],
                              macs=m * c.guidance_factor) for b, m in enumerate(c.partial)])


def _wall(cfg: dict, size: int, text_len: int, branches: list[int], repeats: int) -> list[dict]:
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**{**cfg, "sample_size": size}).eval().requires_grad_(False)
    anat = anatomy(model)
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(2, cfg["in_channels"], size, size, generator=g),
              encoder_hidden_states=torch.randn(2, text_len, cfg["joint_attention_dim"], generator=g),
              pooled_projections=torch.randn(2, cfg["pooled_projection_dim"], generator=g),
              timestep=torch.tensor([500.0, 500.0]))
    rows = []
    for b in [None] + branches:
        best = float("inf")
        sched = Schedule("flow-euler", (FULL,) if b is None else (FULL, partial(b)))
        for _ in range(repeats):
            with torch.no_grad(), StepEngine(model, sched):
                if b is not None:
                    model(**kw)  # the full step that fills the cache
                t0 = time.perf_counter()
                model(**kw)
                best = min(best, time.perf_counter() - t0)
        rows.append(dict(kind="full" if b is None else f"partial {b}",
                         blocks="all" if b is None else f"first {anat.branches[b][0]} + last {anat.branches[b][1]}",
                         seconds=best))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true", help="small models of the same layouts (to try the script)")
    ap.add_argument("--wall-size", type=int, default=32, help="latent side for the wall-clock runs (32: 256 px)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    sd3, flux = (TINY_SD3, TINY_FLUX) if args.tiny else (SD3_MEDIUM, FLUX_DEV)
    sd3_text, flux_text = (8, 8) if args.tiny else (77 + 256, 512)
    rows = [_costs(SD3Transformer2DModel, sd3, sd3_text, guidance=True),
            _costs(FluxTransformer2DModel, flux, flux_text, guidance=False, latent_size=16 if args.tiny else 128)]
    wall_size = 8 if args.tiny else args.wall_size
    wall = _wall(sd3, wall_size, sd3_text, [0, 9] if not args.tiny else [0, 2], args.repeats)
    full_s = wall[0]["seconds"]
    lines = ["# Transformer costs per step kind (flexdiff scripts/transformer_cost.py)", "",
             f"Machine: {platform.machine()}, {args.threads} torch threads. MACs per image per step at 1,024 x 1,024 "
             "(4,096 image tokens), counted by torch's FLOP counter on the meta device; classifier-free guidance "
             "counted where the pipeline batches it (SD3: x2).", ""]
    for r in rows:
        lines += [f"## {r['name']} ({r['params'] / 1e9:.2f} B parameters, {r['blocks']} blocks, "
                  f"{r['text_tokens']} text tokens, guidance x{r['guidance_factor']})", "",
                  "| step | blocks run | G MACs | of full |", "|---|---|---|---|",
                  f"| full | all {r['blocks']} | {r['full'] / 1e9:,.0f} | 100% |"]
        lines += [f"| partial {p['branch']} | first {p['first']} + last {p['last']} | {p['macs'] / 1e9:,.0f} | "
                  f"{100 * p['macs'] / r['full']:.0f}% |" for p in r["partial"]]
        lines += ["| null | none | 0 | 0% |", ""]
    lines += [f"## Wall-clock: SD3-medium transformer, {wall_size * 8} px ({wall_size} x {wall_size} latents), batch 1 "
              "with guidance (2 rows), random weights, this CPU", "",
              "| step | blocks run | seconds | of full |", "|---|---|---|---|"]
    lines += [f"| {w['kind']} | {w['blocks']} | {w['seconds']:.2f} | {100 * w['seconds'] / full_s:.0f}% |" for w in wall]
    write_text(args.out / "transformer_cost.md", "\n".join(lines) + "\n")
    write_json(args.out / "transformer_cost.json", dict(costs=rows, wall=wall, wall_size=wall_size,
                                                        threads=args.threads, tiny=args.tiny))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
