"""The bench's catalogue: which methods run (the teacher, the solvers, DeepCache, searches,
mixtures) and the presets, built from options with their checks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..configs import Config
from ..errors import FlexdiffError
from ..experts.config import ExpertsConfig
from ..samplers import is_flow
from ..schedule import Schedule
from .peers import HookPeer

# the solvers of each kind of model: (teacher and base, multistep, UniPC), and their names in the tables
SOLVERS = {False: ("ddim", "dpmsolver++", "unipc"), True: ("flow-euler", "flow-dpmsolver++", "flow-unipc")}
LABELS = {"ddim": "DDIM", "dpmsolver++": "DPM-Solver++", "unipc": "UniPC", "flow-euler": "flow-Euler",
          "flow-dpmsolver++": "flow-DPM-Solver++", "flow-unipc": "flow-UniPC"}


@dataclass(frozen=True)
class Method:
    name: str
    family: str
    schedule: Schedule  # a hook peer: the plain sampler run its hook decides over
    model: str | None = None  # another model folder (a mixture, a pruned UNet); None = the bench's model
    peer: HookPeer | None = None  # one of diffusers' run-time cache hooks (bench/peers.py)


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
    # a transformer: Δ-DiT-style static caches (these intervals over the teacher's run), and diffusers' run-time
    # cache hooks as peers, (kind, setting) each, over `hook_steps` steps of the model's base sampler
    delta_dit_intervals: tuple[int, ...] = ()
    hook_peers: tuple[tuple[str, float], ...] = ()
    hook_steps: int = 50

    def methods(self, extra: tuple[Schedule, ...] = (), searched: tuple[tuple[str, Schedule], ...] = (),
                scheduler_config: dict | None = None, branches: tuple | None = None) -> list[Method]:
        """The rows on a model trained with `scheduler_config` (DDPM: DDIM and its peers; flow matching: the flow
        solvers). `branches`: a transformer's (F, B) per branch (its static caches are then FORA-style and
        Δ-DiT-style, and diffusers' hooks join); None: a UNet (DeepCache)."""
        t, flow = self.teacher_steps, is_flow(scheduler_config or {})
        base, multi, unipc = SOLVERS[flow]
        lb, lm = LABELS[base], LABELS[multi]
        cache, family = ("FORA-style", "fora") if branches else ("DeepCache", "deepcache")

        def cut(b):
            return f"({branches[b][0]},{branches[b][1]})" if branches else f"b{b}"

        out = [Method(f"teacher {lb}-{t}", "teacher", Schedule.full(base, t))]
        out += [Method(f"{lb}-{s}", base, Schedule.full(base, s)) for s in self.ddim_steps]
        out += [Method(f"{lm}-{s}", "dpmsolver++", Schedule.full(multi, s)) for s in self.dpm_steps]
        out += [Method(f"{LABELS[unipc]}-{s}", "unipc", Schedule.full(unipc, s)) for s in self.unipc_steps]
        out += [Method(f"{cache} 1:{n} {cut(b)} ({lb}-{t})", family, Schedule.deepcache(base, t, n, b))
                for b in self.deepcache_branches for n in self.deepcache_intervals]
        out += [Method(f"{cache} 1:{n} {cut(b)} ({lm}-{s})", family, Schedule.deepcache(multi, s, n, b))
                for s in self.deepcache_dpm_steps for b in self.deepcache_branches for n in self.deepcache_intervals]
        out += [Method(f"{cache} non-uniform 1:{n} {cut(0)} ({lm}-{s})", f"{family}-nu",
                       Schedule.deepcache_nonuniform(multi, s, n, 0))
                for s in self.deepcache_dpm_steps for n in self.deepcache_nonuniform]
        out += [Method(f"{cache} non-uniform 1:{n} {cut(0)} ({lb}-{t})", f"{family}-nu",
                       Schedule.deepcache_nonuniform(base, t, n, 0)) for n in self.deepcache_nonuniform]
        if branches:
            early, late = _delta_dit_branches(branches)
            out += [Method(f"Δ-DiT-style 1:{n} {cut(early)}→{cut(late)} ({lb}-{t})", "delta-dit",
                           Schedule.delta_dit(base, t, n, early, late)) for n in self.delta_dit_intervals]
            for kind, setting in self.hook_peers:
                peer = HookPeer(kind, setting, self.hook_steps, base)
                out.append(Method(peer.name, f"hook-{kind}", peer.base, peer=peer))
        out += [Method(s.name, family, s) for family, s in searched]
        out += [Method(s.name or f"schedule {i}", "schedule", s) for i, s in enumerate(extra)]
        return out


def _delta_dit_branches(branches: tuple) -> tuple[int, int]:
    """Δ-DiT's two cuts among a transformer's branches: early, most front blocks and one rear one; late, the
    mirror image (the cheapest such pair when several tie)."""
    early = max(range(len(branches)), key=lambda b: (branches[b][0] - branches[b][1], -b))
    late = max(range(len(branches)), key=lambda b: (branches[b][1] - branches[b][0], -b))
    return early, late


PRESETS = {
    # make bench's first table (12 minutes on the 2-core machine, measured 7 December 2026)
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
    # the transformer table (docs/bench.md; `make bench-full`'s second): a 50-step flow-Euler teacher (what FLUX and
    # SD3 pipelines run by default is 28-50), flow solvers at the step counts the budgets allow, FORA-style caches
    # (over the teacher and over shorter runs, which alone reach the budgets) and Δ-DiT-style ones, diffusers' five
    # cache hooks on the teacher's run at settings near the budgets, the searches at 1/4, 1/8 and 1/16, and a
    # mixture of experts built at 0.5 of the MACs with its two baselines and a schedule searched over it at 1/20
    "transformer": BenchConfig(samples=500, teacher_steps=50, ddim_steps=(3, 6, 12, 25), dpm_steps=(3, 6, 12),
                               unipc_steps=(3, 6, 12), deepcache_intervals=(2, 4), deepcache_branches=(0,),
                               deepcache_nonuniform=(), deepcache_dpm_steps=(12, 25), delta_dit_intervals=(2, 4),
                               # settings measured to land near 1/4 and 1/8 of the teacher's MACs where the hook
                               # can get there (FirstBlockCache and MagCache stop near 1/5; PAB and FasterCache
                               # skip attention only and stop near 1/1.2): docs/bench.md
                               hook_peers=(("fbc", 0.3), ("fbc", 0.5), ("taylorseer", 5), ("taylorseer", 16),
                                           ("magcache", 0.3), ("magcache", 0.6), ("pab", 2), ("pab", 8),
                                           ("fastercache", 2), ("fastercache", 8)),
                               hook_steps=50, search_budgets=(1 / 4, 1 / 8, 1 / 16), search_population=12,
                               search_generations=6, search_eval_samples=128, flexiffusion_metrics=("rfid",),
                               expert_budgets=(0.5,), composed_speedups=(20,), mixture_deepcache=0),
    # `make bench`'s second table, on the transformer default: the same noise and sample count as "quick", the
    # plain solvers at 1/4 and 1/8 of the teacher's MACs, FORA-style caches, each of diffusers' five hooks at its
    # setting nearest 1/4 (PAB and FasterCache at their most aggressive: they stop near 1/1.2), and the
    # Flexiffusion searches at 1/4 and 1/8 (the full preset above adds 1/16, more settings and the AutoDiffusion
    # peer)
    "transformer-quick": BenchConfig(samples=500, teacher_steps=50, ddim_steps=(12,), dpm_steps=(6, 12),
                                     unipc_steps=(), deepcache_intervals=(4,), deepcache_branches=(0,),
                                     deepcache_nonuniform=(), deepcache_dpm_steps=(25,),
                                     hook_peers=(("fbc", 0.3), ("taylorseer", 5), ("magcache", 0.3), ("pab", 8),
                                                 ("fastercache", 8)),
                                     hook_steps=50, search_budgets=(1 / 4, 1 / 8), search_population=10,
                                     search_generations=5, search_eval_samples=128, flexiffusion_metrics=("rfid",),
                                     autodiffusion=False, mixture_deepcache=0),
}


def parse_hook_peers(text: str, option: str = "--hooks") -> tuple[tuple[str, float], ...]:
    """'fbc:0.1,taylorseer:3' -> (("fbc", 0.1), ("taylorseer", 3.0)), each checked (kind and range)."""
    from .peers import check_peer

    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        kind, _, value = item.partition(":")
        try:
            setting = float(value)
        except ValueError:
            raise FlexdiffError(f"{option} {text!r}: each item is KIND:SETTING, e.g. fbc:0.1 (kinds: fbc, "
                                "taylorseer, magcache, pab, fastercache)") from None
        try:
            check_peer(kind, setting)
        except FlexdiffError as e:
            raise FlexdiffError(f"{option} {item}: {e}") from None
        out.append((kind, setting))
    if not out:
        raise FlexdiffError(f"{option} {text!r}: give one or more KIND:SETTING items, or 'none'")
    return tuple(out)


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
