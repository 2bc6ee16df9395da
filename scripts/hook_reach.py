"""Where diffusers' cache hooks land on a model: the MACs speed-up each setting reaches, counted from the calls that
ran (flexdiff.bench.peers, the bench's own runner), so the bench's hook settings can be chosen near its budgets.

    .venv/bin/python scripts/hook_reach.py --model default-transformer --out runs/hook-reach
    .venv/bin/python scripts/hook_reach.py --model runs/default-transformer --grid "fbc:0.1,fbc:0.3,magcache:0.3"

Writes hook_reach.json and hook_reach.md: per hook and setting, the fraction of the plain run's MACs (flow Euler
over `--steps`, every call full) that ran, its spread over batches, and the speed-up. A hook that cannot run on the
model is listed with diffusers' reason.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from flexdiff.anatomy import noise_shape
from flexdiff.bench.methods import parse_hook_peers
from flexdiff.bench.peers import PEER_KINDS, HookPeer, PeerRunner
from flexdiff.cost import measure_step_costs
from flexdiff.errors import FlexdiffError
from flexdiff.io import write_json, write_text
from flexdiff.models import load_model
from flexdiff.sampling import initial_noise, null_conditioning

# the settings of docs/bench.md's reach table
DEFAULT_GRID = ",".join([f"fbc:{v}" for v in (0.05, 0.1, 0.2, 0.3, 0.5)] + [f"taylorseer:{v}" for v in (4, 8, 16)]
                        + [f"magcache:{v}" for v in (0.1, 0.3, 0.6)] + [f"pab:{v}" for v in (2, 4, 8)]
                        + [f"fastercache:{v}" for v in (2, 4, 8)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a model folder or a named model (default-transformer)")
    ap.add_argument("--grid", default=DEFAULT_GRID, help="KIND:SETTING,... as the bench's --hooks (default: the docs' table)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--sampler", default="flow-euler")
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--out", type=Path, default=Path("runs/hook-reach"))
    args = ap.parse_args()
    try:
        grid = parse_hook_peers(args.grid, "--grid")
        model = load_model(args.model)
    except FlexdiffError as e:
        raise SystemExit(f"error: {e}") from None

    full = measure_step_costs(model.unet).full * args.steps
    noise = initial_noise(args.samples, noise_shape(model.unet), args.seed)
    runner = PeerRunner(model, noise, null_conditioning(model.unet), args.batch_size)
    rows = []
    for kind, value in grid:
        peer = HookPeer(kind, value, args.steps, args.sampler)
        try:
            r = runner.run(peer)
        except FlexdiffError as e:
            rows.append(dict(hook=kind, setting=value, name=peer.name, reason=str(e)))
            print(f"{peer.name}: cannot run ({e})", flush=True)
            continue
        t = torch.tensor(r.macs, dtype=torch.float64) / full
        mean = float(t.mean())
        rows.append(dict(hook=kind, setting=value, name=peer.name, fraction=mean, fraction_min=float(t.min()),
                         fraction_max=float(t.max()), speedup=1 / mean))
        print(f"{peer.name}: {mean:.3f} of the MACs, {1 / mean:.2f}x", flush=True)

    result = dict(model=str(model.path), sampler=args.sampler, steps=args.steps, samples=args.samples,
                  batch_size=args.batch_size, seed=args.seed, full_run_macs=full, rows=rows)
    write_json(args.out / "hook_reach.json", result)
    lines = [f"diffusers' hooks on `{model.path}`: {args.sampler}-{args.steps}, {args.samples} samples (batches of "
             f"{args.batch_size}), MACs counted from the calls that ran, against {args.steps} full calls.", "",
             "| hook | setting | MACs fraction (batch range) | speed-up |", "|---|---|---|---|"]
    for row in rows:
        label, what = PEER_KINDS[row["hook"]][:2]
        if "reason" in row:
            lines.append(f"| {label} | {what} {row['setting']:g} | cannot run: {row['reason']} | |")
        else:
            lines.append(f"| {label} | {what} {row['setting']:g} | {row['fraction']:.3f} ({row['fraction_min']:.3f}"
                         f"–{row['fraction_max']:.3f}) | {row['speedup']:.2f}x |")
    write_text(args.out / "hook_reach.md", "\n".join(lines) + "\n")
    print(f"-> {args.out / 'hook_reach.md'}")


if __name__ == "__main__":
    main()
