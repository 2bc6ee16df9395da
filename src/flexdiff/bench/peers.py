"""diffusers' own cache hooks as the bench's peers on a transformer.

FirstBlockCache, TaylorSeer, MagCache, PyramidAttentionBroadcast and FasterCache are applied through diffusers'
public API (`diffusers.hooks.apply_*`) to a copy of the bench's model and run by flexdiff's own sampling loop over
a plain sampler (the same noise, conditioning and batches as every other row). They decide at run time, call by
call, whether to compute, so a row's MACs are not known from a schedule: they are counted from the modules whose
own forward actually ran (`MacsCounter`), per batch (every row of a batch shares the hooks' decisions), and the
spread over batches is reported. The count costs a dictionary increment per module call, so the same run gives the
images, the MACs and the wall-clock.
MagCache is calibrated as its documentation says: one run with `calibrate=True` on the same sampler, whose
printed ratios configure the real runs. A hook that cannot run on the model is reported with the reason.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import functools
import io
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..anatomy import anatomy
from ..errors import FlexdiffError
from ..schedule import Schedule

# kind -> (diffusers' name, what the setting is, accepted range as (low, high, whole number?))
PEER_KINDS = {
    "fbc": ("FirstBlockCache", "threshold", (0.0, 1.0, False)),
    "taylorseer": ("TaylorSeerCache", "cache interval", (1, 50, True)),
    "magcache": ("MagCache", "threshold", (0.0, 1.0, False)),
    "pab": ("PyramidAttentionBroadcast", "attention block skip range", (2, 50, True)),
    "fastercache": ("FasterCache", "attention block skip range", (2, 50, True)),
}


# MagCache's reach: how many calls in a row it may skip and the share of first steps it never skips (diffusers'
# defaults: 3 and 0.2, at most 1 / (0.2 + 0.8 / 4) = 2.5x fewer calls; these allow up to 1 / (0.1 + 0.9 / 9) = 5x)
MAGCACHE_REACH = dict(max_skip_steps=8, retention_ratio=0.1)


@dataclass(frozen=True)
class HookPeer:
    """One of diffusers' cache hooks at one setting, over `steps` steps of `sampler`."""

    kind: str
    setting: float
    steps: int
    sampler: str = "flow-euler"

    def __post_init__(self):
        check_peer(self.kind, self.setting)

    @property
    def name(self) -> str:
        label, what, (_, _, whole) = PEER_KINDS[self.kind]
        value = int(self.setting) if whole else self.setting
        return f"{label} {what} {value:g} ({self.sampler}-{self.steps})"

    @property
    def base(self) -> Schedule:
        """The plain sampler run the hook decides over (every call asked for; the hook skips work inside)."""
        return Schedule.full(self.sampler, self.steps, name=f"{self.kind}-{self.setting:g}-{self.sampler}{self.steps}")

    def key(self) -> str:
        return f"hook:{self.kind}:{self.setting!r}:{self.sampler}:{self.steps}"


def check_peer(kind: str, setting: float) -> None:
    if kind not in PEER_KINDS:
        raise FlexdiffError(f"hook peer {kind!r}: accepted kinds are {', '.join(PEER_KINDS)}")
    label, what, (low, high, whole) = PEER_KINDS[kind]
    ok = isinstance(setting, (int, float)) and not isinstance(setting, bool) and low <= setting <= high
    if not ok or (whole and float(setting) != int(setting)) or (not whole and setting in (low, high)):
        kind_of = "a whole number" if whole else "a number strictly"
        raise FlexdiffError(f"{label} {what} {setting!r}: must be {kind_of} between {low:g} and {high:g}")


def _config(peer: HookPeer, timestep, mag_ratios=None, calibrate: bool = False):
    from diffusers.hooks import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )

    s = peer.setting
    if peer.kind == "fbc":
        return FirstBlockCacheConfig(threshold=float(s))
    if peer.kind == "taylorseer":  # lite: skips the blocks, Taylor-predicts proj_out (the default mode, attention
        # only, stops at 1.3x on the default transformer over 50 steps: measured, docs/bench.md)
        return TaylorSeerCacheConfig(cache_interval=int(s), taylor_factors_dtype=torch.float32, use_lite_mode=True)
    if peer.kind == "magcache":  # its defaults (3 skips in a row, the first 20% kept) stop at 2.5x over 50 steps
        return MagCacheConfig(threshold=float(s), num_inference_steps=peer.steps, mag_ratios=mag_ratios,
                              calibrate=calibrate, **MAGCACHE_REACH)
    if peer.kind == "pab":
        return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=int(s),
                                               spatial_attention_timestep_skip_range=(100, 800),
                                               current_timestep_callback=timestep)
    return FasterCacheConfig(spatial_attention_block_skip_range=int(s), spatial_attention_timestep_skip_range=(-1, 681),
                             current_timestep_callback=timestep, attention_weight_callback=lambda _: 0.3,
                             is_guidance_distilled=True)


def _apply(peer: HookPeer, model, config) -> None:
    from diffusers import hooks

    apply = {"fbc": hooks.apply_first_block_cache, "taylorseer": hooks.apply_taylorseer_cache,
             "magcache": hooks.apply_mag_cache, "pab": hooks.apply_pyramid_attention_broadcast,
             "fastercache": hooks.apply_faster_cache}[peer.kind]
    apply(model, config)


class MacsCounter:
    """The MACs of the calls a hooked model actually made.

    Installed on a model before diffusers' hooks, it wraps each module's own `forward`; a hook that skips a module
    (returns a cached output, or predicts it) never calls that wrapped forward, so the module's calls counted are
    the ones that computed. Each module's own MACs per call (its children's left out) come from torch's FLOP counter
    on one call of the unhooked model with the same inputs, made once per input shape. A batch's MACs are then the
    calls counted times those MACs (tests/test_bench_peers.py checks them against the FLOP counter around the hooked
    run itself)."""

    def __init__(self, model: torch.nn.Module, reference: torch.nn.Module):
        self.reference = reference  # the same modules under the same names, without hooks
        self.calls: dict[str, int] = {}
        self._first: tuple | None = None  # the first call's inputs of the batch being counted
        self._own: dict[tuple, dict[str, float]] = {}  # input shapes -> MACs of each module's own work per call
        for name, module in model.named_modules():
            module.forward = self._counting(name, module.forward)

        def first(module, args, kwargs):
            if self._first is None:
                self._first = (args, kwargs)

        model.register_forward_pre_hook(first, with_kwargs=True)

    def _counting(self, name: str, forward):
        calls = self.calls

        def counted(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return forward(*args, **kwargs)

        return functools.update_wrapper(counted, forward)

    def start(self) -> None:
        """A new batch: nothing counted yet."""
        self.calls.clear()
        self._first = None

    def macs(self) -> float:
        """MACs of the calls counted since `start`."""
        if self._first is None:
            return 0.0
        own = self._own_macs(*self._first)
        return sum(n * own.get(name, 0.0) for name, n in self.calls.items())

    def _own_macs(self, args, kwargs) -> dict[str, float]:
        shapes = tuple(tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in (*args, *kwargs.values()))
        if shapes not in self._own:
            self._own[shapes] = _own_macs_per_call(self.reference, args, kwargs)
        return self._own[shapes]


def _own_macs_per_call(model: torch.nn.Module, args, kwargs) -> dict[str, float]:
    """Each module's MACs in one forward of `model`, its children's left out, per call of it."""
    own: dict[str, float] = {}
    calls: dict[str, int] = {}
    stack: list[list] = []  # [name, counter total at entry, children's MACs]
    counter = FlopCounterMode(display=False)

    def enter(name):
        def pre(module, inputs):
            stack.append([name, counter.get_total_flops(), 0])
        return pre

    def leave(module, inputs, output):
        name, start, children = stack.pop()
        inclusive = counter.get_total_flops() - start
        own[name] = own.get(name, 0.0) + (inclusive - children) / 2
        calls[name] = calls.get(name, 0) + 1
        if stack:
            stack[-1][2] += inclusive

    handles = []
    for name, module in model.named_modules():
        handles += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave)]
    try:
        with counter, torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return {name: own[name] / calls[name] for name in own}


def _hooked_copy(model, peer: HookPeer, mag_ratios=None, calibrate: bool = False, count: bool = False):
    """A copy of `model` with the peer's hook applied, the cache context set, and the current scheduler
    timestep kept where PAB and FasterCache read it. `count`: a `MacsCounter` installed under the hooks, returned
    beside the copy."""
    m = copy.deepcopy(model)
    counter = MacsCounter(m, model) if count else None
    anat, now = anatomy(m), {"t": 1000.0}

    def remember(module, args, kwargs):
        now["t"] = float(torch.as_tensor(anat.timestep(args, kwargs)).reshape(-1)[0])

    m.register_forward_pre_hook(remember, with_kwargs=True)
    _apply(peer, m, _config(peer, lambda: now["t"], mag_ratios, calibrate))
    _reset(m)
    return (m, counter) if count else m


def _reset(model) -> None:
    """A new sampling run for the hooks: their state emptied, one cache context ("cond": guidance is batched)."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(recurse=True)
    _set_cache_context(model, CacheContext("cond"))


def calibrate_magcache(model, scheduler_config: dict, peer: HookPeer, noise, cond) -> list[float]:
    """MagCache's ratios for this model and sampler, as its docs say: one run with calibrate=True (one batch)."""
    from ..sampling import sample

    m = _hooked_copy(model, peer, calibrate=True)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        sample(m, scheduler_config, peer.base, noise, batch_size=len(noise), cond=cond)
    lines = [ln for ln in printed.getvalue().splitlines() if ln.startswith("[")]
    if not lines:
        raise FlexdiffError("MagCache's calibration printed no ratios")
    return [float(v) for v in ast.literal_eval(lines[-1])]


@dataclass
class PeerRun:
    images: torch.Tensor
    seconds: float  # the whole run, every batch
    macs: list[float]  # MACs per image of each batch (counted: the calls and blocks that ran)


def run_peer(model, scheduler_config: dict, peer: HookPeer, noise: torch.Tensor, batch_size: int, cond=None,
             progress=None, mag_ratios: list[float] | None = None) -> PeerRun:
    """Sample `noise` with the peer's hook on a copy of `model`, timed, counting each batch's MACs as it runs."""
    from ..devices import placement, synchronize
    from ..sampling import sample

    try:
        m, counter = _hooked_copy(model, peer, mag_ratios, count=True)
    except Exception as e:  # diffusers refuses models its hook does not know
        raise FlexdiffError(f"{peer.name} cannot run on {type(model).__name__}: {str(e).splitlines()[0]}") from None
    device = placement(m)[0]
    outs, macs, seconds = [], [], 0.0
    task = progress.add_task(peer.name, total=len(noise)) if progress else None
    for start in range(0, len(noise), batch_size):  # each batch a fresh sampling run for the hooks
        chunk = noise[start:start + batch_size]
        part = cond.rows(start, start + len(chunk)) if cond is not None else None
        _reset(m)
        counter.start()
        synchronize(device)
        t0 = time.perf_counter()
        try:
            outs.append(sample(m, scheduler_config, peer.base, chunk, batch_size=len(chunk), cond=part).images)
        except FlexdiffError:
            raise
        except Exception as e:
            raise FlexdiffError(f"{peer.name} cannot run on {type(model).__name__}: "
                                f"{type(e).__name__}: {str(e).splitlines()[0]}") from None
        synchronize(device)
        seconds += time.perf_counter() - t0
        macs.append(counter.macs() / len(chunk))  # after the clock: the reference call it may make is not timed
        if task is not None:
            progress.update(task, advance=len(chunk))
    if task is not None:
        progress.remove_task(task)
    return PeerRun(images=torch.cat(outs), seconds=seconds, macs=macs)


class PeerRunner:
    """Runs the bench's hook peers on its model, noise and conditioning; MagCache's ratios are calibrated once per
    base sampler run (on the first batch) and reused by every MagCache row."""

    def __init__(self, loaded, noise: torch.Tensor, cond, batch_size: int, progress=None):
        self.loaded, self.noise, self.cond, self.batch_size, self.progress = loaded, noise, cond, batch_size, progress
        self._ratios: dict[tuple[str, int], list[float]] = {}

    def run(self, peer: HookPeer) -> PeerRun:
        model, sched = self.loaded.unet, self.loaded.scheduler_config
        ratios = None
        if peer.kind == "magcache":
            key = (peer.sampler, peer.steps)
            if key not in self._ratios:
                n = min(self.batch_size, len(self.noise))
                part = self.cond.rows(0, n) if self.cond is not None else None
                self._ratios[key] = calibrate_magcache(model, sched, peer, self.noise[:n], part)
            ratios = self._ratios[key]
        return run_peer(model, sched, peer, self.noise, self.batch_size, self.cond, self.progress, ratios)
