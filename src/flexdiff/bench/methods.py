"""The bench's catalogue: which methods run (the teacher, the solvers, DeepCache, searches,
mixtures) and the presets, built from options with their checks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..configs import Config
from ..errors import FlexdiffError
from ..experts.config import ExpertsConfig
from ..schedule import Schedule


@dataclass(frozen=True)
class Method:
    name: str
    family: str
    schedule: Schedule
    model: str | None = None  # another model folder (a mixture, a pruned UNet); None = the bench's model


@dataclass(frozen=True)
class BenchConfig(Config):
    samples: int = 1000
    seed: int = 0
    batch_size: int = 250
    teacher_steps: int = 100
    labels: tuple[int, ...] = ()  # class-conditional models: labels cycled over the samples; () = unconditional
    guidance: float = 1.0  # classifier-free guidance scale, the same for every method
    prompts: tuple[str, ...] = ()  # text-to-image pipelines: prompts cycled over the samples; () = the empty prompt
    negative_prompt: str | None = None
    ddim_steps: tuple[int, ...] = (5, 10, 20, 50)
    dpm_steps: tuple[int, ...] = (5, 10, 20)
    unipc_steps: tuple[int, ...] = ()
    deepcache_intervals: tuple[int, ...] = (2, 3, 5)
    deepcache_branches: tuple[int, ...] = (0, 2)
    deepcache_nonuniform: tuple[int, ...] = (3, 5)  # intervals of non-uniform DeepCache (branch 0)
    # DeepCache over a few-step DPM-Solver++ run too (these step counts; the intervals and branches above):
    # over the teacher's 100 DDIM steps DeepCache cannot reach the searches' budgets
    deepcache_dpm_steps: tuple[int, ...] = ()
    # Searches run inside the bench (each resumable under out/searches/): budgets as fractions of the teacher
    search_budgets: tuple[float, ...] = ()
    search_population: int = 16
    search_generations: int = 10
    search_eval_samples: int = 256
    flexiffusion_metrics: tuple[str, ...] = ("rfid", "fid")  # one Flexiffusion search per fitness
    autodiffusion: bool = True  # also run the AutoDiffusion-style peer search at each budget
    # Mixtures of experts: pre-built mixture folders ("default" = the one shipped for the default model),
    # and budgets at which the bench builds its own (resumable under out/experts/), each with its two
    # baselines at the same MACs: uniform-width experts and a single Diff-Pruning-style pruned model
    mixtures: tuple[str, ...] = ()
    expert_budgets: tuple[float, ...] = ()
    mixture_deepcache: int = 3  # also run each mixture with DeepCache 1:N at branch 0 (0 = no)
    # composed: a Flexiffusion schedule searched over each mixture, at these speed-ups against the original
    # teacher's MACs (the search's own teacher is the mixture's DDIM run)
    composed_speedups: tuple[float, ...] = ()
    expert_settings: tuple[tuple[str, object], ...] = ()  # ExpertsConfig fields to change, as (name, value)

    def methods(self, extra: tuple[Schedule, ...] = (), searched: tuple[tuple[str, Schedule], ...] = ()) -> list[Method]:
        t = self.teacher_steps
        out = [Method(f"teacher DDIM-{t}", "teacher", Schedule.full("ddim", t))]
        out += [Method(f"DDIM-{s}", "ddim", Schedule.full("ddim", s)) for s in self.ddim_steps]
        out += [Method(f"DPM-Solver++-{s}", "dpmsolver++", Schedule.full("dpmsolver++", s)) for s in self.dpm_steps]
        out += [Method(f"UniPC-{s}", "unipc", Schedule.full("unipc", s)) for s in self.unipc_steps]
        out += [
            Method(f"DeepCache 1:{n} b{b} (DDIM-{t})", "deepcache", Schedule.deepcache("ddim", t, n, b))
            for b in self.deepcache_branches for n in self.deepcache_intervals
        ]
        out += [
            Method(f"DeepCache 1:{n} b{b} (DPM-Solver++-{s})", "deepcache", Schedule.deepcache("dpmsolver++", s, n, b))
            for s in self.deepcache_dpm_steps for b in self.deepcache_branches for n in self.deepcache_intervals
        ]
        out += [
            Method(f"DeepCache non-uniform 1:{n} b0 (DPM-Solver++-{s})", "deepcache-nu",
                   Schedule.deepcache_nonuniform("dpmsolver++", s, n, 0))
            for s in self.deepcache_dpm_steps for n in self.deepcache_nonuniform
        ]
        out += [
            Method(f"DeepCache non-uniform 1:{n} b0 (DDIM-{t})", "deepcache-nu", Schedule.deepcache_nonuniform("ddim", t, n, 0))
            for n in self.deepcache_nonuniform
        ]
        out += [Method(s.name, family, s) for family, s in searched]
        out += [Method(s.name or f"schedule {i}", "schedule", s) for i, s in enumerate(extra)]
        return out


PRESETS = {
    # the README's main job (about 15 minutes on the 2-core machine)
    "quick": BenchConfig(samples=500, ddim_steps=(10, 20, 50), dpm_steps=(5, 10), unipc_steps=(5, 10),
                         deepcache_intervals=(3, 5), deepcache_branches=(0, 2), deepcache_nonuniform=(5,),
                         search_budgets=(1 / 16,), search_population=12, search_generations=6, search_eval_samples=128,
                         mixtures=("default",), composed_speedups=(20,)),
    # the docs' table (docs/bench.md), every target in one run: the search preset's rows, a mixture built at
    # 0.5 with its two baselines, and schedules searched over it at 20x and 35x (2 to 2.5 hours from scratch)
    "full": BenchConfig(samples=2000, ddim_steps=(4, 6, 12, 50), dpm_steps=(4, 6, 12, 20), unipc_steps=(4, 6, 12),
                        deepcache_intervals=(2, 3, 5), deepcache_branches=(0,), deepcache_nonuniform=(),
                        deepcache_dpm_steps=(20, 25), search_budgets=(1 / 8, 1 / 16, 1 / 25),
                        expert_budgets=(0.5,), composed_speedups=(20, 35)),
    # the search's table (docs/search.md): every searched budget against the solvers at the step counts
    # those budgets allow (1/8: 12 steps, 1/16: 6, 1/25: 4) and DeepCache over DPM-Solver++
    "search": BenchConfig(samples=2000, ddim_steps=(4, 6, 12, 50), dpm_steps=(4, 6, 12, 20), unipc_steps=(4, 6, 12),
                          deepcache_intervals=(2, 3, 5), deepcache_branches=(0,), deepcache_nonuniform=(),
                          deepcache_dpm_steps=(20, 25), search_budgets=(1 / 8, 1 / 16, 1 / 25)),
}


def config_from_options(preset: str, **overrides) -> BenchConfig:
    """A preset with the options the user gave (None: the preset's value), checked."""
    if preset not in PRESETS:
        raise FlexdiffError(f"--preset {preset!r}: accepted values are {', '.join(PRESETS)}")
    for name in ("search_budgets", "expert_budgets"):
        if any(not 0 < b <= 1 for b in overrides.get(name) or ()):
            raise FlexdiffError(f"--{name.replace('_', '-')} {','.join(map(str, overrides[name]))}: each must be a "
                                "fraction in (0, 1]")
    if any(v <= 1 for v in overrides.get("composed_speedups") or ()):
        raise FlexdiffError(f"--composed {','.join(map(str, overrides['composed_speedups']))}: each is a speed-up "
                            "against the teacher's MACs, above 1 (e.g. 20)")
    cfg = dataclasses.replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
    ExpertsConfig.from_dict(dict(cfg.expert_settings), "the expert settings")  # refused now, not after the searches
    return cfg
