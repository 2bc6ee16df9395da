"""Is a default model converged? The model card's check, from a training run with snapshots.

    .venv/bin/python scripts/convergence.py --run runs/default-cond --ship 6000 --extended 9000
    .venv/bin/python scripts/convergence.py --run runs/default-transformer --ship 6000 --extended 9000 \
        --out runs/convergence-transformer

The run must have been trained with `--lr-schedule constant --snapshot-every N` (see the model
card). The check: the model at `--extended` steps (50% more training) against the one at
`--ship`, on the same initial noise (the model's teacher: DDIM-100, or flow Euler-100 on a flow-matching
model; unconditional), in the headline metric (cbFD) and the classic FID. Converged = the paired
difference's 95% interval contains 0 and the change is within the shipped model's own interval; and the
shipped model's step ladder separates: its teacher is better than its own 20-step run (paired cbFD
separated below 0) and 5, 10, 20 steps get better in turn. Also writes the loss curve and the cbFD of every
snapshot (20 steps, fewer samples: the trend, not the verdict).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from flexdiff.anatomy import noise_shape
from flexdiff.io import load_checkpoint, save_figure, write_json, write_text
from flexdiff.metrics import QualityMeter
from flexdiff.models import load_model
from flexdiff.sampling import initial_noise, sample
from flexdiff.schedule import Schedule

LADDER = (5, 10, 20)  # step counts the shipped model's teacher must beat in turn


def _half(e) -> float:
    return (e.hi - e.lo) / 2


def _run_record(run: Path) -> tuple[list[float], float]:
    """The run's loss curve and training time so far. losses.json and training_summary.json are written when a
    run finishes; a run that was stopped and resumed with a larger --steps has more in its checkpoint."""
    losses = json.loads((run / "losses.json").read_text()) if (run / "losses.json").exists() else []
    summary = json.loads((run / "training_summary.json").read_text()) if (run / "training_summary.json").exists() else {}
    wall = float(summary.get("wall_time_s", 0.0))
    if (run / "checkpoint.pt").exists():
        ck = load_checkpoint(run / "checkpoint.pt")
        if isinstance(ck, dict) and len(ck.get("losses", ())) > len(losses):  # a flexdiff training checkpoint
            losses, wall = list(ck["losses"]), float(ck.get("elapsed", wall))
    return losses, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--ship", type=int, required=True)
    ap.add_argument("--extended", type=int, required=True)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--curve-samples", type=int, default=500)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, default=Path("runs/convergence"))
    ap.add_argument("--n-boot", type=int, default=200, help="bootstrap draws per interval")
    args = ap.parse_args()

    snap = lambda step: args.run / "snapshots" / f"step-{step:06d}"  # noqa: E731
    shipped = load_model(snap(args.ship))
    shape = noise_shape(shipped.unet)
    meter = QualityMeter.for_model(shape, n_boot=args.n_boot)
    noise = initial_noise(args.samples, shape, args.seed)
    sampler = Schedule.teacher(shipped.scheduler_config).sampler
    feats = {}
    for step in (args.ship, args.extended):
        m = shipped if step == args.ship else load_model(snap(step))
        feats[step] = meter.features(sample(m.unet, m.scheduler_config, Schedule.full(sampler, 100), noise).images)
    ladder = {}  # the shipped model at fewer steps, on the same noise
    for n in LADDER:
        images = sample(shipped.unet, shipped.scheduler_config, Schedule.full(sampler, n), noise).images
        ladder[n] = meter.features(images)
    ladder_vs_teacher = {n: meter.paired(feats[args.ship], ladder[n]) for n in LADDER}  # teacher − n steps
    ladder_cbfd = {n: meter.report(ladder[n], kid=False)["cbfd"] for n in LADDER}
    ship, ext = (meter.report(feats[s], kid=False) for s in (args.ship, args.extended))
    paired = meter.paired(feats[args.extended], feats[args.ship])
    from flexdiff.metrics.fid import paired_fid_difference

    cols = meter.fid_columns
    paired_fid = paired_fid_difference(feats[args.extended][:, cols], feats[args.ship][:, cols],
                                       meter.reference[:, cols], meter.n_boot)
    # the verdict's two halves, also reported on their own: 50% more training changes nothing, and the step ladder
    # (a flow model's near-straight paths can reach the teacher in 20 steps however long it trains, so the largest
    # rung the teacher is separated from is reported too)
    training = dict(
        cbfd_change_within_interval=bool(abs(ext["cbfd"].value - ship["cbfd"].value) <= _half(ship["cbfd"])),
        paired_cbfd_contains_zero=bool(paired.lo <= 0 <= paired.hi),
        fid_change_within_interval=bool(abs(ext["fid"].value - ship["fid"].value) <= _half(ship["fid"])),
        paired_fid_contains_zero=bool(paired_fid.lo <= 0 <= paired_fid.hi),
    )
    checks = dict(
        **training,
        teacher_better_than_its_20_step_run=bool(ladder_vs_teacher[20].hi < 0),
        step_ladder_improves=bool(all(ladder_cbfd[a].value > ladder_cbfd[b].value for a, b in zip(LADDER, LADDER[1:]))),
    )
    training_converged = all(training.values())
    separated = max((n for n in LADDER if ladder_vs_teacher[n].hi < 0), default=None)

    # the trend over every snapshot, and the loss curve
    steps = sorted(int(p.name.split("-")[1]) for p in (args.run / "snapshots").glob("step-*"))
    small = noise[:args.curve_samples]
    previous = {}  # snapshots never change: reuse the points an earlier run of this check measured the same way
    old_file = args.out / "convergence.json"
    if old_file.exists():
        old = json.loads(old_file.read_text())
        if (old.get("seed"), old.get("curve_samples")) == (args.seed, args.curve_samples):
            previous = {c["step"]: c for c in old.get("curve", [])}
    curve = []
    for step in steps:
        if step in previous:
            curve.append(previous[step])
            continue
        m = load_model(snap(step))
        f = meter.features(sample(m.unet, m.scheduler_config, Schedule.full(sampler, 20), small).images)
        curve.append(dict(step=step, cbfd=meter.report(f, kid=False)["cbfd"].to_dict()))
    losses, wall = _run_record(args.run)

    result = dict(ship=args.ship, extended=args.extended, samples=args.samples, seed=args.seed,
                  shipped={k: v.to_dict() for k, v in ship.items()}, extended_metrics={k: v.to_dict() for k, v in ext.items()},
                  paired_cbfd_extended_minus_ship=paired.to_dict(), paired_fid_extended_minus_ship=paired_fid.to_dict(),
                  ladder={n: dict(cbfd=ladder_cbfd[n].to_dict(), teacher_minus_this=ladder_vs_teacher[n].to_dict())
                          for n in LADDER},
                  checks=checks, converged=all(checks.values()), training_converged=training_converged,
                  teacher_separated_up_to=separated, curve=curve, curve_samples=args.curve_samples,
                  wall_time_s=wall, total_steps=len(losses))
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "convergence.json", result)

    def fmt(e):
        return f"{e.value:.2f} ± {_half(e):.2f}"

    # a run continued from a shipped model (--init-from) ships at its step 0: its extra training has no percentage
    more = f"+{100 * (args.extended - args.ship) / args.ship:.0f}%" if args.ship else f"+{args.extended} steps"
    md = [f"{sampler}-100, unconditional, {args.samples} samples on the same noise (seed {args.seed}), 95% intervals.",
          "",
          "| model | cbFD | FID (penultimate) | class TV |", "|---|---|---|---|",
          f"| step {args.ship} (shipped) | {fmt(ship['cbfd'])} | {fmt(ship['fid'])} | {fmt(ship['class_tv'])} |",
          f"| step {args.extended} ({more}) | {fmt(ext['cbfd'])} "
          f"| {fmt(ext['fid'])} | {fmt(ext['class_tv'])} |", "",
          f"Paired, step {args.extended} − step {args.ship}: cbFD {fmt(paired)}, FID {fmt(paired_fid)}.", "",
          f"The shipped model's step ladder ({sampler}, same noise): "
          + "; ".join(f"{n} steps cbFD {fmt(ladder_cbfd[n])}, teacher − this {fmt(ladder_vs_teacher[n])}"
                      for n in LADDER) + ".", ""]
    md += [f"- {k.replace('_', ' ')}: {'yes' if v else 'NO'}" for k, v in checks.items()]
    md += ["", f"Training converged (50% more training moves neither metric): {'yes' if training_converged else 'NO'}. "
           + (f"The teacher is separated better than its own runs of up to {separated} steps."
              if separated else "The teacher is not separated better than any rung of the ladder."),
           "", f"Converged: {'yes' if result['converged'] else 'NO'}."]
    write_text(args.out / "convergence.md", "\n".join(md) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    w = max(1, min(100, len(losses)))
    smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
    a.plot(np.arange(len(losses)), losses, color="lightgray", lw=0.5, label="per step")
    a.plot(np.arange(w - 1, len(losses)), smooth, color="black", lw=1, label=f"mean of {w}")
    a.set_ylim(0, max(0.06, float(np.percentile(losses, 99))))
    a.set_xlabel("step")
    a.set_ylabel("training loss (MSE on ε)" if sampler == "ddim" else "training loss (MSE on the velocity)")
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
    ys = [c["cbfd"]["value"] for c in curve]
    err = [[c["cbfd"]["value"] - c["cbfd"]["lo"] for c in curve], [c["cbfd"]["hi"] - c["cbfd"]["value"] for c in curve]]
    b.errorbar(steps, ys, yerr=err, fmt="o-", capsize=3)
    for s in (args.ship, args.extended):
        b.axvline(s, color="gray", ls="--", lw=0.8)
    b.set_xlabel("step (EMA snapshot)")
    b.set_ylabel(f"cbFD, {sampler}-20, {args.curve_samples} samples")
    b.grid(alpha=0.3)
    fig.suptitle("Default model training: loss and sample quality")
    save_figure(args.out / "training.png", fig)
    print("\n".join(md))


if __name__ == "__main__":
    main()
