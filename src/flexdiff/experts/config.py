"""The experts pipeline's settings: what each stage depends on, and the guard that refuses to resume a
stage folder made with other settings, another model or other data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..configs import Config
from ..errors import FlexdiffError
from ..io import read_json, write_json
from ..schedule import SAMPLERS
from .agent import check_choice_rule
from .intervals import MEASURES

STAGES = ("intervals", "elastic", "agent", "final")
BUDGET_KINDS = ("macs", "latency")


@dataclass(frozen=True)
class ExpertsConfig(Config):
    budget: float = 0.5  # fraction of the teacher's MACs for the whole sampling run
    sampler: str = "ddim"  # the sampling run the budget is counted on (steps served per expert)
    num_steps: int = 100
    k: int | None = None  # number of intervals; None = the knee rule
    k_max: int = 5
    measure: str = "mean"
    sim_timesteps: int = 20
    sim_images: int = 128
    importance_batches: int = 8
    elastic_steps: int = 200
    agent_steps: int = 150
    agent_score: str = "teacher"  # what the agent compares sub-networks on (agent.SCORES)
    agent_spend: float = 0.9  # the final choice spends at least this fraction of the budget (where one can)
    final_steps: int = 1200  # 400 left the mixture outside the teacher's interval (docs/experts.md)
    batch_size: int = 64
    lr: float = 5e-4
    distill: float = 1.0
    seed: int = 0
    budget_kind: str = "macs"  # what the budget counts: MACs, or latency measured on this machine per sub-network
    latency_batch: int = 250  # the batch the latency table is measured at (the bench's)

    def check(self) -> None:
        if not 0 < self.budget <= 1:
            raise FlexdiffError(f"--budget {self.budget}: give a fraction of the teacher's MACs in (0, 1]")
        if self.sampler not in SAMPLERS:
            raise FlexdiffError(f"--sampler {self.sampler!r}; accepted: {', '.join(SAMPLERS)}")
        if self.budget_kind not in BUDGET_KINDS:
            raise FlexdiffError(f"--budget-kind {self.budget_kind!r}; accepted: {', '.join(BUDGET_KINDS)}")
        if self.measure not in MEASURES:
            raise FlexdiffError(f"--measure {self.measure!r}; accepted: {', '.join(MEASURES)}")
        for f in ("num_steps", "elastic_steps", "agent_steps", "final_steps", "batch_size", "sim_timesteps",
                  "sim_images", "importance_batches", "k_max"):
            if getattr(self, f) < 1:
                raise FlexdiffError(f"--{f.replace('_', '-')} {getattr(self, f)}: must be at least 1")
        check_choice_rule(self.agent_score, self.agent_spend)
        if self.k is not None and not 1 <= self.k <= self.sim_timesteps:
            # checked before any stage writes its settings.json, so a refused --k leaves nothing behind
            raise FlexdiffError(f"--k {self.k}: choose 1 to {self.sim_timesteps} intervals (the number of sampled "
                                "timesteps)")

    def stage_settings(self, stage: str) -> dict:
        """The settings a stage's result depends on (including those of the stages before it)."""
        keys = dict(
            intervals=("k", "k_max", "measure", "sim_timesteps", "sim_images", "seed"),
            elastic=("importance_batches", "elastic_steps", "batch_size", "lr", "distill"),
            agent=("budget", "sampler", "num_steps", "agent_steps", "agent_score", "agent_spend"),
            final=("final_steps",),
        )
        out = {}
        for s in STAGES[:STAGES.index(stage) + 1]:
            out.update({k: getattr(self, k) for k in keys[s]})
        if stage in ("agent", "final") and self.budget_kind != "macs":  # left out when MACs: older folders resume
            out.update(budget_kind=self.budget_kind, latency_batch=self.latency_batch)
        return out


def guard(folder: Path, settings: dict) -> None:
    """Remember a stage's settings; refuse to resume a folder made with other ones."""
    f = folder / "settings.json"
    if f.exists():
        old = read_json(f, "the stage's settings")
        if not isinstance(old, dict):
            raise FlexdiffError(f"{f}: damaged (not a JSON object); delete this stage's folder to start it again")
        for what in ("model", "data"):
            if what in settings and old.get(what) != settings[what]:
                raise FlexdiffError(f"{f}: this stage was built from another {what} (fingerprint {old.get(what)}, "
                                    f"now {settings[what]}); use another --out folder or delete this stage's folder")
        if old != settings:
            diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
            raise FlexdiffError(f"{f}: this stage was run with other settings {diff} (old, new); "
                                "use another --out folder or delete this stage's folder")
    else:
        write_json(f, settings)
