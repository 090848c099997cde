"""Typed, validated parameters: ``params.yaml`` -> frozen dataclasses.

``params.yaml`` is the single source of truth: the dataclasses below declare the *schema* (names,
types, ranges, choices) and carry no defaults, so a value lives in exactly one place. Loading
rejects, each on one line naming the dotted key:

- unknown keys, with the closest valid dotted name suggested (``data.resolutoin`` ->
  ``data.resolution``);
- missing keys, with the expected type;
- wrong types, values out of range and invalid choices, with what is allowed.

Constraints are attached with ``typing.Annotated``::

    resolution: Annotated[int, Range(ge=8, multiple_of=8)]
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml

from diffmodels.core.errors import ParamsError


@dataclass(frozen=True)
class Range:
    """Numeric constraint for ``Annotated`` fields (all bounds inclusive unless named ``gt``/``lt``)."""

    ge: float | None = None
    le: float | None = None
    gt: float | None = None
    lt: float | None = None
    multiple_of: int | None = None

    def violations(self, value: float) -> str | None:
        if self.ge is not None and value < self.ge:
            return f">= {self.ge:g}"
        if self.gt is not None and value <= self.gt:
            return f"> {self.gt:g}"
        if self.le is not None and value > self.le:
            return f"<= {self.le:g}"
        if self.lt is not None and value >= self.lt:
            return f"< {self.lt:g}"
        if self.multiple_of is not None and value % self.multiple_of != 0:
            return f"a multiple of {self.multiple_of}"
        return None

    def describe(self) -> str:
        parts = []
        for name, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            bound = getattr(self, name)
            if bound is not None:
                parts.append(f"{symbol} {bound:g}")
        if self.multiple_of is not None:
            parts.append(f"a multiple of {self.multiple_of}")
        return ", ".join(parts)


# --------------------------------------------------------------------------------------------
# Schema. One dataclass per params.yaml group; later issues add their fields.
# --------------------------------------------------------------------------------------------

MASK_SETS = (
    "centre_aligned",
    "centre_offset",
    "boxes_aligned",
    "boxes_offset",
    "brush_aligned",
    "brush_offset",
    "half_aligned",
    "half_offset",
)

Fraction = Annotated[float, Range(ge=0.0, lt=1.0)]
Count = Annotated[int, Range(ge=1)]


@dataclass(frozen=True)
class DataParams:
    dataset: Literal["fashion_mnist", "folder"]
    source: str | None
    labels: bool
    resolution: Annotated[int, Range(ge=16, le=1024, multiple_of=8)]  # >= 2 latent tiles a side
    channels: Literal[1, 3]
    val_fraction: Fraction
    test_fraction: Fraction
    max_train: Count | None
    max_val: Count | None
    max_test: Count | None
    min_images: Count
    mask_sets: tuple[Literal[MASK_SETS], ...]  # type: ignore[valid-type]
    masks_per_set: Count
    preview_images: Annotated[int, Range(ge=1, le=256)]

    def check(self) -> list[str]:
        errors = []
        if self.dataset == "folder" and not self.source:
            errors.append("data.source must name a folder of images when data.dataset is 'folder'")
        if self.val_fraction + self.test_fraction >= 1.0:
            errors.append(
                "data.val_fraction + data.test_fraction must be < 1 "
                f"(got {self.val_fraction:g} + {self.test_fraction:g})"
            )
        if len(set(self.mask_sets)) != len(self.mask_sets):
            errors.append("data.mask_sets lists a mask set twice")
        return errors


@dataclass(frozen=True)
class VaeParams:
    # Architecture (diffmodels/models/vae.py; stored in the weights file)
    base_channels: Annotated[int, Range(ge=1, le=1024)]
    channel_mult: tuple[Annotated[int, Range(ge=1, le=64)], ...]
    blocks_per_level: Annotated[int, Range(ge=1, le=8)]
    se: bool
    se_reduction: Annotated[int, Range(ge=1, le=64)]
    decoder_kernel: Literal[3, 5, 7]
    upsample: Literal["nearest", "pixel_shuffle"]
    # Objective
    loss: Literal["l1", "mse"]
    beta_kl: Annotated[float, Range(ge=0.0)]
    # Optimisation (diffmodels/training/state.py)
    lr: Annotated[float, Range(gt=0.0, le=1.0)]
    weight_decay: Annotated[float, Range(ge=0.0)]
    warmup_steps: Annotated[int, Range(ge=0)]
    steps: Count
    batch_size: Count
    grad_clip: Annotated[float, Range(gt=0.0)]
    amp: Literal["auto", "bf16", "fp16", "off"]
    device: Literal["auto", "cpu", "cuda", "mps"]
    # Bookkeeping
    checkpoint_every: Count
    log_every: Count
    val_every: Count
    num_val_images: Count
    grid_images: Annotated[int, Range(ge=1, le=64)]

    def check(self) -> list[str]:
        errors = []
        if len(self.channel_mult) != 4:
            errors.append(
                f"vae.channel_mult needs 4 entries, one per pixel scale 1, 2, 4, 8 (got {len(self.channel_mult)})"
            )
        if self.warmup_steps >= self.steps:
            errors.append(f"vae.warmup_steps must be < vae.steps (got {self.warmup_steps} >= {self.steps})")
        return errors


@dataclass(frozen=True)
class LatentsParams:
    channels: Annotated[int, Range(ge=1, le=64)]
    batch_size: Count


@dataclass(frozen=True)
class DdpmParams:
    # Diffusion (diffmodels/diffusion/schedule.py)
    schedule: Literal["linear", "scaled_linear", "cosine"]
    num_steps: Annotated[int, Range(ge=2, le=10000)]
    beta_start: Annotated[float, Range(gt=0.0, lt=1.0)]
    beta_end: Annotated[float, Range(gt=0.0, lt=1.0)]
    prediction: Literal["eps", "x0", "v"]
    latent_source: Literal["mean", "sample"]
    # Denoiser (diffmodels/models/unet.py, diffmodels/models/serpentine.py)
    mixer: Literal["serpentine", "attention", "none"]
    mixer_downsample: tuple[Annotated[int, Range(ge=1)], ...]  # 1 = latent grid, 2 = half side, ...
    base_channels: Annotated[int, Range(ge=8, le=2048)]
    channel_mults: tuple[Annotated[int, Range(ge=1, le=16)], ...]
    blocks_per_level: Annotated[int, Range(ge=1, le=8)]
    norm_groups: Annotated[int, Range(ge=1)]
    attention_heads: Annotated[int, Range(ge=1)]
    scan_directions: Literal[1, 2, 4]
    scan_merge: Literal["sum", "mean"]
    ssm_state: Annotated[int, Range(ge=1, le=256)]
    dropout: Fraction
    conditional: bool
    cond_dropout: Fraction
    # Optimisation (diffmodels/training/state.py)
    lr: Annotated[float, Range(gt=0.0, le=1.0)]
    weight_decay: Annotated[float, Range(ge=0.0)]
    warmup_steps: Annotated[int, Range(ge=0)]
    steps: Count
    batch_size: Count
    grad_clip: Annotated[float, Range(gt=0.0)]
    ema_decay: Annotated[float, Range(ge=0.0, lt=1.0)]
    amp: Literal["auto", "bf16", "fp16", "off"]
    device: Literal["auto", "cpu", "cuda", "mps"]
    # Bookkeeping
    checkpoint_every: Count
    log_every: Count
    sample_every: Count
    sample_images: Annotated[int, Range(ge=1, le=64)]
    sample_steps: Annotated[int, Range(ge=1, le=10000)]
    sample_guidance: Annotated[float, Range(ge=0.0)]

    def check(self) -> list[str]:
        errors = []
        if self.beta_start >= self.beta_end:
            errors.append(f"ddpm.beta_start must be < ddpm.beta_end (got {self.beta_start:g} >= {self.beta_end:g})")
        if self.warmup_steps >= self.steps:
            errors.append(f"ddpm.warmup_steps must be < ddpm.steps (got {self.warmup_steps} >= {self.steps})")
        if self.sample_steps > self.num_steps:
            errors.append(f"ddpm.sample_steps must be <= ddpm.num_steps (got {self.sample_steps} > {self.num_steps})")
        if not self.channel_mults:
            errors.append("ddpm.channel_mults needs at least one level")
        return errors


@dataclass(frozen=True)
class SampleParams:
    num_images: Annotated[int, Range(ge=2, le=100000)]  # per sampler, for the grids and FID/KID
    batch_size: Count
    ddpm_variance: Literal["beta", "posterior"]  # sigma_t^2 of ancestral DDPM (SPEC 5.4)
    ddim_steps: Annotated[int, Range(ge=1, le=10000)]
    ddim_eta: Annotated[float, Range(ge=0.0, le=1.0)]
    guidance_scales: tuple[Annotated[float, Range(ge=0.0)], ...]  # one class-conditional row set each
    strip_points: Annotated[int, Range(ge=2, le=50)]  # decoded x0 estimates in the denoising strip
    why_iterate_steps: tuple[Annotated[int, Range(ge=1)], ...]  # noise levels t of the "why iterate" figure
    anagram_classes: tuple[Annotated[int, Range(ge=0)], ...]  # (upright class, flipped class)
    anagram_guidance: Annotated[float, Range(ge=0.0)]

    def check(self) -> list[str]:
        errors = []
        if len(self.anagram_classes) != 2:
            errors.append(f"sample.anagram_classes needs exactly 2 class indices (got {len(self.anagram_classes)})")
        if not self.guidance_scales:
            errors.append("sample.guidance_scales needs at least one scale")
        return errors


@dataclass(frozen=True)
class InpaintParams:
    methods: tuple[Literal["clamp_mean", "replace_noised", "repaint", "sdedit"], ...]
    num_images: Annotated[int, Range(ge=1, le=100000)]  # test images per mask set
    batch_size: Count
    mask_policy: Literal["nearest", "conservative"]  # pixel keep-mask -> latent tiles (SPEC 5.5)
    sampler: Literal["ddpm", "ddim"]
    ddim_steps: Annotated[int, Range(ge=1, le=10000)]
    repaint_jump: Count  # RePaint jump length j
    repaint_resample: Count  # RePaint resample count r
    sdedit_t0: Annotated[int, Range(ge=1)]  # level the sdedit method noises the image to
    paste_back: bool
    panel_images: Annotated[int, Range(ge=1, le=16)]  # rows in each example panel

    def check(self) -> list[str]:
        return [] if self.methods else ["inpaint.methods needs at least one method"]


@dataclass(frozen=True)
class LeakageParams:
    num_images: Annotated[int, Range(ge=1, le=100000)]  # test images per mask set
    samples: Count  # R hole replacements per image (SPEC 6.1, 6.2)


@dataclass(frozen=True)
class EvalParams:
    fid_real_images: Annotated[int, Range(ge=2)]  # test images in the FID/KID reference set
    fid_batch_size: Count  # images per InceptionV3 batch
    kid_subsets: Count  # random subsets averaged by KID


Device = Literal["auto", "cpu", "cuda", "mps"]
SdDtype = Literal["auto", "float32", "float16", "bfloat16"]
SdSide = Annotated[int, Range(ge=8, le=2048, multiple_of=8)]


@dataclass(frozen=True)
class SdParams:
    # Weights (stage convert_sd; diffmodels/sd/convert.py)
    checkpoint: str | None  # local .safetensors / .ckpt file or diffusers folder; null: SD stages skip
    architecture: Literal["v1-5", "tiny"]  # tiny: the random test models of tests/sd_reference.py
    use_ema: bool  # take the model_ema.* UNet weights when the file has them
    # Sampling (stage sd_baselines; diffmodels/sd/pipeline.py)
    prompts: tuple[str, ...]
    negative_prompt: str | None
    steps: Annotated[int, Range(ge=1, le=1000)]  # DDIM steps
    guidance: Annotated[float, Range(ge=0.0)]
    height: SdSide
    width: SdSide
    batch_size: Count
    num_test_images: Annotated[int, Range(ge=1, le=64)]  # test images for img2img and inpainting
    image_prompt: str  # prompt for img2img and inpainting of the test images
    strength: Annotated[float, Range(gt=0.0, le=1.0)]  # img2img (SDEdit) strength
    inpaint_mask_set: Literal[MASK_SETS]  # type: ignore[valid-type]
    anagram_prompts: tuple[str, ...]  # (upright, flipped)
    anagram_flip: Literal["vertical", "horizontal", "rot180"]
    # Placement (diffmodels/sd/device.py)
    device: Device
    dtype: SdDtype  # UNet and text encoder; auto = float16 on a GPU, float32 on the CPU
    vae_dtype: SdDtype  # float32 recommended: v1's VAE overflows float16
    offload: bool  # each component on the GPU only while it runs

    def check(self) -> list[str]:
        errors = []
        if not self.prompts:
            errors.append("sd.prompts needs at least one prompt")
        if len(self.anagram_prompts) != 2:
            errors.append(f"sd.anagram_prompts needs exactly 2 prompts, upright and flipped (got {len(self.anagram_prompts)})")
        if self.device == "cpu" and "float16" in (self.dtype, self.vae_dtype):
            errors.append("sd.dtype / sd.vae_dtype float16 needs a GPU; use float32 or bfloat16 with sd.device cpu")
        return errors


@dataclass(frozen=True)
class DistributedParams:
    # Data-parallel training of train_vae and train_ddpm (diffmodels/training/distributed.py)
    nproc_per_node: Annotated[int, Range(ge=1, le=1024)]  # > 1: the stage re-runs itself under torchrun
    backend: Literal["auto", "gloo", "nccl"]  # auto: nccl on CUDA, gloo on the CPU


@dataclass(frozen=True)
class TrackingParams:
    experiment: str
    log_images: bool


@dataclass(frozen=True)
class Params:
    seed: Annotated[int, Range(ge=0, lt=2**32)]
    data: DataParams
    vae: VaeParams
    latents: LatentsParams
    ddpm: DdpmParams
    sample: SampleParams
    inpaint: InpaintParams
    leakage: LeakageParams
    eval: EvalParams
    sd: SdParams
    distributed: DistributedParams
    tracking: TrackingParams


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``path``; raise :class:`ParamsError` listing every problem, one per line."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: file not found (run from the project root, or pass --params PATH)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ParamsError(f"{path}:{where}: {problem}") from None
    return parse_params(raw, source=str(path))


def parse_params(raw: Any, source: str = "params") -> Params:
    """Validate an already-parsed mapping (e.g. ``yaml.safe_load`` output) into :class:`Params`."""
    errors: list[str] = []
    params = _build(Params, raw, "", errors, _all_dotted_keys(Params))
    if params is not None:
        errors.extend(_cross_checks(params))
    if errors:
        raise ParamsError("\n".join(f"{source}: {e}" for e in errors))
    return params


def flatten(params: Any, groups: typing.Iterable[str] | None = None) -> dict[str, Any]:
    """Dotted ``{key: value}`` view of a params dataclass, for MLflow (``ddpm.batch_size``).

    ``groups`` restricts the result to those top-level names (a stage logs what it reads).
    Lists become their string form, so every value is a scalar MLflow accepts.
    """
    flat: dict[str, Any] = {}

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                walk(value, key + ".")
            else:
                flat[key] = list(value) if isinstance(value, tuple) else value

    walk(params, "")
    if groups is not None:
        wanted = tuple(groups)
        flat = {k: v for k, v in flat.items() if k.split(".")[0] in wanted}
    return {k: (str(v) if isinstance(v, list) else v) for k, v in flat.items()}


def _cross_checks(params: Params) -> list[str]:
    errors = []
    for f in dataclasses.fields(params):
        group = getattr(params, f.name)
        check = getattr(group, "check", None)
        if check is not None:
            errors.extend(check())
    # The denoiser states its own constraints (level count vs the latent grid the data gives,
    # norm groups, heads); asked here so a network that cannot be built fails at load, naming the key.
    if params.ddpm.channel_mults:
        from diffmodels.models.unet import (
            UNetConfig,  # the model layer; imported late to keep loading params light
        )

        unet = UNetConfig.from_params(params.ddpm, in_channels=params.latents.channels,
                                      latent_size=params.data.resolution // 8, num_classes=0)
        errors.extend(unet.problems())
    # Each training process takes an equal share of every global batch.
    nproc = params.distributed.nproc_per_node
    for key, batch in (("vae.batch_size", params.vae.batch_size), ("ddpm.batch_size", params.ddpm.batch_size)):
        if batch % nproc:
            errors.append(f"{key} {batch} must be a multiple of distributed.nproc_per_node {nproc} "
                          "(each process takes an equal share of the batch)")
    return errors


def _all_dotted_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for name, hint in typing.get_type_hints(cls, include_extras=True).items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        base = _strip_annotated(hint)[0]
        if dataclasses.is_dataclass(base):
            keys.extend(_all_dotted_keys(base, dotted + "."))
    return keys


def _build(cls: type, raw: Any, prefix: str, errors: list[str], known: list[str]) -> Any:
    where = prefix[:-1] or "the top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"{where} must be a mapping of keys to values (got {_show(raw)})")
        return None
    hints = typing.get_type_hints(cls, include_extras=True)
    for key in raw:
        if key not in hints:
            dotted = f"{prefix}{key}"
            errors.append(f"unknown key '{dotted}'{_suggest(dotted, known)}")
    values = {}
    for name, hint in hints.items():
        dotted = f"{prefix}{name}"
        if name not in raw:
            errors.append(f"missing key '{dotted}' (expected {_describe(hint)})")
            continue
        values[name] = _convert(raw[name], hint, dotted, errors, known)
    if len(values) != len(hints) or any(v is _INVALID for v in values.values()):
        return None
    return cls(**values)


_INVALID = object()


def _strip_annotated(hint: Any) -> tuple[Any, Range | None]:
    if typing.get_origin(hint) is Annotated:
        base, *extras = typing.get_args(hint)
        ranges = [e for e in extras if isinstance(e, Range)]
        return base, (ranges[0] if ranges else None)
    return hint, None


def _convert(value: Any, hint: Any, key: str, errors: list[str], known: list[str]) -> Any:
    """Check ``value`` against ``hint``; return the converted value or ``_INVALID``."""
    base, rng = _strip_annotated(hint)
    origin = typing.get_origin(base)

    if dataclasses.is_dataclass(base):
        built = _build(base, value, key + ".", errors, known)
        return _INVALID if built is None else built

    if origin in (Union, types.UnionType):
        options = typing.get_args(base)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        if len(inner) == 1:
            return _convert(value, inner[0], key, errors, known)
        raise TypeError(f"unsupported union in schema at {key}")  # schema bug, not user error

    if origin is Literal:
        choices = typing.get_args(base)
        if value in choices and type(value) in {type(c) for c in choices}:
            return value
        shown = ", ".join(repr(c) for c in choices)
        near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint_text = f" (did you mean '{near[0]}'?)" if near and near[0] != str(value) else ""
        errors.append(f"{key} must be one of {shown}; got {_show(value)}{hint_text}")
        return _INVALID

    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            errors.append(f"{key} must be a list (got {_show(value)})")
            return _INVALID
        item_hint = typing.get_args(base)[0]
        items = [_convert(v, item_hint, f"{key}[{i}]", errors, known) for i, v in enumerate(value)]
        return _INVALID if any(i is _INVALID for i in items) else tuple(items)

    if base is bool:
        if isinstance(value, bool):
            return value
        errors.append(f"{key} must be true or false (got {_show(value)})")
        return _INVALID

    if base is int:
        if not isinstance(value, int) or isinstance(value, bool):
            errors.append(f"{key} must be an integer{_range_text(rng)} (got {_show(value)})")
            return _INVALID
    elif base is float:
        if isinstance(value, str):  # YAML 1.1 reads '1e-4' as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            errors.append(f"{key} must be a finite number{_range_text(rng)} (got {_show(value)})")
            return _INVALID
        value = float(value)
    elif base is str:
        if not isinstance(value, str) or not value:
            errors.append(f"{key} must be a non-empty string (got {_show(value)})")
            return _INVALID
    else:
        raise TypeError(f"unsupported type {base!r} in schema at {key}")

    if rng is not None and not isinstance(value, str):
        broken = rng.violations(value)
        if broken is not None:
            errors.append(f"{key} must be {rng.describe()} (got {_show(value)}: not {broken})")
            return _INVALID
    return value


def _range_text(rng: Range | None) -> str:
    text = rng.describe() if rng is not None else ""
    return f" ({text})" if text else ""


def _describe(hint: Any) -> str:
    base, rng = _strip_annotated(hint)
    origin = typing.get_origin(base)
    if dataclasses.is_dataclass(base):
        return "a mapping"
    if origin in (Union, types.UnionType):
        inner = [o for o in typing.get_args(base) if o is not type(None)]
        return f"{_describe(inner[0])} or null"
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(base))
    if origin in (tuple, list):
        return f"a list of {_describe(typing.get_args(base)[0])}"
    name = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}[base]
    return name + _range_text(rng)


def _suggest(dotted: str, known: list[str]) -> str:
    # Prefer siblings (same group), then any key: 'data.resolutoin' -> 'data.resolution'.
    group = dotted.rsplit(".", 1)[0] + "." if "." in dotted else ""
    siblings = [k for k in known if k.startswith(group) and k.count(".") == dotted.count(".")]
    for pool in (siblings, known):
        near = difflib.get_close_matches(dotted, pool, n=1, cutoff=0.6)
        if near:
            return f" (did you mean '{near[0]}'?)"
    return ""


def _show(value: Any) -> str:
    return "null" if value is None else repr(value)
