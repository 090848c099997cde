"""Typed, validated parameters: ``params.yaml`` -> frozen pydantic models.

``params.yaml`` is the single source of truth: the models below declare the *schema* (names,
types, ranges, choices) and carry no defaults, so a value lives in exactly one place. Loading
rejects, each on one line naming the dotted key:

- unknown keys, with the closest valid dotted name suggested (``data.resolutoin`` ->
  ``data.resolution``);
- missing keys, with the expected type;
- wrong types, values out of range and invalid choices, with what is allowed;
- broken rules between fields (``ddpm.beta_start < ddpm.beta_end``, a UNet that cannot be built).

Field types are pydantic v2 with ``strict=True`` (YAML ``"64"`` is not the integer 64, ``true``
is not 1) and constraints attached with ``Annotated``::

    resolution: Annotated[int, Field(ge=16, le=1024, multiple_of=8)]

pydantic's :class:`~pydantic.ValidationError` is rewritten into this module's one-line messages
(:func:`parse_params`), so users never see its multi-line format.
"""

from __future__ import annotations

import difflib
import functools
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union

import yaml
from pydantic import (
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from diffmodels.core.errors import ParamsError

# --------------------------------------------------------------------------------------------
# Field types shared by the groups
# --------------------------------------------------------------------------------------------

Item = TypeVar("Item")


def _list_to_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


# A YAML list, kept as a tuple so the params stay frozen and hashable.
ListOf = Annotated[tuple[Item, ...], BeforeValidator(_list_to_tuple)]


def _yaml_number(value: Any) -> Any:
    """PyYAML follows YAML 1.1, which reads ``1e-4`` (no dot) as a string; such strings and
    integers (``lr: 1``) become floats. Anything else is left for the float check to reject."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            return value
    return value


Number = Annotated[float, BeforeValidator(_yaml_number), AllowInfNan(False)]


def _same_type_as_the_choices(value: Any) -> Any:
    # Literal[1, 3] alone takes True and 1.0 (they compare equal to 1); params must say 1.
    if isinstance(value, (bool, float)):
        raise PydanticCustomError("literal_error", "not one of the choices")
    return value


IntChoice = BeforeValidator(_same_type_as_the_choices)  # for Literal choices that are integers

Count = Annotated[int, Field(ge=1)]
Fraction = Annotated[Number, Field(ge=0.0, lt=1.0)]
NonNegative = Annotated[Number, Field(ge=0.0)]
LearningRate = Annotated[Number, Field(gt=0.0, le=1.0)]
Text = Annotated[str, Field(min_length=1)]
Device = Literal["auto", "cpu", "cuda", "mps"]
# Mixed precision of a training stage (diffmodels/training/precision.py, Precision.from_mode):
# auto = bf16 on CUDA when supported, else fp16 + GradScaler; autocast on CUDA only.
AmpMode = Literal["auto", "bf16", "fp16", "off"]
SdDtype = Literal["auto", "float32", "float16", "bfloat16"]
SdSide = Annotated[int, Field(ge=8, le=2048, multiple_of=8)]

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
MaskSet = Literal[MASK_SETS]  # type: ignore[valid-type]


class _Group(BaseModel):
    """One params.yaml group: exactly its keys (no defaults, no extras), typed strictly, frozen.

    :meth:`rules` lists the broken rules that involve several fields; pydantic runs it once every
    field of the group is valid, so a rule never reports on a value that is itself wrong."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_group(cls, raw: Any) -> Any:
        # `data:` with nothing under it reads as null: report each of its keys missing.
        return {} if raw is None else raw

    @model_validator(mode="after")
    def _check_rules(self) -> _Group:
        problems = self.rules()
        if problems:
            raise PydanticCustomError("params_rules", "{problems}", {"problems": tuple(problems)})
        return self

    def rules(self) -> list[str]:
        """Broken cross-field rules, one line each naming the dotted keys (empty: all hold)."""
        return []


# --------------------------------------------------------------------------------------------
# Schema. One model per params.yaml group.
# --------------------------------------------------------------------------------------------


class DataParams(_Group):
    dataset: Literal["fashion_mnist", "folder"]
    source: Text | None
    labels: bool
    resolution: Annotated[int, Field(ge=16, le=1024, multiple_of=8)]  # >= 2 latent tiles a side
    channels: Annotated[Literal[1, 3], IntChoice]
    val_fraction: Fraction
    test_fraction: Fraction
    max_train: Count | None
    max_val: Count | None
    max_test: Count | None
    min_images: Count
    mask_sets: ListOf[MaskSet]
    masks_per_set: Count
    preview_images: Annotated[int, Field(ge=1, le=256)]

    def rules(self) -> list[str]:
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


class VaeParams(_Group):
    # Architecture (diffmodels/models/vae.py, VAEConfig: same names; stored in the weights file)
    arch: Literal["localized", "conventional"]
    base_channels: Annotated[int, Field(ge=1, le=1024)]
    channel_mult: ListOf[Annotated[int, Field(ge=1, le=64)]]
    blocks_per_level: Annotated[int, Field(ge=1, le=8)]
    se: bool
    se_reduction: Annotated[int, Field(ge=1, le=64)]
    decoder_kernel: Annotated[Literal[3, 5, 7], IntChoice]
    decoder_kernel_scales: ListOf[Annotated[Literal[1, 2, 4], IntChoice]]  # scales with k x k convs
    upsample: Literal["nearest", "pixel_shuffle"]
    norm_groups: Count  # GroupNorm groups, arch=conventional
    # Objective
    loss: Literal["l1", "mse"]
    beta_kl: NonNegative
    freq_weight: NonNegative  # L1 on FFT amplitudes (diffmodels/models/discriminator.py); 0 = off
    # GAN (diffmodels/models/discriminator.py); disc_weight 0 = no discriminator
    disc_weight: NonNegative
    disc_start: Annotated[int, Field(ge=0)]
    disc_channels: Annotated[int, Field(ge=1, le=512)]
    disc_layers: Annotated[int, Field(ge=1, le=5)]
    disc_lr: LearningRate
    # Optimisation (diffmodels/training/state.py)
    lr: LearningRate
    weight_decay: NonNegative
    warmup_steps: Annotated[int, Field(ge=0)]
    steps: Count
    batch_size: Count
    grad_clip: Annotated[Number, Field(gt=0.0)]
    amp: AmpMode
    device: Device
    # Bookkeeping
    checkpoint_every: Count
    log_every: Count
    val_every: Count
    num_val_images: Count
    grid_images: Annotated[int, Field(ge=1, le=64)]

    def rules(self) -> list[str]:
        errors = []
        if len(self.channel_mult) != 4:
            errors.append(
                f"vae.channel_mult needs 4 entries, one per pixel scale 1, 2, 4, 8 (got {len(self.channel_mult)})"
            )
        if len(set(self.decoder_kernel_scales)) != len(self.decoder_kernel_scales):
            errors.append(f"vae.decoder_kernel_scales lists a scale twice (got {self.decoder_kernel_scales})")
        if self.warmup_steps >= self.steps:
            errors.append(f"vae.warmup_steps must be < vae.steps (got {self.warmup_steps} >= {self.steps})")
        if self.disc_weight > 0 and self.disc_start >= self.steps:
            errors.append(f"vae.disc_start must be < vae.steps when vae.disc_weight > 0, or the discriminator "
                          f"never trains (got {self.disc_start} >= {self.steps}); lower it or set vae.disc_weight: 0")
        if self.arch == "conventional":
            widths = [self.base_channels * m for m in self.channel_mult]
            if any(w % self.norm_groups for w in widths):
                errors.append(f"vae.norm_groups {self.norm_groups} must divide every width {widths} "
                              "(vae.base_channels x vae.channel_mult) for arch=conventional; e.g. a divisor of "
                              f"vae.base_channels {self.base_channels}")
        return errors


class LatentsParams(_Group):
    channels: Annotated[int, Field(ge=1, le=64)]
    batch_size: Count


class DdpmParams(_Group):
    # Diffusion (diffmodels/diffusion/schedule.py)
    schedule: Literal["linear", "scaled_linear", "cosine"]
    num_steps: Annotated[int, Field(ge=2, le=10000)]
    beta_start: Annotated[Number, Field(gt=0.0, lt=1.0)]
    beta_end: Annotated[Number, Field(gt=0.0, lt=1.0)]
    prediction: Literal["eps", "x0", "v"]
    latent_source: Literal["mean", "sample"]
    # Denoiser (diffmodels/models/unet.py, UNetConfig: same names; diffmodels/models/serpentine.py)
    mixer: Literal["serpentine", "attention", "none"]
    mixer_downsample: ListOf[Annotated[int, Field(ge=1)]]  # 1 = latent grid, 2 = half side, ...
    base_channels: Annotated[int, Field(ge=8, le=2048)]
    channel_mult: ListOf[Annotated[int, Field(ge=1, le=16)]]
    blocks_per_level: Annotated[int, Field(ge=1, le=8)]
    norm_groups: Count
    attention_heads: Count
    scan_directions: Annotated[Literal[1, 2, 4], IntChoice]
    scan_merge: Literal["sum", "mean"]
    ssm_state: Annotated[int, Field(ge=1, le=256)]
    ssm_expand: Annotated[int, Field(ge=1, le=4)]
    ssm_headdim: Annotated[int, Field(ge=1, le=1024)]
    dropout: Fraction
    conditional: bool
    cond_dropout: Fraction
    # Optimisation (diffmodels/training/state.py)
    lr: LearningRate
    weight_decay: NonNegative
    warmup_steps: Annotated[int, Field(ge=0)]
    steps: Count
    batch_size: Count
    grad_clip: Annotated[Number, Field(gt=0.0)]
    ema_decay: Annotated[Number, Field(ge=0.0, lt=1.0)]
    amp: AmpMode
    device: Device
    # Bookkeeping
    checkpoint_every: Count
    log_every: Count
    sample_every: Count
    sample_images: Annotated[int, Field(ge=1, le=64)]
    sample_steps: Annotated[int, Field(ge=1, le=10000)]
    sample_guidance: NonNegative

    def rules(self) -> list[str]:
        errors = []
        if self.beta_start >= self.beta_end:
            errors.append(f"ddpm.beta_start must be < ddpm.beta_end (got {self.beta_start:g} >= {self.beta_end:g})")
        if self.warmup_steps >= self.steps:
            errors.append(f"ddpm.warmup_steps must be < ddpm.steps (got {self.warmup_steps} >= {self.steps})")
        if self.sample_steps > self.num_steps:
            errors.append(f"ddpm.sample_steps must be <= ddpm.num_steps (got {self.sample_steps} > {self.num_steps})")
        if not self.channel_mult:
            errors.append("ddpm.channel_mult needs at least one level")
        return errors


class SampleParams(_Group):
    ddpm_images: Annotated[int, Field(ge=2, le=100000)]  # ancestral DDPM samples: the grid and FID/KID
    ddim_images: Annotated[int, Field(ge=2, le=100000)]  # DDIM samples (~35x cheaper per image)
    batch_size: Count
    ddpm_variance: Literal["beta", "posterior"]  # sigma_t^2 of ancestral DDPM: beta_t or beta_tilde_t (Ho et al. 2020)
    ddim_steps: Annotated[int, Field(ge=1, le=10000)]
    ddim_eta: Annotated[Number, Field(ge=0.0, le=1.0)]
    guidance_scales: ListOf[NonNegative]  # one class-conditional row set each
    strip_points: Annotated[int, Field(ge=2, le=50)]  # decoded x0 estimates in the denoising strip
    why_iterate_steps: ListOf[Count]  # noise levels t of the "why iterate" figure
    anagram_classes: ListOf[Annotated[int, Field(ge=0)]]  # (upright class, flipped class)
    anagram_guidance: NonNegative
    per_class_images: Annotated[int, Field(ge=0, le=100000)]  # guided DDIM samples per class for P/R; 0 = off
    per_class_guidance: NonNegative

    def rules(self) -> list[str]:
        errors = []
        if 0 < self.per_class_images <= 5:
            errors.append(f"sample.per_class_images must be 0 (off) or more than 5, the k-NN size of density / "
                          f"coverage (got {self.per_class_images})")
        if len(self.anagram_classes) != 2:
            errors.append(f"sample.anagram_classes needs exactly 2 class indices (got {len(self.anagram_classes)})")
        if not self.guidance_scales:
            errors.append("sample.guidance_scales needs at least one scale")
        return errors


class InpaintParams(_Group):
    methods: ListOf[Literal["clamp_mean", "replace_noised", "repaint", "sdedit"]]
    num_images: Annotated[int, Field(ge=1, le=100000)]  # test images per mask set
    batch_size: Count
    mask_policy: Literal["nearest", "conservative"]  # pixel keep-mask -> latent tiles (diffmodels/diffusion/inpaint.py)
    sampler: Literal["ddpm", "ddim"]
    ddim_steps: Annotated[int, Field(ge=1, le=10000)]
    repaint_jump: Count  # RePaint jump length j (Lugmayr et al. 2022)
    repaint_resample: Count  # RePaint resample count r
    sdedit_t0: Count  # level the sdedit method noises the image to
    paste_back: bool
    panel_images: Annotated[int, Field(ge=1, le=16)]  # rows in each example panel

    def rules(self) -> list[str]:
        return [] if self.methods else ["inpaint.methods needs at least one method"]


class LeakageParams(_Group):
    num_images: Annotated[int, Field(ge=1, le=100000)]  # test images per mask set
    samples: Count  # hole replacements per image (diffmodels/metrics/leakage.py)


class EvalParams(_Group):
    fid_real_images: Annotated[int, Field(ge=4)] | None  # reference images from the full test split; None: all
    fid_batch_size: Count  # images per InceptionV3 batch
    kid_subsets: Count  # random subsets averaged by KID
    kid_subset_size: Annotated[int, Field(ge=2)] | None  # images per KID subset; None: min(n, 1000)
    fid_bootstrap: Annotated[int, Field(ge=2, le=100000)]  # resamples of the FID/KID bootstrap intervals
    floor_repeats: Annotated[int, Field(ge=1, le=100)]  # disjoint real-subset draws of the FID floor
    bootstrap: Annotated[int, Field(ge=2, le=1000000)]  # resamples of per-image metric intervals
    vae_images: Annotated[int, Field(ge=2)]  # validation images reconstructed by eval_vae


class SdParams(_Group):
    # Weights (stage convert_sd; diffmodels/sd/convert.py)
    checkpoint: Text | None  # local .safetensors / .ckpt file or diffusers folder; null: SD stages skip
    architecture: Literal["v1-5", "tiny"]  # tiny: the random test models of tests/sd_reference.py
    use_ema: bool  # take the model_ema.* UNet weights when the file has them
    # Sampling (stage sd_baselines; diffmodels/sd/pipeline.py)
    prompts: ListOf[Text]
    negative_prompt: Text | None
    steps: Annotated[int, Field(ge=1, le=1000)]  # DDIM steps
    guidance: NonNegative
    height: SdSide
    width: SdSide
    batch_size: Count
    num_test_images: Annotated[int, Field(ge=1, le=64)]  # test images for img2img and inpainting
    image_prompt: Text  # prompt for img2img and inpainting of the test images
    strength: Annotated[Number, Field(gt=0.0, le=1.0)]  # img2img (SDEdit) strength
    inpaint_mask_set: MaskSet
    anagram_prompts: ListOf[Text]  # (upright, flipped)
    anagram_flip: Literal["vertical", "horizontal", "rot180"]
    # Placement (diffmodels/sd/device.py)
    device: Device
    dtype: SdDtype  # UNet and text encoder; auto = float16 on a GPU, float32 on the CPU
    vae_dtype: SdDtype  # float32 recommended: v1's VAE overflows float16
    offload: bool  # each component on the GPU only while it runs

    def rules(self) -> list[str]:
        errors = []
        if not self.prompts:
            errors.append("sd.prompts needs at least one prompt")
        if len(self.anagram_prompts) != 2:
            errors.append("sd.anagram_prompts needs exactly 2 prompts, upright and flipped "
                          f"(got {len(self.anagram_prompts)})")
        if self.device == "cpu" and "float16" in (self.dtype, self.vae_dtype):
            errors.append("sd.dtype / sd.vae_dtype float16 needs a GPU; use float32 or bfloat16 with sd.device cpu")
        return errors


class DistributedParams(_Group):
    # Data-parallel training of train_vae and train_ddpm (diffmodels/training/distributed.py)
    nproc_per_node: Annotated[int, Field(ge=1, le=1024)]  # > 1: the stage re-runs itself under torchrun
    backend: Literal["auto", "gloo", "nccl"]  # auto: nccl on CUDA, gloo on the CPU


class TrackingParams(_Group):
    experiment: Text
    log_images: bool


class Params(_Group):
    seed: Annotated[int, Field(ge=0, lt=2**32)]
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

    def rules(self) -> list[str]:
        """Rules across groups; pydantic runs them only once every group is valid."""
        errors = []
        # The denoiser states its own constraints (level count vs the latent grid the data gives,
        # norm groups, heads); asked here so a network that cannot be built fails at load, naming the key.
        from diffmodels.models.unet import (
            UNetConfig,  # the model layer; imported late to keep loading params light
        )

        unet = UNetConfig.from_params(self.ddpm, in_channels=self.latents.channels,
                                      latent_size=self.data.resolution // 8, num_classes=0)
        errors.extend(unet.problems())
        # A KID subset is drawn from the generated set, so it cannot hold more than n images.
        size = self.eval.kid_subset_size
        sets = (("sample.ddpm_images", self.sample.ddpm_images), ("sample.ddim_images", self.sample.ddim_images),
                ("inpaint.num_images", self.inpaint.num_images * len(self.data.mask_sets)))
        for key, n in sets:
            if size is not None and size > n:
                errors.append(f"eval.kid_subset_size {size} exceeds the {n} images of {key}: set it to at most {n} "
                              "or null (min(n, 1000))")
                break
        # Each training process takes an equal share of every global batch.
        nproc = self.distributed.nproc_per_node
        for key, batch in (("vae.batch_size", self.vae.batch_size), ("ddpm.batch_size", self.ddpm.batch_size)):
            if batch % nproc:
                errors.append(f"{key} {batch} must be a multiple of distributed.nproc_per_node {nproc} "
                              "(each process takes an equal share of the batch)")
        return errors


# --------------------------------------------------------------------------------------------
# Loading
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
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = [line for error in exc.errors() for line in _explain(error)]
        raise ParamsError("\n".join(f"{source}: {p}" for p in problems)) from None


def flatten(params: BaseModel, groups: Iterable[str] | None = None) -> dict[str, Any]:
    """Dotted ``{key: value}`` view of a params model, for MLflow (``ddpm.batch_size``).

    ``groups`` restricts the result to those top-level names (a stage logs what it reads).
    Lists become their string form, so every value is a scalar MLflow accepts.
    """
    flat: dict[str, Any] = {}

    def walk(obj: BaseModel, prefix: str) -> None:
        for name in type(obj).model_fields:
            value = getattr(obj, name)
            if isinstance(value, BaseModel):
                walk(value, f"{prefix}{name}.")
            else:
                flat[f"{prefix}{name}"] = str(list(value)) if isinstance(value, tuple) else value

    walk(params, "")
    if groups is not None:
        wanted = tuple(groups)
        flat = {k: v for k, v in flat.items() if k.split(".")[0] in wanted}
    return flat


# --------------------------------------------------------------------------------------------
# pydantic errors -> one line each, naming the dotted key
# --------------------------------------------------------------------------------------------

_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
_BOUND_ERRORS = {"greater_than_equal", "greater_than", "less_than_equal", "less_than", "multiple_of"}
_LIST_ERRORS = {"tuple_type", "list_type", "iterable_type"}


def _explain(error: Any) -> list[str]:
    """The lines for one pydantic error dict (``type``, ``loc``, ``input``, ``ctx``)."""
    kind, loc, value = error["type"], error["loc"], error.get("input")
    key = _dotted(loc)
    if kind == "params_rules":
        return list(error["ctx"]["problems"])
    if kind in ("extra_forbidden", "invalid_key"):  # invalid_key: not a string (YAML `1:` or `null:`)
        group = _dotted(loc[:-1])
        key = f"{group}.{loc[-1]}" if group else str(loc[-1])
        return [f"unknown key '{key}'{_suggest(key)}"]
    hint = _hint_at(loc)
    if kind == "missing":
        return [f"missing key '{key}' (expected {_describe(hint)})"]
    base, bounds, _ = _unwrap(hint)
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return [f"{key or 'the top level'} must be a mapping of keys to values (got {_show(value)})"]
    if kind == "literal_error" and typing.get_origin(base) is Literal:
        choices = typing.get_args(base)
        near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint_text = f" (did you mean '{near[0]}'?)" if near and near[0] != str(value) else ""
        return [f"{key} must be one of {', '.join(repr(c) for c in choices)}; got {_show(value)}{hint_text}"]
    if kind in _LIST_ERRORS:
        return [f"{key} must be a list (got {_show(value)})"]
    if base is bool:
        return [f"{key} must be true or false (got {_show(value)})"]
    if base is float:
        value = _yaml_number(value)  # show the number the bounds were checked against
    broken = _broken(bounds, value) if kind in _BOUND_ERRORS else None
    if broken is not None:
        return [f"{key} must be {_describe_bounds(bounds)} (got {_show(value)}: not {broken})"]
    if base is int:
        return [f"{key} must be an integer{_bounds_text(bounds)} (got {_show(value)})"]
    if base is float:
        return [f"{key} must be a finite number{_bounds_text(bounds)} (got {_show(value)})"]
    if base is str:
        return [f"{key} must be a non-empty string (got {_show(value)})"]
    return [f"{key or 'the top level'}: {' '.join(str(error['msg']).split())} (got {_show(value)})"]


def _dotted(loc: tuple[str | int, ...]) -> str:
    """``('data', 'mask_sets', 1)`` -> ``data.mask_sets[1]``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _hint_at(loc: tuple[str | int, ...]) -> Any:
    """The declared type at a pydantic error location (``('ddpm', 'channel_mult', 0)``: its items')."""
    hint: Any = Params
    for part in loc:
        base = _unwrap(hint)[0]
        if isinstance(part, int) and typing.get_origin(base) is tuple:
            hint = typing.get_args(base)[0]  # tuple[X, ...]
        elif isinstance(base, type) and issubclass(base, BaseModel) and part in base.model_fields:
            field = base.model_fields[part]
            hint = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
        else:
            return Any  # not a place the schema declares: the caller's generic line
    return hint


def _unwrap(hint: Any) -> tuple[Any, dict[str, float], bool]:
    """``(base type, numeric bounds, nullable)`` of ``hint``, through ``Annotated`` and ``X | None``."""
    bounds: dict[str, float] = {}
    nullable = False
    while True:
        origin = typing.get_origin(hint)
        if origin is Annotated:
            hint, *extras = typing.get_args(hint)
            for extra in extras:
                for item in getattr(extra, "metadata", [extra]):  # a Field(...) holds its constraints in .metadata
                    for name in (*(n for n, _ in _BOUNDS), "multiple_of"):
                        if getattr(item, name, None) is not None:
                            bounds[name] = getattr(item, name)
        elif origin in (Union, types.UnionType) and type(None) in typing.get_args(hint):
            nullable = True
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        else:
            return hint, bounds, nullable


def _broken(bounds: dict[str, float], value: Any) -> str | None:
    """The first bound ``value`` breaks, as its condition (``>= 16``), or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    fails = {"ge": value < bounds.get("ge", value), "gt": "gt" in bounds and value <= bounds["gt"],
             "le": value > bounds.get("le", value), "lt": "lt" in bounds and value >= bounds["lt"]}
    for name, symbol in _BOUNDS:
        if fails[name]:
            return f"{symbol} {bounds[name]:g}"
    if "multiple_of" in bounds and value % bounds["multiple_of"] != 0:
        return f"a multiple of {bounds['multiple_of']}"
    return None


def _describe_bounds(bounds: dict[str, float]) -> str:
    parts = [f"{symbol} {bounds[name]:g}" for name, symbol in _BOUNDS if name in bounds]
    if "multiple_of" in bounds:
        parts.append(f"a multiple of {bounds['multiple_of']}")
    return ", ".join(parts)


def _bounds_text(bounds: dict[str, float]) -> str:
    text = _describe_bounds(bounds)
    return f" ({text})" if text else ""


def _describe(hint: Any) -> str:
    """What a key expects, for 'missing key' lines: ``an integer (>= 1) or null``."""
    base, bounds, nullable = _unwrap(hint)
    if isinstance(base, type) and issubclass(base, BaseModel):
        text = "a mapping"
    elif typing.get_origin(base) is Literal:
        text = "one of " + ", ".join(repr(c) for c in typing.get_args(base))
    elif typing.get_origin(base) is tuple:
        text = f"a list of {_describe(typing.get_args(base)[0])}"
    else:
        names = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
        text = names.get(base, "a value") + _bounds_text(bounds)
    return f"{text} or null" if nullable else text


@functools.cache
def _known_keys(model: type[BaseModel] = Params, prefix: str = "") -> tuple[str, ...]:
    keys: list[str] = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        base = _unwrap(field.annotation)[0]
        if isinstance(base, type) and issubclass(base, BaseModel):
            keys.extend(_known_keys(base, f"{prefix}{name}."))
    return tuple(keys)


def _suggest(dotted: str) -> str:
    # Prefer siblings (same group), then any key: 'data.resolutoin' -> 'data.resolution'.
    known = _known_keys()
    group = dotted.rsplit(".", 1)[0] + "." if "." in dotted else ""
    siblings = [k for k in known if k.startswith(group) and k.count(".") == dotted.count(".")]
    for pool in (siblings, known):
        near = difflib.get_close_matches(dotted, pool, n=1, cutoff=0.6)
        if near:
            return f" (did you mean '{near[0]}'?)"
    return ""


def _show(value: Any) -> str:
    return "null" if value is None else repr(value)
