"""The command line's shared parts: the app, errors as one line, progress bars, options, small parsers.

Each command lives in a module of this package; decisions (what to build from the options)
live in the library, so a command reads its options, calls the library and prints.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..errors import FlexdiffError

app = typer.Typer(
    help="Sample pretrained diffusion models faster: step schedules (full / partial / null) "
    "on diffusers UNets, with honest quality and cost measurements.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """flexdiff: faster sampling for pretrained diffusion models."""

ModelOpt = typer.Option(
    None,
    "--model",
    help="A local diffusers model folder or pipeline folder (a UNet, or a DiT / PixArt / SD3 / FLUX transformer). "
    "Default: the digits UNet shipped with flexdiff.",
)


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def user_errors(fn):
    """Turn a FlexdiffError into one red line and exit code 2 (no stack trace)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FlexdiffError as e:
            console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        except (MemoryError, RuntimeError) as e:  # a size the user chose that the machine cannot hold
            text = str(e)
            if not isinstance(e, MemoryError) and "out of memory" not in text.lower() \
                    and "can't allocate memory" not in text.lower():
                raise
            console.print("[red]error:[/red] out of memory: the samples, batch or model asked for do not fit on this "
                          "machine (lower --n, --samples, --eval-samples or the batch size)", highlight=False,
                          soft_wrap=True)
            raise typer.Exit(2)
        except OSError as e:  # the machine said no (disk full, permissions): the user's to fix, not a bug
            where = f" {e.filename}" if e.filename else ""
            console.print(f"[red]error:[/red] cannot read or write{escape(where)}: {escape(e.strerror or str(e))}",
                          highlight=False, soft_wrap=True)
            raise typer.Exit(2)

    return wrapper


def check_output_file(path: Optional[Path], option: str) -> None:
    """Check a file the command will write, before any work; say so when it replaces one."""
    from ..outputs import check_file_target

    if check_file_target(path, option):
        console.print(f"note: {option} {path} exists and will be replaced", highlight=False, markup=False)


DeviceOpt = typer.Option("auto", "--device", help="Where the model runs: auto (cuda if available, else mps, else cpu), cpu, cuda, cuda:N or mps.")
DtypeOpt = typer.Option("auto", "--dtype", help="The model's dtype: auto (bfloat16 on a GPU that has it, float16 on other GPUs, float32 on the CPU), float32, float16 or bfloat16. Noise, the sampler's arithmetic and the metrics stay in float32.")


def placement_from_options(device: str, dtype: str):
    """(torch.device, torch.dtype) from --device / --dtype, checked before anything is read or written."""
    from ..devices import resolve_device, resolve_dtype

    where = resolve_device(device)
    return where, resolve_dtype(dtype, where)


def set_threads(threads: Optional[int]) -> None:
    import torch

    if threads is not None:
        if threads < 1:
            raise FlexdiffError(f"--threads {threads}: must be at least 1 (leave it out for torch's choice)")
        torch.set_num_threads(threads)


def parse_ints(text: str, option: str, minimum: int = 1) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise FlexdiffError(f"{option} {text!r}: expected comma-separated whole numbers, e.g. 5,10,20") from None
    if not values or any(v < minimum for v in values):
        raise FlexdiffError(f"{option} {text!r}: give one or more values, each >= {minimum}")
    return values


def parse_row_ints(text: Optional[str], option: str) -> Optional[tuple[int, ...]]:
    """A bench option listing rows by step count or interval: None (the preset's), 'none' (no such rows) or
    whole numbers of at least 1."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return ()
    try:
        return parse_ints(text, option)
    except FlexdiffError as e:
        raise FlexdiffError(f"{e} (or 'none' for no such rows)") from None


def check_schedule_options(schedule: Optional[Path], sampler: Optional[str], steps: Optional[int],
                           deepcache: Optional[int], branch: Optional[int]) -> None:
    """Options that would be ignored are refused, before anything is read or written: a schedule file says the
    sampler, the steps and each step's kind; --branch belongs to --deepcache."""
    from ..samplers import check_sampler

    given = [f"--{name} {value}" for name, value in (("sampler", sampler), ("steps", steps), ("deepcache", deepcache),
                                                     ("branch", branch)) if value is not None]
    if schedule is not None and given:
        raise FlexdiffError(f"--schedule {schedule} already says the sampler, the steps and each step's kind: leave out "
                            f"{', '.join(given)}")
    if branch is not None and deepcache is None:
        raise FlexdiffError(f"--branch {branch} is the cache branch of --deepcache's partial steps: give --deepcache N too")
    if sampler is not None:
        check_sampler(sampler)


def resolve_schedule(schedule: Optional[Path], sampler: Optional[str], steps: Optional[int],
                     deepcache: Optional[int], branch: Optional[int], loaded):
    """The schedule to run, checked against the model before any sampling; an error names the options or the file
    the schedule came from."""
    from ..schedule import Schedule

    check_schedule_options(schedule, sampler, steps, deepcache, branch)
    if schedule is not None:
        sched, where = Schedule.load(schedule), f"--schedule {schedule}"
    else:
        from ..samplers import check_sampler_fits, default_sampler

        if sampler is not None:
            check_sampler_fits(sampler, loaded.scheduler_config)  # names --sampler
        sampler, steps, branch = sampler or default_sampler(loaded.scheduler_config), steps or 100, branch or 0
        where = " ".join(f"--{n} {v}" for n, v in (("sampler", sampler), ("steps", steps), ("deepcache", deepcache),
                                                   ("branch", branch if deepcache else None)) if v is not None)
        sched = Schedule.deepcache(sampler, steps, deepcache, branch) if deepcache else Schedule.full(sampler, steps)
    check_schedule(sched, loaded, where)
    return sched


def check_schedule(sched, loaded, where: str) -> None:
    """Does `sched` run on this model (branches, timesteps)? The message names the file it came from."""
    from ..anatomy import num_branches
    from ..samplers import check_sampler_fits

    T = int(loaded.scheduler_config.get("num_train_timesteps", 1000))
    try:
        check_sampler_fits(sched.sampler, loaded.scheduler_config, "sampler")
        if sched.num_steps > T:
            raise FlexdiffError(f"{sched.num_steps} steps, but the model was trained on {T} timesteps: at most {T} steps")
        sched.check_fits(num_branches(loaded.unet), num_train_timesteps=T)
    except FlexdiffError as e:
        raise FlexdiffError(f"{where}: {e}" if where else str(e)) from None


def load_cond_file(path: Optional[Path], guidance: float, model):
    """Conditioning for a UNet2DConditionModel from a safetensors file."""
    if not model.is_conditional:
        if path is not None:
            raise FlexdiffError("--cond is only for conditional UNets (UNet2DConditionModel)")
        return None
    if path is None:
        raise FlexdiffError(
            "this model is a UNet2DConditionModel: pass --cond FILE.safetensors with tensors "
            "'encoder_hidden_states' (1 or N, seq, dim) and optionally 'negative'"
        )
    from safetensors.torch import load_file

    from ..sampling import Conditioning

    if not path.is_file():
        raise FlexdiffError(f"--cond {path}: no such file")
    try:
        tensors = load_file(path)
    except Exception as e:
        raise FlexdiffError(f"--cond {path}: not a readable safetensors file ({e})") from None
    if "encoder_hidden_states" not in tensors:
        raise FlexdiffError(f"--cond {path}: missing tensor 'encoder_hidden_states' (found {sorted(tensors)})")
    return Conditioning(tensors["encoder_hidden_states"], tensors.get("negative"), guidance)


LabelsOpt = typer.Option(None, "--labels", help="Class-conditional models (the default): 'all' (each class in turn) or class indices, e.g. 3 or 0,1,7, cycled over the samples. Default: unconditional (the null label).")
GuidanceOpt = typer.Option(1.0, "--guidance", help="Classifier-free guidance scale (with --labels, or --cond for text UNets); 1 = none.")


PromptOpt = typer.Option(None, "--prompt", help="Text-to-image pipelines: a prompt (repeatable; cycled over the samples). Encoded by the pipeline's own text encoder(s).")
PromptsOpt = typer.Option(None, "--prompts", help="A text file with one prompt per line (a fixed set for search and evaluation).")
NegativeOpt = typer.Option(None, "--negative-prompt", help="The unconditional branch of guidance (default: what the pipeline uses, the empty prompt).")


def prompts_from_options(prompt: Optional[list[str]], prompts: Optional[Path]) -> list[str] | None:
    """--prompt (repeatable) and --prompts FILE, together; None when neither is given."""
    out = list(prompt or [])
    if prompts is not None:
        if not prompts.is_file():
            raise FlexdiffError(f"--prompts {prompts}: no such file")
        try:
            lines = prompts.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise FlexdiffError(f"--prompts {prompts}: not a UTF-8 text file") from None
        found = [line.strip() for line in lines if line.strip()]
        if not found:
            raise FlexdiffError(f"--prompts {prompts}: holds no prompt (one per line)")
        out += found
    return out if (prompt or prompts is not None) else None


def conditioning_from_options(loaded, cond: Optional[Path], labels: Optional[str], guidance: float, n: int,
                              prompts: list[str] | None = None, negative: Optional[str] = None):
    """Prompts (--prompt/--prompts), class labels (--labels) or a --cond file; None for an unconditional model."""
    from ..sampling import class_conditioning, num_classes, parse_labels

    classes = num_classes(loaded.unet)
    check_finite(guidance, "--guidance")
    if (prompts is not None or negative is not None) and not loaded.has_text:
        raise FlexdiffError(f"--prompt/--prompts/--negative-prompt: the model at {loaded.path} has no text encoder "
                            "(give a pipeline folder with text_encoder/ and tokenizer/)")
    if labels is not None and classes is None:
        raise FlexdiffError(f"--labels: the model at {loaded.path} has no class labels (it is not a UNet2DModel "
                            "with num_class_embeds)")
    if classes is not None:
        if cond is not None:
            raise FlexdiffError("--cond is only for conditional UNets (UNet2DConditionModel); this model takes --labels")
        return class_conditioning(loaded.unet, parse_labels(labels, classes) if labels is not None else (), n, guidance)
    if guidance != 1.0 and not loaded.is_conditional:
        raise FlexdiffError("--guidance needs a conditional model (--prompt or --cond for a UNet2DConditionModel, "
                            "--labels for a class-conditional UNet2DModel)")
    if loaded.has_text and cond is None:  # no prompt: the empty prompt, as the pipeline's unconditional samples
        return loaded.parts.encode_prompts(prompts or [""], n, negative, guidance)
    if prompts is not None:
        raise FlexdiffError("give either --prompt/--prompts or --cond, not both")
    if cond is not None and getattr(loaded.unet.config, "addition_embed_type", None) == "text_time":
        raise FlexdiffError("--cond: an SDXL UNet also needs its added conditions (pooled text, size ids); give its "
                            "pipeline folder and --prompt instead")
    return load_cond_file(cond, guidance, loaded)


def prompts_for_config(loaded, prompt: Optional[list[str]], prompts: Optional[Path], negative: Optional[str],
                       guidance: float) -> tuple[str, ...]:
    """--prompt/--prompts as a tuple for configs (searches, bench), checked against the model now, before any work."""
    texts = prompts_from_options(prompt, prompts)
    if texts is not None or negative is not None:
        conditioning_from_options(loaded, None, None, guidance, 1, texts, negative)
    return tuple(texts or ())


def labels_from_options(loaded, labels: Optional[str], guidance: float) -> tuple[int, ...]:
    """--labels as a tuple for configs (searches, bench), checked against the model now, before any work."""
    conditioning_from_options(loaded, None, labels, guidance, 1)
    from ..sampling import num_classes, parse_labels

    return parse_labels(labels, num_classes(loaded.unet)) if labels is not None else ()


WorkersOpt = typer.Option(None, "--workers", min=1, help="Run the independent jobs on N local Ray workers (pip install 'flexdiff[ray]'); each uses --threads torch threads. Default: serially here.")
RayAddressOpt = typer.Option(None, "--ray-address", help="Run them on an existing Ray cluster (e.g. auto, or ray://HOST:10001): --workers of them, or one per CPU (per GPU with --gpus-per-worker).")
GpusOpt = typer.Option(0.0, "--gpus-per-worker", min=0.0, help="GPUs each Ray worker reserves (its model moves to its GPU).")


def workers_from_options(workers: Optional[int], address: Optional[str], threads: Optional[int], gpus: float):
    from ..parallel import from_options

    return from_options(workers, address, threads, gpus)


SamplerOpt = typer.Option(None, "--sampler", help="ddim (default) | dpmsolver++ | euler | unipc; on a flow-matching model (SD3, FLUX, the default transformer) flow-euler (default) | flow-dpmsolver++ | flow-unipc. Not with --schedule, which says it.")
StepsOpt = typer.Option(None, "--steps", min=1, help="Sampler steps (default 100; not with --schedule, which says it).")
ScheduleOpt = typer.Option(None, "--schedule", help="A schedule JSON (full / partial:<branch> / null per step).")
DeepCacheOpt = typer.Option(None, "--deepcache", min=1, help="DeepCache uniform 1:N: a full step every N steps, partial between.")
BranchOpt = typer.Option(None, "--branch", min=0, help="Cache branch of partial steps for --deepcache (default 0, the cheapest).")


def parse_floats(text: Optional[str], option: str) -> Optional[tuple[float, ...]]:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise FlexdiffError(f"{option} {text!r}: expected comma-separated numbers, e.g. 0.0625,0.1") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise FlexdiffError(f"{option} {text!r}: give one or more finite numbers, e.g. 0.0625,0.1 (or 'none')")
    return values


def check_finite(value: Optional[float], option: str) -> None:
    """nan and inf pass typer's range checks (every comparison with nan is false): refuse them by name."""
    if value is not None and not math.isfinite(value):
        raise FlexdiffError(f"{option} {value}: must be a finite number")


def training_images_from_option(data: Optional[Path], loaded):
    if data is None:
        return None  # the pipeline uses the digits for the default model, and refuses other models
    from ..data import load_image_folder

    if loaded.is_latent:  # a latent model trains on its decoder's latents of the images, not on resized pixels
        c, size, _ = loaded.image_shape
        return loaded.parts.encode(load_image_folder(data, size, c))
    c = loaded.unet.config
    return load_image_folder(data, c.sample_size, c.in_channels)
