"""The experts' per-interval fine-tunings as self-contained jobs: each takes what it trains on and
returns the weights, so it runs the same in this process or as a Ray task on another worker.

Every job seeds its own generator (the interval's offset) and writes its resumable checkpoint
beside where the driver will store its result; the driver writes the finished weights.
"""

from __future__ import annotations

import copy
from pathlib import Path

from .elastic import make_elastic
from .finetune import IntervalBatches, TuneConfig, taylor_importance, tune_elastic, tune_static


def tune_elastic_job(teacher, batches: IntervalBatches, cfg: TuneConfig, importance_batches: int,
                     importance_seed: int, checkpoint: Path, threads: int | None = None, progress=None,
                     description: str = "elastic expert") -> tuple[dict, dict]:
    """An elastic copy of `teacher`, re-ordered by its importance on the interval, sandwich-tuned.
    Returns (the full network's state dict, the tuning summary with what else the elastic model needs)."""
    _threads(threads)
    elastic = make_elastic(copy.deepcopy(teacher))
    # re-ordered once from the teacher's own importance on this interval (deterministic, so a resumed
    # run re-orders the same way before its checkpoint is loaded)
    elastic.apply_importance(*taylor_importance(elastic, batches, importance_batches, cfg.batch_size,
                                                seed=importance_seed))
    Path(checkpoint).parent.mkdir(parents=True, exist_ok=True)
    summary = tune_elastic(elastic, batches, Path(checkpoint), cfg, progress=progress, description=description)
    return elastic.unet.state_dict(), {**summary, "elastic": elastic.extra_state()}


def tune_static_job(model, batches: IntervalBatches, cfg: TuneConfig, checkpoint: Path, threads: int | None = None,
                    progress=None, description: str = "expert") -> tuple[dict, dict]:
    """An extracted sub-network fine-tuned on its interval. Returns (its state dict, the summary)."""
    _threads(threads)
    Path(checkpoint).parent.mkdir(parents=True, exist_ok=True)
    summary = tune_static(model, batches, Path(checkpoint), cfg, progress, description)
    return model.state_dict(), summary


def _threads(threads: int | None) -> None:
    if threads is not None:  # a Ray worker: as many torch threads as it was given CPUs
        import torch

        torch.set_num_threads(threads)
