"""A schedule: the sampler, its step count, and each step's kind (full, partial at a branch, or null).

Plain data (a frozen dataclass) that round-trips through JSON. A schedule says *when* a step
is partial; *where* the network is cut (which blocks a branch skips) lives in `flexdiff.engine`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from .errors import FlexdiffError
from .io import read_json, write_json
from .samplers import SAMPLERS, default_sampler

SCHEDULE_FORMAT = 1
SCHEDULE_FIELDS = frozenset({"format", "name", "sampler", "num_steps", "steps", "timesteps", "meta"})


class StepKind(str, Enum):
    FULL = "full"
    PARTIAL = "partial"
    NULL = "null"


@dataclass(frozen=True)
class Step:
    kind: StepKind
    branch: int | None = None  # only for PARTIAL: 0 = shallowest (cheapest) cut

    def __post_init__(self):
        if self.kind is StepKind.PARTIAL:
            if not isinstance(self.branch, int) or self.branch < 0:
                raise FlexdiffError(f"a partial step needs a branch >= 0 (got {self.branch!r})")
        elif self.branch is not None:
            raise FlexdiffError(f"a {self.kind.value} step takes no branch (got {self.branch})")

    def to_str(self) -> str:
        return f"partial:{self.branch}" if self.kind is StepKind.PARTIAL else self.kind.value

    @classmethod
    def parse(cls, text: str, where: str = "step") -> "Step":
        if not isinstance(text, str):
            raise FlexdiffError(f"{where}: expected a string like 'full', 'partial:2' or 'null', got {text!r}")
        kind, _, branch = text.strip().partition(":")
        try:
            kind_enum = StepKind(kind)
        except ValueError:
            raise FlexdiffError(
                f"{where}: unknown step kind {kind!r}; accepted: full, partial:<branch>, null"
            ) from None
        if kind_enum is StepKind.PARTIAL:
            if not branch.isdigit():
                raise FlexdiffError(f"{where}: {text!r} needs a branch number, e.g. 'partial:1'")
            return cls(kind_enum, int(branch))
        if branch:
            raise FlexdiffError(f"{where}: {text!r}: only partial steps take a branch")
        return cls(kind_enum)


FULL = Step(StepKind.FULL)
NULL = Step(StepKind.NULL)


def partial(branch: int) -> Step:
    return Step(StepKind.PARTIAL, branch)


@dataclass(frozen=True)
class Schedule:
    """Which network work each sampler step does. `len(steps)` is the sampler's step count."""

    sampler: str
    steps: tuple[Step, ...]
    name: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    # Explicit training timesteps, one per step, strictly decreasing; None = the sampler's own spacing.
    timesteps: tuple[int, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "steps", tuple(self.steps))
        if self.timesteps is not None:
            ts = tuple(int(t) for t in self.timesteps)
            object.__setattr__(self, "timesteps", ts)
            if len(ts) != len(self.steps):
                raise FlexdiffError(f"schedule lists {len(ts)} timesteps for {len(self.steps)} steps")
            if any(a <= b for a, b in zip(ts, ts[1:])) or (ts and ts[-1] < 0):
                raise FlexdiffError("schedule timesteps must be strictly decreasing and >= 0")
            if self.sampler == "ddim":
                raise FlexdiffError(
                    "explicit timesteps need sampler dpmsolver++ or euler (diffusers' DDIM spaces steps evenly)"
                )
        if self.sampler not in SAMPLERS:
            raise FlexdiffError(f"schedule sampler {self.sampler!r} is not one of {', '.join(SAMPLERS)}")
        if not self.steps:
            raise FlexdiffError("a schedule needs at least one step")
        if self.steps[0].kind is not StepKind.FULL:
            raise FlexdiffError(
                f"step 0 is {self.steps[0].to_str()}; the first step must be full "
                "(partial and null steps reuse what an earlier full step computed)"
            )

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def pipeline_kwargs(self) -> dict:
        """What a diffusers pipeline call needs to run this schedule's steps: `timesteps=` when it has its
        own, else `num_inference_steps=`."""
        if self.timesteps is not None:
            return {"timesteps": list(self.timesteps)}
        return {"num_inference_steps": self.num_steps}

    def counts(self) -> dict[str, int]:
        out = {k.value: 0 for k in StepKind}
        for s in self.steps:
            out[s.kind.value] += 1
        return out

    def max_branch(self) -> int | None:
        branches = [s.branch for s in self.steps if s.kind is StepKind.PARTIAL]
        return max(branches) if branches else None

    def check_fits(self, num_branches: int, num_steps: int | None = None,
                   num_train_timesteps: int | None = None) -> None:
        """Refuse a schedule that cannot run on a model with `num_branches` cache branches (and,
        when given, `num_train_timesteps` training timesteps)."""
        if num_train_timesteps is not None and self.timesteps is not None and max(self.timesteps) >= num_train_timesteps:
            raise FlexdiffError(f"schedule {self.name or self.describe()}: timestep {max(self.timesteps)} is beyond "
                                f"the model's training range 0..{num_train_timesteps - 1}")
        mb = self.max_branch()
        if mb is not None and mb >= num_branches:
            raise FlexdiffError(
                f"schedule {self.name or ''} uses branch {mb}, but this model has branches "
                f"0..{num_branches - 1}"
            )
        if num_steps is not None and num_steps != self.num_steps:
            raise FlexdiffError(
                f"schedule has {self.num_steps} steps but the sampler runs {num_steps}"
            )

    def describe(self) -> str:
        c = self.counts()
        return f"{self.sampler}-{self.num_steps} ({c['full']} full, {c['partial']} partial, {c['null']} null)"

    # --- JSON -------------------------------------------------------------------------
    def key(self) -> str:
        """Identity of what runs (sampler, timesteps, steps), without name and meta: a cache key."""
        ts = "" if self.timesteps is None else ",".join(map(str, self.timesteps))
        return f"{self.sampler}|{ts}|{' '.join(s.to_str() for s in self.steps)}"

    def to_dict(self) -> dict:
        d = dict(
            format=SCHEDULE_FORMAT,
            name=self.name,
            sampler=self.sampler,
            num_steps=self.num_steps,
            steps=[s.to_str() for s in self.steps],
        )
        if self.timesteps is not None:
            d["timesteps"] = list(self.timesteps)
        d["meta"] = self.meta
        return d

    @classmethod
    def from_dict(cls, data: dict, where: str = "schedule") -> "Schedule":
        """Parse and validate; every error names `where`, the field and what it accepts."""
        if not isinstance(data, dict):
            raise FlexdiffError(f"{where}: expected a JSON object")
        unknown = sorted(set(data) - SCHEDULE_FIELDS)
        if unknown:  # a typo ("stepz") must not pass unnoticed
            raise FlexdiffError(f"{where}: unknown field {unknown[0]!r}; accepted fields: {', '.join(sorted(SCHEDULE_FIELDS))}")
        for key in ("sampler", "steps"):
            if key not in data:
                raise FlexdiffError(f"{where}: missing field {key!r}")
        if not isinstance(data["steps"], list):
            raise FlexdiffError(f"{where}: field 'steps' must be a list")
        if "format" in data and (type(data["format"]) is not int or data["format"] != SCHEDULE_FORMAT):
            raise FlexdiffError(f"{where}: format is {data['format']!r}; this flexdiff reads format {SCHEDULE_FORMAT}")
        if not isinstance(data["sampler"], str):
            raise FlexdiffError(f"{where}: sampler is {data['sampler']!r}; expected a name such as 'dpmsolver++'")
        ts = data.get("timesteps")
        if ts is not None and (not isinstance(ts, list) or any(type(t) is not int for t in ts)):
            raise FlexdiffError(f"{where}: timesteps is {ts!r}; expected a list of whole numbers (training timesteps, "
                                "strictly decreasing), or leave the field out for the sampler's own spacing")
        if "num_steps" in data and type(data["num_steps"]) is not int:
            raise FlexdiffError(f"{where}: num_steps is {data['num_steps']!r}; expected a whole number")
        if "name" in data and not isinstance(data["name"], str):
            raise FlexdiffError(f"{where}: name is {data['name']!r}; expected a string")
        if "meta" in data and not isinstance(data["meta"], dict):
            raise FlexdiffError(f"{where}: meta is {data['meta']!r}; expected a JSON object")
        steps = tuple(Step.parse(s, f"{where}: steps[{i}]") for i, s in enumerate(data["steps"]))
        if "num_steps" in data and data["num_steps"] != len(steps):
            raise FlexdiffError(
                f"{where}: num_steps is {data['num_steps']} but 'steps' lists {len(steps)}"
            )
        try:
            return cls(
                sampler=data["sampler"],
                steps=steps,
                name=str(data.get("name", "")),
                meta=dict(data.get("meta", {})),
                timesteps=data.get("timesteps"),
            )
        except (FlexdiffError, TypeError, ValueError) as e:
            raise FlexdiffError(f"{where}: {e}") from None

    def save(self, path: Path) -> Path:
        return write_json(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: Path) -> "Schedule":
        path = Path(path)
        if not path.is_file():
            raise FlexdiffError(f"--schedule {path}: no such file")
        return cls.from_dict(read_json(path), where=str(path))

    # --- common schedules ---------------------------------------------------------------
    @classmethod
    def full(cls, sampler: str, num_steps: int, name: str = "") -> "Schedule":
        return cls(sampler, (FULL,) * num_steps, name or f"{sampler}-{num_steps}")

    @classmethod
    def teacher(cls, scheduler_config: dict, num_steps: int = 100) -> "Schedule":
        """The teacher of a model: its pipeline's default sampler (DDIM; flow Euler on a flow-matching model) with
        `num_steps` full steps."""
        return cls.full(default_sampler(scheduler_config), num_steps)

    @classmethod
    def deepcache(cls, sampler: str, num_steps: int, interval: int, branch: int, name: str = "") -> "Schedule":
        """DeepCache uniform 1:N (Ma et al. 2024): a full step every `interval` steps, partial between."""
        if interval < 1:
            raise FlexdiffError(f"DeepCache interval must be >= 1 (got {interval})")
        steps = tuple(FULL if i % interval == 0 else partial(branch) for i in range(num_steps))
        return cls(sampler, steps, name or f"deepcache-{sampler}{num_steps}-N{interval}-b{branch}")

    @classmethod
    def delta_dit(cls, sampler: str, num_steps: int, interval: int, early: int, late: int, name: str = "") -> "Schedule":
        """Δ-DiT-style (Chen et al. 2024): a full step every `interval` steps; partial steps at branch `early` in
        the first half of the run (Δ-DiT keeps the front blocks while the outline forms) and `late` after it
        (the rear blocks, for the details)."""
        if interval < 1:
            raise FlexdiffError(f"Δ-DiT interval must be >= 1 (got {interval})")
        steps = tuple(FULL if i % interval == 0 else partial(early if i < num_steps / 2 else late)
                      for i in range(num_steps))
        return cls(sampler, steps, name or f"delta-dit-{sampler}{num_steps}-N{interval}-b{early}-{late}")

    @classmethod
    def deepcache_nonuniform(cls, sampler: str, num_steps: int, interval: int, branch: int,
                             center: float = 0.5, power: float = 1.4, name: str = "") -> "Schedule":
        """DeepCache's non-uniform 1:N: as many full steps as 1:N, placed denser around `center`
        (a fraction of the run) by a power law, partial steps between (Ma et al. 2024, §4.3)."""
        import numpy as np

        if interval < 1:
            raise FlexdiffError(f"DeepCache interval must be >= 1 (got {interval})")
        k = -(-num_steps // interval)
        c = center * (num_steps - 1)
        p = power
        while True:  # lower the power until the k positions are distinct (p = 1 is uniform)
            u = np.linspace(-1, 1, k)
            scale = np.where(u < 0, c, num_steps - 1 - c)
            pos = np.unique(np.clip(np.round(c + np.sign(u) * np.abs(u) ** p * scale), 0, num_steps - 1).astype(int))
            if len(pos) == k or p <= 1.0:
                break
            p = max(1.0, p - 0.02)
        fulls = set(pos.tolist()) | {0}
        steps = tuple(FULL if i in fulls else partial(branch) for i in range(num_steps))
        return cls(sampler, steps, name or f"deepcache-nu-{sampler}{num_steps}-N{interval}-b{branch}")

