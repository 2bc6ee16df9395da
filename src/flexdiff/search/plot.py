"""The search's picture: progress per generation, and every scored candidate against its MACs."""

from __future__ import annotations

from pathlib import Path

from ..io import save_figure
from ..schedule import Schedule

METRIC_LABELS = {"distance": "per-sample distance to the teacher", "rfid": "rFID to the teacher's samples",
                 "fid": "quality vs real data (FID; digits: class-balanced FD)"}


def plot_search(path: Path, state: dict, best: Schedule, front: list[Schedule], cfg, teacher_macs: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    h = state["history"]
    a1.plot([x["generation"] for x in h], [x["best_fitness"] for x in h], "o-", label="best")
    a1.plot([x["generation"] for x in h], [x["median_fitness"] for x in h], "s--", label="population median")
    a1.set_xlabel("generation")
    a1.set_ylabel(METRIC_LABELS.get(cfg.metric, cfg.metric))
    a1.set_title("search progress")
    a1.legend()
    a1.grid(alpha=0.3)
    ev = list(state["evaluated"].values())
    sc = a2.scatter([teacher_macs / e["macs"] for e in ev], [e["fitness"] for e in ev],
                    c=[e["generation"] for e in ev], cmap="viridis", s=14)
    fig.colorbar(sc, ax=a2, label="generation scored")
    a2.scatter([best.meta["speedup_macs"]], [best.meta["fitness"]], marker="*", s=220, color="red", label="best")
    if front:
        a2.plot([s.meta["speedup_macs"] for s in front], [s.meta["fitness"] for s in front], "r-", lw=1,
                label="Pareto front")
    if cfg.budget is not None:
        a2.axvline(1 / cfg.budget, color="gray", ls="--", lw=0.8, label="budget")
    a2.set_xlabel("speed-up in MACs vs teacher")
    a2.set_ylabel(METRIC_LABELS.get(cfg.metric, cfg.metric) + " (lower is better)")
    a2.set_yscale("log")
    a2.set_title(f"every scored candidate ({len(ev)})")
    a2.legend(fontsize=8)
    a2.grid(alpha=0.3)
    save_figure(path, fig)
    plt.close(fig)
