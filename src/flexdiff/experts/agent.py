"""The Expert Routing Agent: a small network that picks every expert's sub-network under one budget.

Per expert it outputs logits over each elastic factor (the width of every cuttable stage, and
the depth). Training samples sub-networks with the straight-through Gumbel-softmax (Jang et al.
2017) and scores them on the expert's denoising + distillation loss; the gradient of
    sum_s  y_s * (L_s - mean_s' L_s')            (y_s: the relaxed one-hot weight of sample s)
moves probability towards the sub-networks that denoise better than their siblings on the same
batch; each expert's term is weighted by the steps it serves, so the agent minimises the loss of
a whole sampling run. The budget loss is on the *expected* MACs of that run,
    E[MACs] = sum_e (steps served by e) * E_{p_e}[MACs(spec)],
exact and differentiable (every spec's MACs are counted once):
    lambda * log(E[MACs] / budget) + w * log(E[MACs] / budget)^2,
with lambda raised by dual ascent while over the budget. The agent, not a hand-set ratio,
decides how the budget is split between experts.

What the agent compares (`score`): by default the distance of each sub-network's prediction to the
teacher's on the same batch (the distillation term alone). The denoising loss ("denoise": the regression
target plus the distillation term) carries the error no model can remove, which dominates at high noise and
makes sub-networks of very different sizes look alike there (docs/experts.md, the transformer mixture).

The final choice is the most probable joint setting that spends at least `spend` of the budget and no
more than all of it (dynamic programming over the experts); where no setting lands in that window, the
most probable one within the budget. A policy trained to spend the budget *on average* can have its mode far
below it: taking the mode alone left a fifth of the budget unspent on the transformer.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..configs import Config
from ..errors import FlexdiffError
from ..fit import Fit
from ..io import save_figure, write_json
from .elastic import ElasticUNet, SubnetSpec
from .finetune import IntervalBatches, denoise_loss


@dataclass(frozen=True)
class AgentConfig(Config):
    steps: int = 200
    samples: int = 4  # sub-networks scored per expert and step (on the same batch)
    batch_size: int = 64
    lr: float = 0.01
    budget_weight: float = 4.0
    dual_lr: float = 0.5
    entropy: float = 0.1  # exploration bonus, annealed to zero over training
    tau_start: float = 2.0
    tau_end: float = 0.3
    distill: float = 1.0
    score: str = "teacher"  # what the sub-networks are compared on (SCORES)
    spend: float = 0.9  # the final choice spends at least this fraction of the budget (where a setting does)
    seed: int = 0
    checkpoint_every: int = 25


SCORES = ("teacher", "denoise")  # the distance to the teacher's prediction; the denoising + distillation loss


def check_choice_rule(score: str, spend: float) -> None:
    """The agent's scoring and final-choice settings, checked before any stage runs."""
    if score not in SCORES:
        raise FlexdiffError(f"--agent-score {score!r}; accepted: {', '.join(SCORES)}")
    if not 0 <= spend <= 1:
        raise FlexdiffError(f"--agent-spend {spend}: give the fraction of the budget the final choice must spend, "
                            "in [0, 1] (0: the most probable setting within the budget)")


class SpecSpace:
    """The factors an expert can choose (each cuttable stage's width, the depth) and every spec's MACs."""

    def __init__(self, elastic: ElasticUNet, macs_of):
        n = len(elastic.full.widths)
        self.factors: list[tuple[str, object, list]] = []
        for i in range(n):
            choices = elastic.width_choices(i)
            if len(choices) > 1:
                self.factors.append(("width", i, choices))
        if len(elastic.depth_options()) > 1:
            self.factors.append(("depth", None, elastic.depth_options()))
        self.full = elastic.full
        self.shape = tuple(len(f[2]) for f in self.factors)
        grid = np.zeros(self.shape or (1,))
        for idx in self.indices():
            grid[idx if idx else 0] = macs_of(self.spec(idx))
        self.macs = torch.tensor(grid, dtype=torch.float64)  # the cost grid: MACs, or measured latency
        self.full_cost = float(macs_of(self.full))  # the unpruned network's, the budget's unit

    def indices(self) -> list[tuple[int, ...]]:
        """Every spec as a tuple of choice indices, one per factor (() when nothing can be cut)."""
        return list(itertools.product(*(range(s) for s in self.shape)))

    def call_macs(self, idx: tuple[int, ...]) -> float:
        return float(self.macs[idx if idx else 0])

    def spec(self, idx) -> SubnetSpec:
        widths, depths = list(self.full.widths), self.full.depths
        for (kind, stage, choices), k in zip(self.factors, idx):
            if kind == "width":
                widths[stage] = choices[k]
            else:
                depths = choices[k]
        return SubnetSpec(tuple(widths), tuple(depths))

    def expected_macs(self, probs: list[torch.Tensor]) -> torch.Tensor:
        """E[MACs] when each factor is drawn independently from its probabilities."""
        out = self.macs
        for p in reversed(probs):  # contract the last factor first
            out = out @ p.to(out.dtype)
        return out if probs else out[0]


class RoutingAgent(torch.nn.Module):
    """expert embedding -> MLP -> logits for every factor of that expert."""

    def __init__(self, num_experts: int, factor_sizes: tuple[int, ...], hidden: int = 32, seed: int = 0):
        super().__init__()
        self.sizes = factor_sizes
        with torch.random.fork_rng():  # the initial weights depend on `seed` only, not on the caller's stream
            torch.manual_seed(seed)
            self.embed = torch.nn.Parameter(torch.randn(num_experts, 16) * 0.1)
            self.mlp = torch.nn.Sequential(torch.nn.Linear(16, hidden), torch.nn.SiLU(),
                                           torch.nn.Linear(hidden, max(1, sum(factor_sizes))))
        with torch.no_grad():  # start from (nearly) uniform choices
            self.mlp[2].weight.mul_(0.01)
            self.mlp[2].bias.zero_()

    def logits(self) -> list[list[torch.Tensor]]:
        flat = self.mlp(self.embed)
        out = []
        for e in range(flat.shape[0]):
            parts, k = [], 0
            for s in self.sizes:
                parts.append(flat[e, k:k + s])
                k += s
            out.append(parts)
        return out


def _gumbel_hard(logits: torch.Tensor, tau: float, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    u = torch.rand(logits.shape, generator=gen).clamp_(1e-9, 1 - 1e-9)
    y = F.softmax((logits - torch.log(-torch.log(u))) / tau, dim=-1)
    k = int(y.argmax())
    hard = torch.zeros_like(y)
    hard[k] = 1.0
    return hard - y.detach() + y, k  # straight-through: one-hot forward, relaxed gradient


def choose_within_budget(logps: list[np.ndarray], macs: list[np.ndarray], budget: float,
                         spend: float = 0.0, resolution: int = 4000) -> list[int]:
    """Maximise the summed log-probability over experts subject to spend * budget <= sum of weighted MACs <= budget.

    `logps[e]`, `macs[e]`: flat arrays over expert e's specs (MACs already weighted by steps served). When no
    setting reaches `spend * budget`, the most probable one within the budget. With `spend` 0 the answer is exact
    (a Pareto front of (MACs, log-probability) over the experts); with a floor the partial sums are kept per cost
    bin of budget / `resolution` (the best log-probability in each), so the window is met exactly and the
    log-probability to within that binning.
    """
    if spend > 0:
        lo = spend * budget
        states: dict[int, tuple[float, float, list[int]]] = {0: (0.0, 0.0, [])}
        for lp, m in zip(logps, macs):
            nxt: dict[int, tuple[float, float, list[int]]] = {}
            for c, s, picks in states.values():
                for k in range(len(lp)):
                    c2 = c + float(m[k])
                    if c2 > budget * (1 + 1e-9):
                        continue
                    b = int(c2 / budget * resolution)
                    s2 = s + float(lp[k])
                    if b not in nxt or s2 > nxt[b][1]:
                        nxt[b] = (c2, s2, picks + [k])
            states = nxt
        inside = [x for x in states.values() if x[0] >= lo * (1 - 1e-9)]
        if inside:
            return max(inside, key=lambda x: x[1])[2]
    front = [(0.0, 0.0, [])]
    for lp, m in zip(logps, macs):
        cand = [(c + float(m[k]), s + float(lp[k]), picks + [k]) for c, s, picks in front for k in range(len(lp))]
        cand = [x for x in cand if x[0] <= budget * (1 + 1e-9)]
        cand.sort(key=lambda x: (x[0], -x[1]))
        front, best = [], -math.inf
        for x in cand:
            if x[1] > best:
                front.append(x)
                best = x[1]
    if not front:
        raise FlexdiffError("no setting of the experts fits the budget")
    return max(front, key=lambda x: x[1])[2]


def check_budget(space: SpecSpace, served: list[int], budget: float, teacher_macs: float, kind: str = "MACs") -> None:
    """A budget the smallest experts cannot meet is refused before any training."""
    if not 0 < budget <= 1:
        raise FlexdiffError(f"--budget {budget}: give a fraction of the teacher's cost in (0, 1]")
    smallest = float(space.macs.min()) * sum(served)
    if smallest > budget * teacher_macs * (1 + 1e-9):
        raise FlexdiffError(
            f"--budget {budget}: cannot be met; the smallest sub-networks still need "
            f"{smallest / teacher_macs:.3f} of the teacher's cost in {kind} (cut stage 0 and cross-attention stages are "
            "kept whole). Raise --budget, or combine the mixture with a schedule of partial/null steps"
        )


def train_agent(elastics: list[ElasticUNet], batches: list[IntervalBatches], space: SpecSpace | list[SpecSpace],
                served: list[int],
                budget: float, out_dir: Path, cfg: AgentConfig = AgentConfig(), progress=None,
                cost_kind: str = "MACs") -> dict:
    """Train the agent, choose the specs, write `choice.json` and `agent.png`; resumable via `agent.pt`.

    `space`: one for every expert, or one per expert (a transformer's experts each drop blocks in their own scored
    order, so the same choice index is another sub-network, of other MACs, for each; the choices' count is the same)."""
    check_choice_rule(cfg.score, cfg.spend)
    if cfg.score == "teacher" and any(b.teacher is None for b in batches):
        raise FlexdiffError("the agent scores sub-networks against the teacher (--agent-score teacher), but its "
                            "batches carry no teacher; give it one, or use --agent-score denoise")
    spaces = space if isinstance(space, list) else [space] * len(elastics)
    if len({s.shape for s in spaces}) != 1:
        raise FlexdiffError("the experts' spaces of sub-networks differ in shape; one routing agent cannot serve them")
    space = spaces[0]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher_run = space.full_cost * sum(served)
    check_budget(space, served, budget, teacher_run, cost_kind)
    target = budget * teacher_run
    weights = torch.tensor(served, dtype=torch.float64)
    agent = RoutingAgent(len(elastics), space.shape, seed=cfg.seed)
    settings = dict(budget=budget, served=list(served), config=asdict(cfg))

    def refuse(ck: dict) -> str | None:
        same = all(ck.get(k) == v for k, v in settings.items())
        return None if same else "written with other settings; use the same ones to resume, or another folder"

    fit = Fit(out_dir / "agent.pt", cfg.steps, torch.optim.Adam(agent.parameters(), lr=cfg.lr),
              torch.Generator().manual_seed(cfg.seed), {"agent": agent}, checkpoint_every=cfg.checkpoint_every,
              clip=None, state=dict(history=[], scale=None, multiplier=0.0), tags=settings, refuse=refuse,
              what="routing agent checkpoint")
    state = fit.state

    def step_loss(step: int, gen: torch.Generator) -> float:
        tau = cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** (step / max(1, cfg.steps - 1))
        logits = agent.logits()
        quality = torch.zeros((), dtype=torch.float64)
        mean_losses, advs = [], []
        for e, (elastic, b) in enumerate(zip(elastics, batches)):
            xt, t, regress_to, teacher_pred, kw = b.draw(cfg.batch_size, gen)
            ys, losses = [], []
            for _ in range(cfg.samples):
                picks = [_gumbel_hard(lg, tau, gen) for lg in logits[e]]
                y = torch.ones((), dtype=torch.float32)
                for hard, k in picks:
                    y = y * hard[k]
                with torch.no_grad():
                    pred = b.predict(elastic, xt, t, kw, spec=spaces[e].spec([k for _, k in picks]))
                    if cfg.score == "teacher":
                        loss = float(F.mse_loss(pred, teacher_pred))
                    else:
                        loss = float(denoise_loss(pred, regress_to, teacher_pred, cfg.distill))
                ys.append(y)
                losses.append(loss)
            adv = torch.tensor(losses) - sum(losses) / len(losses)  # the siblings on the same batch are the baseline
            advs.append(adv)
            quality = quality + (served[e] / sum(served)) * sum(y * a for y, a in zip(ys, adv)) / len(ys)
            mean_losses.append(sum(losses) / len(losses))
        # one scale for all experts (a running mean of |advantage|): it keeps the step size steady without
        # erasing how much more one interval's loss depends on width than another's
        s = float(torch.cat(advs).abs().mean()) + 1e-12
        state["scale"] = s if state["scale"] is None else 0.9 * state["scale"] + 0.1 * s
        quality = quality / state["scale"]
        probs = [[F.softmax(lg, dim=-1) for lg in lgs] for lgs in logits]
        expected = sum(weights[e] * spaces[e].expected_macs(probs[e]) for e in range(len(elastics)))
        over = torch.log(expected / target)
        # budget loss: a multiplier raised by dual ascent while the expected cost is over the budget
        # (lowered while under), plus a quadratic term; the cost settles on the budget whatever the
        # scale of the quality signal
        budget_loss = state["multiplier"] * over + cfg.budget_weight * over ** 2
        entropy = -sum((p * torch.log(p + 1e-12)).sum() for ps in probs for p in ps)
        loss = quality + budget_loss - cfg.entropy * (1 - step / max(1, cfg.steps)) * entropy
        state["multiplier"] = max(0.0, state["multiplier"] + cfg.dual_lr * float(over.detach()))
        loss.backward()
        state["history"].append(dict(step=step + 1, expected_fraction=float(expected.detach() / teacher_run), tau=tau,
                                     multiplier=state["multiplier"], losses=mean_losses))
        return float(loss.detach())

    fit.run(step_loss, progress, "routing agent",
            describe=lambda f: f"routing agent E[MACs] {f.state['history'][-1]['expected_fraction']:.3f}")
    history, elapsed = state["history"], fit.elapsed
    with torch.no_grad():
        logits = agent.logits()
    idx_all = space.indices()
    calls_all = [np.array([s.call_macs(idx) for idx in idx_all]) for s in spaces]
    logps = []
    for e in range(len(elastics)):
        lp = [F.log_softmax(lg, -1) for lg in logits[e]]
        logps.append(np.array([float(sum(lp[f][k] for f, k in enumerate(idx))) for idx in idx_all]))
    picks = choose_within_budget(logps, [c * n for c, n in zip(calls_all, served)], target, cfg.spend)
    calls = [float(calls_all[e][k]) for e, k in enumerate(picks)]
    total = sum(c * n for c, n in zip(calls, served))
    full_call = space.full_cost
    experts = [dict(spec=spaces[e].spec(idx_all[k]).to_dict(), macs_per_call=c, fraction_of_full=c / full_call,
                    steps_served=n, share_of_run=c * n / total, probability=float(math.exp(logps[e][k])))
               for e, (k, c, n) in enumerate(zip(picks, calls, served))]
    result = dict(budget=budget, fraction_of_teacher=total / teacher_run, experts=experts,
                  wall_time_s=elapsed, steps=cfg.steps, config=asdict(cfg))
    write_json(out_dir / "choice.json", result)
    write_json(out_dir / "history.json", history)
    plot_agent(history, experts, budget, out_dir / "agent.png")
    return result


def plot_agent(history: list[dict], experts: list[dict], budget: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    a1.plot([h["step"] for h in history], [h["expected_fraction"] for h in history], label="E[MACs] / teacher")
    a1.axhline(budget, color="red", ls="--", label=f"budget {budget:g}")
    a1.set_xlabel("agent step")
    a1.set_ylabel("fraction of the teacher's MACs")
    a1.legend()
    a1.set_title("expected cost during training")
    xs = np.arange(len(experts))
    a2.bar(xs, [x["fraction_of_full"] for x in experts], color="tab:blue")
    for i, x in enumerate(experts):
        # widths, then depths (a transformer's: one keep flag per block)
        shape = SubnetSpec.from_dict(x["spec"]).label()
        a2.text(i, x["fraction_of_full"] + 0.02, f"{x['steps_served']} steps\n{shape}", ha="center", fontsize=8)
    a2.set_xticks(xs, [f"expert {i}" for i in xs])
    a2.set_ylim(0, 1.25)
    a2.set_ylabel("MACs per call / full model")
    a2.set_title("the split the agent chose")
    fig.tight_layout()
    save_figure(path, fig)
    plt.close(fig)
