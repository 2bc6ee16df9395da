"""Search spaces: Flexiffusion's segment-wise space and an AutoDiffusion-style step-wise one.

A genome is plain JSON-able data (dict); the space turns it into a `Schedule`, and knows how to
draw, mutate, cross and repair genomes. The search loop (`evolution.py`) only sees this interface.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ..cost import StepCosts
from ..errors import FlexdiffError
from ..schedule import FULL, NULL, Schedule, partial

Genome = dict


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _validate_choices(step_choices, branches, num_branches: int) -> None:
    if not step_choices or min(step_choices) < 1:
        raise FlexdiffError(f"--steps {step_choices}: need whole numbers >= 1")
    bad = [b for b in branches if not 0 <= b < num_branches]
    if not branches or bad:
        raise FlexdiffError(f"--branches {branches}: this model has branches 0..{num_branches - 1}")


@dataclass(frozen=True)
class SegmentSpace:
    """Flexiffusion (Huang et al. 2024): isometric segments of length L over a T-step sampler.

    Each segment is one full step, then `p` partial steps at one branch, then L-1-p null steps
    (the last segment is cut short when L does not divide T). Beyond the paper, the last
    timestep is a global setting like T and L: the T steps are spread evenly from the noisiest
    training timestep down to `end` (0 = the sampler's own spacing). Genome:
    {"T": int, "L": int, "end": int, "segments": [[p, branch], ...]}.
    """

    sampler: str = "dpmsolver++"
    # T < 10 too: on a converged model a few well-placed full steps can beat many cached ones (docs/search.md)
    step_choices: tuple[int, ...] = (4, 5, 6, 7, 8, 10, 12, 15, 20, 25)
    length_choices: tuple[int, ...] = (1, 2, 3, 4, 5)
    branches: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
    end_choices: tuple[int, ...] = (0, 50, 100, 200, 300)
    num_train_timesteps: int = 1000
    kind: str = "segment"

    def _ends(self) -> tuple[int, ...]:
        from ..samplers import EXPLICIT_TIMESTEPS

        # DDIM, UniPC and the flow multistep solvers cannot take explicit timesteps: their own spacing only
        return self.end_choices if self.sampler in EXPLICIT_TIMESTEPS else (0,)

    def validate(self, num_branches: int) -> None:
        _validate_choices(self.step_choices, self.branches, num_branches)
        if not self.length_choices or min(self.length_choices) < 1:
            raise FlexdiffError(f"--lengths {self.length_choices}: need whole numbers >= 1")
        if not self.end_choices or not all(0 <= e < self.num_train_timesteps - max(self.step_choices)
                                           for e in self.end_choices):
            raise FlexdiffError(
                f"--ends {self.end_choices}: each must be >= 0 and leave room for {max(self.step_choices)} steps "
                f"below timestep {self.num_train_timesteps - 1}"
            )

    @staticmethod
    def num_segments(T: int, L: int) -> int:
        return math.ceil(T / L)

    def random(self, rng) -> Genome:
        T, L = _pick(rng, self.step_choices), _pick(rng, self.length_choices)
        return {"T": T, "L": L, "end": int(_pick(rng, self._ends())),
                "segments": [self._random_segment(rng, L) for _ in range(self.num_segments(T, L))]}

    def _random_segment(self, rng, L: int) -> list[int]:
        return [int(rng.integers(0, L)), int(_pick(rng, self.branches))]

    def uniform(self, T: int, L: int, p: int, branch: int) -> Genome:
        """Every segment alike: with p = L-1 this is DeepCache's uniform 1:L."""
        return {"T": T, "L": L, "end": 0, "segments": [[p, branch] for _ in range(self.num_segments(T, L))]}

    def plain(self) -> list[Genome]:
        """The plain sampler (every step full) at each T and each end timestep."""
        return [dict(self.uniform(T, 1, 0, self.branches[0]), end=int(e)) for T in self.step_choices for e in self._ends()]

    def budget_seeds(self, costs: StepCosts, budget: float) -> list[Genome]:
        """"Use fewer steps": at each end timestep, the plain sampler with the most steps the budget allows."""
        fits = [g for g in self.plain() if costs.schedule_macs(self.to_schedule(g)) <= budget]
        return [max(at, key=lambda g: g["T"]) for e in self._ends() if (at := [g for g in fits if g["end"] == e])]

    def seeds(self) -> list[Genome]:
        """The initial population's hand-made members: plain samplers, then DeepCache-like uniform schedules."""
        out = self.plain()
        for T in self.step_choices:
            for L in self.length_choices:
                if L > 1:
                    out += [self.uniform(T, L, L - 1, b) for b in self.branches]
        return out

    def to_schedule(self, g: Genome) -> Schedule:
        T, L, end = g["T"], g["L"], g.get("end", 0)
        steps = []
        for p, b in g["segments"]:
            steps += [FULL] + [partial(b)] * p + [NULL] * (L - 1 - p)
        timesteps = None
        if end:
            timesteps = tuple(int(t) for t in np.linspace(self.num_train_timesteps - 1, end, T).round())
        return Schedule(self.sampler, tuple(steps[:T]), timesteps=timesteps)

    @staticmethod
    def _copy(g: Genome, **change) -> Genome:
        return {"T": g["T"], "L": g["L"], "end": g.get("end", 0), "segments": [list(s) for s in g["segments"]], **change}

    def mutate(self, g: Genome, rng) -> Genome:
        g = self._copy(g)
        what = rng.random()
        if what < 0.15 and len(self.step_choices) > 1:
            g = self._resize(g, _pick(rng, self.step_choices), g["L"], rng)
        elif what < 0.3 and len(self.length_choices) > 1:
            g = self._resize(g, g["T"], _pick(rng, self.length_choices), rng)
        elif what < 0.4 and len(self._ends()) > 1:
            g["end"] = int(_pick(rng, self._ends()))
        else:
            s = g["segments"][int(rng.integers(len(g["segments"])))]
            if rng.random() < 0.6:
                s[0] = int(rng.integers(0, g["L"]))
            else:
                s[1] = int(_pick(rng, self.branches))
        return g

    def _resize(self, g: Genome, T: int, L: int, rng) -> Genome:
        """Change T or L, keeping each segment's share of partial steps and its branch where it can."""
        n = self.num_segments(T, L)
        old = g["segments"]
        segs = []
        for i in range(n):
            p, b = old[min(len(old) - 1, i * len(old) // n)]
            frac = p / max(1, g["L"] - 1)
            segs.append([int(round(frac * (L - 1))), b])
        return self._copy(g, T=T, L=L, segments=segs)

    def crossover(self, a: Genome, b: Genome, rng) -> Genome:
        """Swap segments between parents of the same T and L; otherwise copy one parent."""
        if (a["T"], a["L"]) != (b["T"], b["L"]):
            return _pick(rng, [a, b])
        mask = rng.random(len(a["segments"])) < 0.5
        return self._copy(a, end=_pick(rng, [a, b]).get("end", 0),
                          segments=[list(x if m else y) for m, x, y in zip(mask, a["segments"], b["segments"])])

    def repair(self, g: Genome, costs: StepCosts, budget: float, rng) -> Genome | None:
        """Make a genome fit the budget: turn partial steps into null steps, or lower their branch."""
        g = self._copy(g)
        while costs.schedule_macs(self.to_schedule(g)) > budget:
            movable = [s for s in g["segments"] if s[0] > 0]
            if not movable:
                return None  # full steps alone are over budget
            s = movable[int(rng.integers(len(movable)))]
            lower = [b for b in self.branches if b < s[1]]
            if lower and rng.random() < 0.5:
                s[1] = max(lower)
            else:
                s[0] -= 1
        return g

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StepwiseSpace:
    """AutoDiffusion-style (Li et al. ICCV 2023): choose the timesteps themselves and, per step,
    how much of the network runs (full, or partial at a branch: the deep layers skipped).

    Genome: {"timesteps": [t_1 > t_2 > ...], "kinds": [-1 for full, else a branch, ...]}. Runs
    on DPM-Solver++ (diffusers' DDIM cannot take explicit timesteps).
    """

    sampler: str = "dpmsolver++"
    step_choices: tuple[int, ...] = (6, 8, 10, 12)
    branches: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
    num_train_timesteps: int = 1000
    kind: str = "stepwise"

    def validate(self, num_branches: int) -> None:
        _validate_choices(self.step_choices, self.branches, num_branches)
        if max(self.step_choices) >= self.num_train_timesteps:
            raise FlexdiffError(f"--steps {self.step_choices}: at most {self.num_train_timesteps - 1} steps")

    def _even(self, k: int) -> list[int]:
        return [int(t) for t in np.linspace(self.num_train_timesteps - 1, 0, k + 1)[:-1].round()]

    def random(self, rng) -> Genome:
        k = _pick(rng, self.step_choices)
        ts = sorted(rng.choice(np.arange(1, self.num_train_timesteps - 1), k - 1, replace=False).tolist(), reverse=True)
        kinds = [-1] + [int(_pick(rng, (-1,) + tuple(self.branches))) for _ in range(k - 1)]
        return {"timesteps": [self.num_train_timesteps - 1] + [int(t) for t in ts], "kinds": kinds}

    def seeds(self) -> list[Genome]:
        return [{"timesteps": self._even(k), "kinds": [-1] * k} for k in self.step_choices]

    def budget_seeds(self, costs: StepCosts, budget: float) -> list[Genome]:
        """The evenly spaced plain sampler with the most steps the budget allows."""
        fits = [g for g in self.seeds() if costs.schedule_macs(self.to_schedule(g)) <= budget]
        return [max(fits, key=lambda g: len(g["kinds"]))] if fits else []

    def to_schedule(self, g: Genome) -> Schedule:
        steps = tuple(FULL if k < 0 else partial(k) for k in g["kinds"])
        return Schedule(self.sampler, steps, timesteps=tuple(g["timesteps"]))

    def mutate(self, g: Genome, rng) -> Genome:
        ts, kinds = list(g["timesteps"]), list(g["kinds"])
        if rng.random() < 0.5 and len(ts) > 1:
            i = int(rng.integers(1, len(ts)))  # the first timestep stays at the noisiest end
            hi = ts[i - 1] - 1
            lo = ts[i + 1] + 1 if i + 1 < len(ts) else 0
            if hi >= lo:
                ts[i] = int(rng.integers(lo, hi + 1))
        else:
            i = int(rng.integers(1, len(kinds))) if len(kinds) > 1 else 0
            kinds[i] = -1 if i == 0 else int(_pick(rng, (-1,) + tuple(self.branches)))
        return {"timesteps": ts, "kinds": kinds}

    def crossover(self, a: Genome, b: Genome, rng) -> Genome:
        if len(a["kinds"]) != len(b["kinds"]):
            return _pick(rng, [a, b])
        mask = rng.random(len(a["kinds"])) < 0.5
        kinds = [x if m else y for m, x, y in zip(mask, a["kinds"], b["kinds"])]
        kinds[0] = -1
        return {"timesteps": list(_pick(rng, [a, b])["timesteps"]), "kinds": kinds}

    def repair(self, g: Genome, costs: StepCosts, budget: float, rng) -> Genome | None:
        """Over budget: make a full step partial, or lower a partial step's branch."""
        g = {"timesteps": list(g["timesteps"]), "kinds": list(g["kinds"])}
        while costs.schedule_macs(self.to_schedule(g)) > budget:
            options = [i for i in range(1, len(g["kinds"])) if g["kinds"][i] != min(self.branches)]
            if not options:
                return None
            i = options[int(rng.integers(len(options)))]
            k = g["kinds"][i]
            lower = [b for b in self.branches if k < 0 or b < k]
            g["kinds"][i] = max(lower) if k < 0 and rng.random() < 0.5 else min(lower)
        return g

    def to_dict(self) -> dict:
        return asdict(self)


def space_from_dict(d: dict):
    d = dict(d)
    kind = d.pop("kind", "segment")
    cls = {"segment": SegmentSpace, "stepwise": StepwiseSpace}[kind]
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


SPACES = ("segment", "stepwise")


def make_space(kind: str, sampler: str, num_train_timesteps: int, num_branches: int,
               step_choices: tuple[int, ...] | None = None, length_choices: tuple[int, ...] | None = None,
               branches: tuple[int, ...] | None = None, end_choices: tuple[int, ...] | None = None):
    """A search space from the search command's options (None: the space's default for that option)."""
    from ..samplers import check_sampler

    check_sampler(sampler)
    kw = dict(num_train_timesteps=num_train_timesteps,
              branches=branches if branches is not None else tuple(range(num_branches)))
    if step_choices:
        kw["step_choices"] = step_choices
    if kind == "segment":
        if length_choices:
            kw["length_choices"] = length_choices
        if end_choices:
            kw["end_choices"] = end_choices
        return SegmentSpace(sampler=sampler, **kw)
    if kind == "stepwise":
        from ..samplers import EXPLICIT_TIMESTEPS

        if sampler not in EXPLICIT_TIMESTEPS:
            raise FlexdiffError(f"--space stepwise picks its own timesteps, which {sampler} cannot take: use --sampler "
                                f"{' or '.join(EXPLICIT_TIMESTEPS)}")
        return StepwiseSpace(sampler=sampler, **kw)
    raise FlexdiffError(f"--space {kind!r}: accepted values are {', '.join(SPACES)}")
