"""Does the quality metric rank? The validity study of docs/metrics.md (`flexdiff metric-study`).

Three checks, for the headline metric and for the classic FID side by side:
(a) the floor: the real test split against the reference (the train split);
(b) monotone response to known degradations of the test split (Gaussian noise, Gaussian blur)
    and to the sampler's step count (DDIM 5 ... 100 on the same initial noise), each level
    separated from the next by its 95% interval; for DDIM also the paired difference of
    consecutive levels (same noise);
(c) the interval half-width at the main job's sample count against the DDIM-20 vs DDIM-50 gap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..anatomy import noise_shape
from ..io import save_figure, write_json, write_text
from . import QualityMeter
from .fid import Estimate

NOISE_LEVELS = (0.05, 0.1, 0.2)
BLUR_LEVELS = (0.5, 0.75, 1.0)
DDIM_STEPS = (5, 10, 20, 50, 100)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflected borders (radius 3 sigma)."""
    r = max(1, int(round(3 * sigma)))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=x.dtype) ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def add_noise(x: torch.Tensor, sigma: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(-1, 1)


@dataclass
class Level:
    group: str
    name: str
    value: float  # the level's knob (sigma, steps)
    metrics: dict[str, Estimate]


def _separated(a: Estimate, b: Estimate) -> bool:
    return bool(a.hi < b.lo or b.hi < a.lo)


def run_study(model, meter: QualityMeter, out_dir: Path, samples: int = 1000, main_samples: int = 500,
              seed: int = 0, progress=None) -> dict:
    """Measure every level, check (a)-(c), write study.json, study.md and study.png to `out_dir`."""
    from ..data import load_digits_split
    from ..sampling import initial_noise, sample
    from ..schedule import Schedule

    keys = (meter.headline, "fid") if meter.headline != "fid" else ("fid",)

    def measure(feats, teacher=None):
        rep = meter.report(feats, teacher, kid=False)
        return {k: rep[k] for k in keys} | ({f"{k}_minus_teacher": rep[f"{k}_minus_teacher"] for k in keys}
                                            if teacher is not None else {})

    test, _ = load_digits_split("test")
    levels = [Level("floor", "real test split", 0.0, measure(meter.features(test)))]
    levels += [Level("noise", f"noise σ={s:g}", s, measure(meter.features(add_noise(test, s)))) for s in NOISE_LEVELS]
    levels += [Level("blur", f"blur σ={s:g}", s, measure(meter.features(gaussian_blur(test, s)))) for s in BLUR_LEVELS]

    noise = initial_noise(samples, noise_shape(model.unet), seed)
    feats = {}
    for steps in DDIM_STEPS:
        images = sample(model.unet, model.scheduler_config, Schedule.teacher(model.scheduler_config, steps), noise,
                        progress=progress, description=f"DDIM-{steps}").images
        feats[steps] = meter.features(images)
        levels.append(Level("ddim", f"DDIM-{steps}", steps, measure(feats[steps])))

    head = meter.headline
    checks = {}
    floor = levels[0].metrics[head]
    checks["a_floor"] = dict(value=floor.to_dict(), samples=len(test))
    for group in ("noise", "blur", "ddim"):
        rows = [lv for lv in levels if lv.group == group]
        if group == "ddim":
            rows = rows[::-1]  # from the best (most steps) to the worst
        pairs = []
        for a, b in zip(rows, rows[1:]):
            pair = dict(better=a.name, worse=b.name, monotone=bool(a.metrics[head].value < b.metrics[head].value),
                        separated=_separated(a.metrics[head], b.metrics[head]))
            if group == "ddim":
                d = meter.paired(feats[int(b.value)], feats[int(a.value)])
                pair["paired_difference"] = d.to_dict()
                pair["paired_separated"] = bool(d.lo > 0)
            pairs.append(pair)
        checks[f"b_{group}"] = pairs
    # (c) at the main job's sample count: half-widths of the absolute metric and of the paired difference
    n = min(main_samples, samples)
    sub = {s: f[:n] for s, f in feats.items()}
    abs20 = meter.report(sub[20], kid=False)[head]
    paired = meter.paired(sub[20], sub[50])
    gap = paired.value
    checks["c_resolution"] = dict(
        samples=n, gap_ddim20_minus_ddim50=gap, absolute_half_width=(abs20.hi - abs20.lo) / 2,
        paired_half_width=(paired.hi - paired.lo) / 2,
        absolute_ok=bool((abs20.hi - abs20.lo) / 2 <= abs(gap) / 3),
        paired_ok=bool((paired.hi - paired.lo) / 2 <= abs(gap) / 3),
    )
    result = dict(headline=head, feature_space=meter.name, samples=samples, seed=seed, test_images=len(test),
                  levels=[dict(group=lv.group, name=lv.name, value=lv.value,
                               metrics={k: v.to_dict() for k, v in lv.metrics.items()}) for lv in levels],
                  checks=checks)
    out_dir = Path(out_dir)
    write_json(out_dir / "study.json", result)
    write_text(out_dir / "study.md", study_table(result))
    plot_study(result, out_dir / "study.png")
    return result


def _fmt(d: dict) -> str:
    return f"{d['value']:.2f} ± {(d['hi'] - d['lo']) / 2:.2f}"


def study_table(result: dict) -> str:
    head = result["headline"]
    keys = [head] + (["fid"] if head != "fid" else [])
    lines = [f"Feature space {result['feature_space']}; model samples: {result['samples']} per DDIM level (seed "
             f"{result['seed']}, same noise); real test split: {result['test_images']} images; 95% intervals.", "",
             "| level | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for lv in result["levels"]:
        lines.append(f"| {lv['name']} | " + " | ".join(_fmt(lv["metrics"][k]) for k in keys) + " |")
    ch = result["checks"]
    lines += ["", f"Checks on {head}:", ""]
    for group in ("noise", "blur", "ddim"):
        for p in ch[f"b_{group}"]:
            extra = ""
            if "paired_difference" in p:
                extra = f"; paired {p['worse']} − {p['better']} = {_fmt(p['paired_difference'])}" \
                        f" ({'separated' if p['paired_separated'] else 'NOT separated'})"
            lines.append(f"- {p['better']} < {p['worse']}: {'monotone' if p['monotone'] else 'NOT monotone'}, "
                         f"intervals {'separated' if p['separated'] else 'overlap'}{extra}")
    c = ch["c_resolution"]
    lines.append(f"- at {c['samples']} samples: DDIM-20 − DDIM-50 = {c['gap_ddim20_minus_ddim50']:.2f}; half-width "
                 f"absolute {c['absolute_half_width']:.2f} ({'≤' if c['absolute_ok'] else '>'} 1/3 of the gap), "
                 f"paired {c['paired_half_width']:.2f} ({'≤' if c['paired_ok'] else '>'} 1/3 of the gap)")
    return "\n".join(lines) + "\n"


def plot_study(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    head = result["headline"]
    keys = [head] + (["fid"] if head != "fid" else [])
    fig, axes = plt.subplots(len(keys), 3, figsize=(13, 3.6 * len(keys)), squeeze=False)
    floor = {k: result["levels"][0]["metrics"][k] for k in keys}
    for row, key in enumerate(keys):
        for col, (group, xlabel) in enumerate((("noise", "noise σ"), ("blur", "blur σ"), ("ddim", "DDIM steps"))):
            ax = axes[row][col]
            lv = [x for x in result["levels"] if x["group"] == group]
            xs = [x["value"] for x in lv]
            ys = [x["metrics"][key]["value"] for x in lv]
            err = [[y - x["metrics"][key]["lo"] for x, y in zip(lv, ys)], [x["metrics"][key]["hi"] - y for x, y in zip(lv, ys)]]
            ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=3)
            ax.axhspan(floor[key]["lo"], floor[key]["hi"], color="green", alpha=0.15, label="real test split (floor)")
            ax.axhline(floor[key]["value"], color="green", lw=0.8)
            if group == "ddim":
                ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize=8)
    fig.suptitle(f"Metric validity ({result['feature_space']} features, 95% intervals)")
    save_figure(path, fig)
    plt.close(fig)
    return path
