"""A mixture of experts: one plain diffusers UNet per timestep interval, saved as one folder.

Core data, used by the engine, the cost counter and the loader (the experts package builds
mixtures; everything else only runs them). Here: the intervals, a sub-network's spec, the
mixture module and its one routing rule, and the folder format with its checks.

Layout (`mixture.json` is the manifest):
    mixture.json              format, intervals, one entry per expert (folder, spec, MACs, steps served,
                              weights fingerprint)
    intervals.json            the intervals alone
    scheduler_config.json     the noise schedule the experts were trained with
    expert_0/ ... expert_K/   each a `save_pretrained` UNet folder (safetensors), loadable with from_pretrained
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxTransformer2DModel, UNet2DConditionModel, UNet2DModel

from .conditioning import LABEL_TOKENS_FILE, label_tokens_record, read_label_tokens
from .errors import FlexdiffError
from .fingerprints import weights_fingerprint
from .io import load_strict, read_json, read_json_object, write_json
from .samplers import DEFAULT_SCHEDULER_CONFIG, check_scheduler_config
from .schedule import StepKind
from .transformer_anatomy import TIMESTEP_SCALE

MANIFEST = "mixture.json"
FORMAT = "flexdiff-mixture/1"


def is_mixture(model: torch.nn.Module) -> bool:
    """A mixture of experts module: experts plus a timestep router."""
    return hasattr(model, "experts") and hasattr(model, "route")


def experts_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The UNets behind `model`: itself (the module a torch.compile wrapper holds), or every expert of a mixture."""
    model = getattr(model, "_orig_mod", model)
    return list(model.experts) if is_mixture(model) else [model]


def is_mixture_folder(path: Path) -> bool:
    return (Path(path) / MANIFEST).exists()


@dataclass(frozen=True)
class Intervals:
    """Contiguous timestep intervals: `starts[k]` is interval k's first timestep (ascending, from 0)."""

    starts: tuple[int, ...]
    num_train_timesteps: int
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        s = list(self.starts)
        if not s or s[0] != 0 or any(b <= a for a, b in zip(s, s[1:])) or s[-1] >= self.num_train_timesteps:
            raise FlexdiffError(
                f"intervals: 'starts' must rise strictly from 0 and stay below {self.num_train_timesteps}; got {s}"
            )

    @property
    def k(self) -> int:
        return len(self.starts)

    def bounds(self) -> list[tuple[int, int]]:
        """[(lo, hi)] inclusive, from the noise-free end up."""
        ends = list(self.starts[1:]) + [self.num_train_timesteps]
        return [(a, b - 1) for a, b in zip(self.starts, ends)]

    def indices(self, timesteps) -> np.ndarray:
        """The interval of every timestep (a float timestep between two starts belongs to the lower one)."""
        t = np.asarray(timesteps, dtype=np.float64).reshape(-1)
        return np.maximum(np.searchsorted(np.asarray(self.starts), t, side="right") - 1, 0)

    def index(self, t: float) -> int:
        return int(self.indices(float(t))[0])

    def steps_served(self, timesteps) -> list[int]:
        counts = [0] * self.k
        for t in timesteps:
            counts[self.index(float(t))] += 1
        return counts

    def to_dict(self) -> dict:
        return dict(starts=list(self.starts), bounds=[list(b) for b in self.bounds()],
                    num_train_timesteps=self.num_train_timesteps, **({"meta": self.meta} if self.meta else {}))

    @classmethod
    def from_dict(cls, d: dict, where: str = "intervals") -> "Intervals":
        try:
            return cls(tuple(int(x) for x in d["starts"]), int(d["num_train_timesteps"]), d.get("meta", {}))
        except (KeyError, TypeError, ValueError) as e:
            raise FlexdiffError(f"{where}: needs 'starts' (a list of timesteps) and 'num_train_timesteps' ({e})") from None
        except FlexdiffError as e:  # the file and field the bad starts came from
            raise FlexdiffError(f"{where}: {str(e).removeprefix('intervals: ')}") from None

    def save(self, path: Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> "Intervals":
        path = Path(path)
        if not path.exists():
            raise FlexdiffError(f"{path}: no such intervals file")
        return cls.from_dict(read_json(path), where=str(path))


@dataclass(frozen=True)
class SubnetSpec:
    """A sub-network: channels per stage and ResNets per down stage (plain data, JSON round-trip)."""

    widths: tuple[int, ...]
    depths: tuple[int, ...]

    def to_dict(self) -> dict:
        return dict(widths=list(self.widths), depths=list(self.depths))

    @classmethod
    def from_dict(cls, d: dict, where: str = "spec") -> "SubnetSpec":
        try:
            return cls(tuple(int(w) for w in d["widths"]), tuple(int(x) for x in d["depths"]))
        except (KeyError, TypeError, ValueError) as e:
            raise FlexdiffError(f"{where}: a sub-network needs integer lists 'widths' and 'depths' ({e})") from None

    def label(self) -> str:
        return "w" + "-".join(map(str, self.widths)) + ("/d" + "-".join(map(str, self.depths)))


def layers_per_stage(cfg) -> tuple[int, ...]:
    lpb = cfg.layers_per_block
    n = len(cfg.block_out_channels)
    return tuple(lpb) if isinstance(lpb, (list, tuple)) else (int(lpb),) * n


def full_spec(unet) -> SubnetSpec:
    return SubnetSpec(tuple(unet.config.block_out_channels), layers_per_stage(unet.config))


def spec_mismatch(model, spec: SubnetSpec) -> str | None:
    """How a saved expert differs from the sub-network its manifest entry names (None: it is that one). A UNet's
    spec is its whole shape; a transformer's is its width (heads x head size) and one keep flag per block of the
    model it was cut from, so the expert has as many blocks as flags set."""
    cfg = model.config
    if hasattr(cfg, "block_out_channels"):
        have = full_spec(model)
        return None if have == spec else f"widths {list(have.widths)} and depths {list(have.depths)}"
    width = int(cfg.num_attention_heads) * int(cfg.attention_head_dim)
    blocks = int(cfg.num_layers) + int(getattr(cfg, "num_single_layers", 0) or 0)
    if (width,) == tuple(spec.widths) and blocks == sum(spec.depths):
        return None
    return f"width {width} and {blocks} blocks"


def expert_for_step(kind: StepKind, timestep, current: int, intervals: "Intervals") -> int:
    """The routing rule, used by the engine when sampling and by the cost counter: a full step
    calls the expert of its timestep; partial and null steps stay with the last full step's
    expert, whose deep features are the ones in the cache."""
    return intervals.index(float(timestep)) if kind is StepKind.FULL else current


class Mixture(torch.nn.Module):
    """Calls the expert of the timestep's interval; behaves like a diffusers UNet for samplers and pipelines."""

    def __init__(self, experts: list, intervals: Intervals, scheduler_config: dict | None = None,
                 manifest: dict | None = None):
        super().__init__()
        self.scheduler_config = dict(scheduler_config or DEFAULT_SCHEDULER_CONFIG)
        if len(experts) != intervals.k:
            raise FlexdiffError(f"{len(experts)} experts for {intervals.k} intervals")
        self.experts = torch.nn.ModuleList(experts)
        self.intervals = intervals
        self.manifest = manifest or {}

    @property
    def config(self):
        return self.experts[0].config  # sample size and channels are the same for every expert

    @property
    def dtype(self):
        return next(self.parameters()).dtype

    @property
    def device(self):
        return next(self.parameters()).device

    def route(self, timestep) -> torch.Tensor:
        """The expert index of every timestep in `timestep` (scalar or batch)."""
        return torch.from_numpy(self.intervals.indices(torch.as_tensor(timestep).detach().cpu().numpy()))

    def forward(self, *args, expert: int | None = None, **kwargs):
        """Called as its experts are: a UNet's (sample, timestep, ...), or a transformer's keywords (FLUX: the
        timestep divided by 1,000, which routing scales back to the scheduler's timesteps)."""
        if expert is not None:
            return self.experts[expert](*args, **kwargs)
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        idx = self.route(torch.as_tensor(timestep) * TIMESTEP_SCALE.get(type(self.experts[0]).__name__, 1.0))
        if idx.numel() == 1 or bool((idx == idx[0]).all()):
            return self.experts[int(idx[0])](*args, **kwargs)
        # a batch whose timesteps fall in several intervals (training, mostly): each part goes to its expert
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        t = torch.as_tensor(timestep).reshape(-1)
        out, kind = None, None
        for e in idx.unique().tolist():
            rows = (idx == e).nonzero().reshape(-1)
            part_kwargs = {k: (v[rows] if torch.is_tensor(v) and v.shape[:1] == sample.shape[:1]
                               and k not in UNBATCHED else v) for k, v in kwargs.items()}
            part_args = [sample[rows], t[rows], *args[2:]][:len(args)]  # keyword inputs: their rows are cut above
            res = self.experts[e](*part_args, **part_kwargs)
            part = res.sample if hasattr(res, "sample") else res[0]
            if out is None:
                out, kind = torch.empty((sample.shape[0], *part.shape[1:]), dtype=part.dtype), type(res)
            out[rows] = part
        return kind(sample=out) if hasattr(kind, "__dataclass_fields__") else (out,)


UNBATCHED = ("img_ids", "txt_ids")  # FLUX's token positions: one row per token, not per image

PIPELINE_DIR = "pipeline"  # a latent mixture's decoder and encoders, copied from the pipeline it was pruned from


def save_mixture(experts: list, intervals: Intervals, specs: list[SubnetSpec], scheduler_config: dict,
                 out_dir: Path, info: dict | None = None, pipeline: Path | None = None) -> Path:
    """Write the mixture folder atomically: built beside the target, then renamed into place.

    `pipeline`: the pipeline folder a latent mixture was pruned from; its parts other than the UNet (decoder,
    text encoders, tokenizers, model_index.json) are copied into the mixture's own `pipeline/`, so the folder
    loads wherever it is copied."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        entries = []
        for k, (model, spec, (lo, hi)) in enumerate(zip(experts, specs, intervals.bounds())):
            model.save_pretrained(tmp / f"expert_{k}", safe_serialization=True)
            tokens = label_tokens_record(model)  # a transformer given its labels as tokens keeps saying so
            if tokens is not None:
                write_json(tmp / f"expert_{k}" / LABEL_TOKENS_FILE, tokens)
            entries.append(dict(folder=f"expert_{k}", interval=[lo, hi], spec=spec.to_dict(),
                                parameters=sum(p.numel() for p in model.parameters()),
                                weights=weights_fingerprint(model)))  # checked on load: swapped experts are refused
        if pipeline is not None:
            shutil.copytree(pipeline, tmp / PIPELINE_DIR, ignore=lambda d, names: ["unet"] if Path(d) == Path(pipeline)
                            else [])
            info = {**(info or {}), "pipeline": PIPELINE_DIR}
        write_json(tmp / "intervals.json", intervals.to_dict())
        write_json(tmp / "scheduler_config.json", scheduler_config)
        write_json(tmp / MANIFEST, dict(format=FORMAT, model_class=type(experts[0]).__name__,
                                        intervals=intervals.to_dict(), experts=entries, **(info or {})))
        os.chmod(tmp, 0o755)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# What mixture.json may hold (save_mixture's fields, and what `flexdiff experts` records), and each expert entry
MANIFEST_FIELDS = frozenset({"format", "model_class", "intervals", "experts", "budget", "budget_kind", "sampler",
                             "num_steps", "steps_served", "macs_per_call", "teacher_macs_per_call",
                             "fraction_of_teacher", "settings", "pipeline", "baseline"})
EXPERT_FIELDS = frozenset({"folder", "interval", "spec", "weights", "parameters"})


def load_mixture(path: Path) -> tuple[Mixture, dict]:
    """Load a mixture folder; every problem names the file and the field."""
    path = Path(path)
    man_file = path / MANIFEST
    if not man_file.is_file():
        raise FlexdiffError(f"{path}: not a mixture folder (no {MANIFEST})")
    man = read_json_object(man_file, "the mixture manifest")
    if man.get("format") != FORMAT:
        raise FlexdiffError(f"{man_file}: format is {man.get('format')!r}; expected {FORMAT!r}")
    unknown = sorted(set(man) - MANIFEST_FIELDS)
    if unknown:  # a typo must not pass unnoticed
        raise FlexdiffError(f"{man_file}: unknown field {unknown[0]!r}; accepted fields: {', '.join(sorted(MANIFEST_FIELDS))}")
    classes = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel,
               "FluxTransformer2DModel": FluxTransformer2DModel}
    cls = classes.get(man.get("model_class"))
    if cls is None:
        raise FlexdiffError(f"{man_file}: model_class is {man.get('model_class')!r}; accepted: {', '.join(classes)}")
    intervals = Intervals.from_dict(man.get("intervals") or {}, where=f"{man_file}: intervals")
    entries = man.get("experts")
    if not isinstance(entries, list) or len(entries) != intervals.k:
        raise FlexdiffError(f"{man_file}: 'experts' must list one entry per interval ({intervals.k})")
    root = path.resolve()
    experts = []
    for k, entry in enumerate(entries):
        where = f"{man_file} experts[{k}]"
        if not isinstance(entry, dict):
            raise FlexdiffError(f"{where}: expected an object with 'folder' and 'spec'")
        unknown = sorted(set(entry) - EXPERT_FIELDS)
        if unknown:
            raise FlexdiffError(f"{where}: unknown field {unknown[0]!r}; accepted fields: {', '.join(sorted(EXPERT_FIELDS))}")
        name = entry.get("folder")
        folder = (path / str(name)).resolve() if isinstance(name, str) and name else None
        if folder is None or folder == root or root not in folder.parents:
            raise FlexdiffError(f"{where}.folder {name!r}: must name a subfolder of the mixture folder")
        if not (folder / "config.json").exists() or not any(folder.glob("*.safetensors")):
            raise FlexdiffError(f"{where}.folder {name!r} is not a saved model folder")
        spec = SubnetSpec.from_dict(entry.get("spec") or {}, where=f"{where}.spec")
        if "interval" in entry and list(entry["interval"]) != list(intervals.bounds()[k]):
            raise FlexdiffError(f"{where}.interval {entry['interval']}: the intervals put expert {k} on "
                                f"{list(intervals.bounds()[k])}")
        model = load_strict(cls, folder, f"{where}.folder {name!r}")
        read_label_tokens(model, folder)
        mismatch = spec_mismatch(model, spec)
        if mismatch:
            raise FlexdiffError(f"{where}: the model in {name!r} has {mismatch}, the manifest says {spec.to_dict()} "
                                "(experts swapped or replaced?)")
        if "weights" in entry and weights_fingerprint(model) != entry["weights"]:
            raise FlexdiffError(f"{where}: the weights in {name!r} are not the ones this mixture was saved with "
                                f"(fingerprint {weights_fingerprint(model)}, manifest {entry['weights']}): experts "
                                "swapped or replaced?")
        experts.append(model.eval().requires_grad_(False))
    shapes = {(e.config.in_channels, e.config.out_channels, getattr(e.config, "sample_size", None),
               getattr(e, "flexdiff_latent_size", None)) for e in experts}
    if len(shapes) > 1:
        raise FlexdiffError(f"{man_file}: the experts disagree on (in_channels, out_channels, sample_size): {sorted(shapes)}")
    sched_file = path / "scheduler_config.json"
    sched = check_scheduler_config(read_json_object(sched_file, "the scheduler config"), sched_file) \
        if sched_file.exists() else dict(DEFAULT_SCHEDULER_CONFIG)
    T = sched.get("num_train_timesteps", 1000)
    if intervals.num_train_timesteps != T:
        raise FlexdiffError(f"{man_file}: the intervals cover {intervals.num_train_timesteps} timesteps but "
                            f"{sched_file.name} has num_train_timesteps {T}")
    return Mixture(experts, intervals, sched, man).eval().requires_grad_(False), man


def describe_manifest(man: dict) -> list[str]:
    """A mixture in words, one line per expert: its interval, size and share of the teacher's cost."""
    lines = [f"mixture at {man['fraction_of_teacher']:.3f} of the teacher's MACs ({man['sampler']}-{man['num_steps']})"]
    for e, calls, served in zip(man["experts"], man["macs_per_call"], man["steps_served"]):
        lines.append(f"  expert t in [{e['interval'][0]}, {e['interval'][1]}]: widths {e['spec']['widths']}, "
                     f"depths {e['spec']['depths']}, {calls / man['teacher_macs_per_call']:.2f} of the teacher per "
                     f"call, {served} steps")
    return lines


def original_teacher_macs(man: dict, steps: int) -> float:
    """MACs per image of the model the mixture was pruned from, sampling `steps` full steps."""
    return man["teacher_macs_per_call"] * steps
