"""Stable Diffusion v1 checkpoints -> our modules: tables plus strict checks.

    models = convert_checkpoint("v1-5-pruned-emaonly.safetensors")   # -> SDModels
    models = convert_diffusers_folder("stable-diffusion-v1-5/")

Each block type has one function returning rows ``(source key, target key, transform)``; a
component's table walks its config and concatenates them. :func:`apply_rows` then checks that
every row's source exists, every transformed shape equals the target's, every target parameter
is filled and every source key is used (or knowingly ignored), and raises one
:class:`CheckpointError` line listing missing / unexpected keys grouped by prefix. Finally the
module loads with ``load_state_dict(strict=True)``.

Our modules are named after the original CompVis modules, so rows from an original file are
identity renames under a prefix; the only reshape is the VAE's attention projections (1x1
convolutions there, linear layers here). The diffusers folder layout maps through the name
tables in ``_DIFFUSERS_*`` below.

Refused with one clear line: SD 2.x (OpenCLIP text tower, 1024-d context, linear proj_in),
SDXL, 9-channel inpainting UNets, v-prediction checkpoints that declare it, pickles that
``torch.load(weights_only=True)`` rejects because unpickling them would run code (the line names
the global), and truncated or non-checkpoint files.
"""

from __future__ import annotations

import _compat_pickle
import json
import pickle
import pickletools
import re
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from diffmodels.core.errors import CheckpointError
from diffmodels.diffusion.schedule import NoiseSchedule
from diffmodels.sd.clip import CLIPTextConfig, CLIPTextEncoder
from diffmodels.sd.unet import SDUNet, SDUNetConfig
from diffmodels.sd.vae import AutoencoderKL, VAEConfig

Transform = Callable[[Tensor], Tensor] | None
Row = tuple[str, str, Transform]
WB = ("weight", "bias")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
EMA_PREFIX = "model_ema."
# LatentDiffusion's schedule buffers: derived from betas, not weights (alphas_cumprod is checked).
SCHEDULE_KEYS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "logvar",
}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Row builders: one per block type. `names` maps our sub-module name -> the source's.


def _rows(src: str, tgt: str, names: Mapping[str, str], params: tuple[str, ...] = WB, tf: Transform = None) -> list[Row]:
    return [(f"{src}{names.get(n, n)}.{p}", f"{tgt}{n}.{p}", tf) for n in names for p in params]


def _same(*names: str) -> dict[str, str]:
    return {n: n for n in names}


def linear_from_1x1(w: Tensor) -> Tensor:
    """A 1x1 convolution weight (C_out, C_in, 1, 1) as a linear weight (C_out, C_in); 2-D passes."""
    return w.flatten(1) if w.ndim == 4 else w


def conv1x1_from_linear(w: Tensor) -> Tensor:
    """A linear weight (C_out, C_in) as a 1x1 convolution weight; 4-D passes."""
    return w[:, :, None, None] if w.ndim == 2 else w


def unet_resblock_rows(src: str, tgt: str, has_skip: bool, diffusers: bool = False) -> list[Row]:
    ours = ["in_layers.0", "in_layers.2", "emb_layers.1", "out_layers.0", "out_layers.3"] + ["skip_connection"] * has_skip
    theirs = ["norm1", "conv1", "time_emb_proj", "norm2", "conv2", "conv_shortcut"] if diffusers else ours
    return _rows(src, tgt, dict(zip(ours, theirs)))


def transformer_rows(src: str, tgt: str, depth: int, diffusers: bool = False) -> list[Row]:
    """SpatialTransformer: the same names in both layouts; v1 proj_in/out are 1x1 convs (diffusers
    folders of v1 models keep them as convs too, but accept linear-shaped weights)."""
    tf = conv1x1_from_linear if diffusers else None
    rows = _rows(src, tgt, _same("norm")) + _rows(src, tgt, _same("proj_in", "proj_out"), ("weight",), tf)
    rows += _rows(src, tgt, _same("proj_in", "proj_out"), ("bias",))
    for d in range(depth):
        s, t = f"{src}transformer_blocks.{d}.", f"{tgt}transformer_blocks.{d}."
        qkv = [f"attn{a}.to_{x}" for a in (1, 2) for x in "qkv"]
        rows += _rows(s, t, _same(*qkv), ("weight",))
        rows += _rows(s, t, _same("attn1.to_out.0", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "norm1", "norm2", "norm3"))
    return rows


def _module(src: str, tgt: str, params: tuple[str, ...] = WB) -> list[Row]:
    """One module's parameters, renamed whole (``src``/``tgt`` name the module itself)."""
    return [(f"{src}.{p}", f"{tgt}.{p}", None) for p in params]


def unet_rows(c: SDUNetConfig, src: str = UNET_PREFIX, diffusers: bool = False) -> list[Row]:
    """The whole UNet, walking levels exactly as :class:`SDUNet` builds them. Diffusers names:
    ``down_blocks.b.resnets.j``, ``mid_block``, ``up_blocks.b`` (deepest first), ``conv_in``..."""
    mc, L, last = c.model_channels, c.num_res_blocks, len(c.channel_mult) - 1

    def name(original: str, diffusers_name: str) -> str:
        return src + (diffusers_name if diffusers else original)

    def res(ours: str, theirs: str, has_skip: bool) -> list[Row]:  # ours == the original name
        return unet_resblock_rows(name(ours, theirs) + ".", ours + ".", has_skip, diffusers)

    def attn(ours: str, theirs: str) -> list[Row]:
        return transformer_rows(name(ours, theirs) + ".", ours + ".", c.transformer_depth, diffusers)

    rows = _module(name("time_embed.0", "time_embedding.linear_1"), "time_embed.0")
    rows += _module(name("time_embed.2", "time_embedding.linear_2"), "time_embed.2")
    rows += _module(name("input_blocks.0.0", "conv_in"), "input_blocks.0.0")
    k, ch = 1, mc
    for b, mult in enumerate(c.channel_mult):
        for j in range(L):
            rows += res(f"input_blocks.{k}.0", f"down_blocks.{b}.resnets.{j}", ch != mult * mc)
            ch = mult * mc
            if b in c.attention_levels:
                rows += attn(f"input_blocks.{k}.1", f"down_blocks.{b}.attentions.{j}")
            k += 1
        if b < last:
            rows += _module(name(f"input_blocks.{k}.0.op", f"down_blocks.{b}.downsamplers.0.conv"), f"input_blocks.{k}.0.op")
            k += 1
    rows += res("middle_block.0", "mid_block.resnets.0", False)
    rows += attn("middle_block.1", "mid_block.attentions.0")
    rows += res("middle_block.2", "mid_block.resnets.1", False)
    k = 0
    for b, level in enumerate(reversed(range(len(c.channel_mult)))):  # b: diffusers' up-block index
        has_attn = level in c.attention_levels
        for j in range(L + 1):
            rows += res(f"output_blocks.{k}.0", f"up_blocks.{b}.resnets.{j}", True)
            if has_attn:
                rows += attn(f"output_blocks.{k}.1", f"up_blocks.{b}.attentions.{j}")
            if level > 0 and j == L:
                up = f"output_blocks.{k}.{1 + has_attn}.conv"
                rows += _module(name(up, f"up_blocks.{b}.upsamplers.0.conv"), up)
            k += 1
    rows += _module(name("out.0", "conv_norm_out"), "out.0")
    rows += _module(name("out.2", "conv_out"), "out.2")
    return rows


def vae_resnet_rows(src: str, tgt: str, has_skip: bool, diffusers: bool = False) -> list[Row]:
    names = _same("norm1", "conv1", "norm2", "conv2")
    if has_skip:
        names["nin_shortcut"] = "conv_shortcut" if diffusers else "nin_shortcut"
    return _rows(src, tgt, names)


def vae_attn_rows(src: str, tgt: str, names: Mapping[str, str] | None = None) -> list[Row]:
    """Mid-block attention: original 1x1 convs q/k/v/proj_out -> our linear layers. ``names`` maps
    ours to the source's (diffusers: to_q/to_k/to_v/to_out.0, older: query/key/value/proj_attn)."""
    names = names or _same("q", "k", "v", "proj_out")
    norm = {"norm": names.get("norm", "norm")}
    proj = {n: names[n] for n in ("q", "k", "v", "proj_out")}
    return _rows(src, tgt, norm) + _rows(src, tgt, proj, ("weight",), linear_from_1x1) + _rows(src, tgt, proj, ("bias",))


_DIFFUSERS_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_OLD_DIFFUSERS_VAE_ATTN = {"norm": "group_norm", "q": "query", "k": "key", "v": "value", "proj_out": "proj_attn"}


def vae_rows(
    c: VAEConfig, src: str = VAE_PREFIX, diffusers: bool = False, attn_names: Mapping[str, str] | None = None
) -> list[Row]:
    """The whole VAE. Diffusers names ``down_blocks.i.resnets.j``, ``mid_block.resnets.0``, and
    decoder ``up_blocks`` in REVERSED order (up_blocks.0 is the deepest, our up.{n-1})."""
    chans = [c.base_channels * m for m in c.channel_mult]
    n = len(chans)
    attn_names = attn_names or (_DIFFUSERS_VAE_ATTN if diffusers else None)

    def name(original: str, diffusers_name: str) -> str:
        return src + (diffusers_name if diffusers else original)

    def res(ours: str, theirs: str, has_skip: bool) -> list[Row]:  # ours == the original name
        return vae_resnet_rows(name(ours, theirs) + ".", ours + ".", has_skip, diffusers)

    def mid(part: str) -> list[Row]:
        return (
            res(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", False)
            + vae_attn_rows(name(f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0."), f"{part}.mid.attn_1.", attn_names)
            + res(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", False)
        )

    def ends(part: str) -> list[Row]:
        return _module(name(f"{part}.norm_out", f"{part}.conv_norm_out"), f"{part}.norm_out") + _module(
            src + f"{part}.conv_out", f"{part}.conv_out"
        )

    rows = _module(src + "encoder.conv_in", "encoder.conv_in")
    ch = chans[0]
    for i, out in enumerate(chans):
        for j in range(c.num_res_blocks):
            rows += res(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", ch != out)
            ch = out
        if i < n - 1:
            ours = f"encoder.down.{i}.downsample.conv"
            rows += _module(name(ours, f"encoder.down_blocks.{i}.downsamplers.0.conv"), ours)
    rows += mid("encoder") + ends("encoder")

    rows += _module(src + "decoder.conv_in", "decoder.conv_in") + mid("decoder")
    for i in reversed(range(n)):  # in the order the decoder runs them, deepest first
        out, d = chans[i], n - 1 - i  # d: diffusers' up-block index
        for j in range(c.num_res_blocks + 1):
            rows += res(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{d}.resnets.{j}", ch != out)
            ch = out
        if i > 0:
            ours = f"decoder.up.{i}.upsample.conv"
            rows += _module(name(ours, f"decoder.up_blocks.{d}.upsamplers.0.conv"), ours)
    rows += ends("decoder")
    return rows + _module(src + "quant_conv", "quant_conv") + _module(src + "post_quant_conv", "post_quant_conv")


def clip_rows(c: CLIPTextConfig, src: str) -> list[Row]:
    """CLIPTextModel (Hugging Face names; ``src`` includes ``text_model.`` when the file has it)."""
    rows = _rows(src + "embeddings.", "embeddings.", _same("token_embedding", "position_embedding"), ("weight",))
    layer = _same("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2",
                  *(f"self_attn.{p}_proj" for p in "qkv"), "self_attn.out_proj")
    for i in range(c.layers):
        rows += _rows(f"{src}encoder.layers.{i}.", f"encoder.layers.{i}.", layer)
    return rows + _rows(src, "", _same("final_layer_norm"))


# --------------------------------------------------------------------------------------------
# Strict application


def _group(keys: list[str], depth: int = 3) -> str:
    counts = Counter(".".join(k.split(".")[:depth]) for k in keys)
    return ", ".join(f"{p}.* ({n})" if n > 1 else p for p, n in sorted(counts.items()))


def apply_rows(rows: list[Row], source: Mapping[str, Tensor], model: nn.Module, what: str) -> set[str]:
    """Fill ``model`` from ``source`` through ``rows``, strictly; return the source keys used.

    Raises :class:`CheckpointError` naming missing source keys, shape mismatches and model
    parameters no row fills."""
    target = model.state_dict()
    out: dict[str, Tensor] = {}
    missing, mismatched = [], []
    for src, tgt, tf in rows:
        if src not in source:
            missing.append(src)
            continue
        value = source[src] if tf is None else tf(source[src])
        assert tgt in target, f"conversion table names {tgt}, which {type(model).__name__} lacks"
        if value.shape != target[tgt].shape:
            mismatched.append(f"{src} {tuple(source[src].shape)} != {tuple(target[tgt].shape)}")
            continue
        out[tgt] = value
    if missing or mismatched:
        parts = [f"missing {len(missing)}: {_group(missing)}"] if missing else []
        parts += [f"shape mismatch {len(mismatched)}: {'; '.join(mismatched[:3])}"] if mismatched else []
        raise CheckpointError(f"{what}: does not fit the configured model ({' | '.join(parts)})")
    unfilled = sorted(set(target) - set(out))
    assert not unfilled, f"conversion table leaves {unfilled[:5]} unfilled"
    model.load_state_dict(out, strict=True)
    return {src for src, _, _ in rows}


# --------------------------------------------------------------------------------------------
# Reading files


def read_tensors(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A ``.safetensors`` file or a ``.ckpt``/``.pt``/``.pth``/``.bin`` pickle read with
    ``weights_only=True`` -> (flat tensors with floats cast to ``dtype``, string metadata)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    meta: dict[str, str] = {}
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = dict(fh.metadata() or {})
                obj = {k: fh.get_tensor(k) for k in fh.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(f"{path}: not a readable safetensors file ({reason}); is it truncated?") from None
    elif path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        obj = load_pickle(path)
    else:
        raise CheckpointError(f"{path}: unknown checkpoint type {path.suffix!r}; expected .safetensors, .ckpt, .pt, .pth or .bin")
    while isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]  # Lightning nests the weights, sometimes twice
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dictionary of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors; not a model checkpoint")
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}  # fp16 -> fp32
    return tensors, meta


# What torch.load(weights_only=True) refuses, in the words of torch/_weights_only_unpickler.py
# (torch 2.4 - 2.13): a global it does not allow or whose module (os, posix, nt, sys) is blocked,
# named as module.name; or an object it would call (REDUCE), instantiate (NEWOBJ) or __setstate__
# (BUILD), named by its repr. A full unpickler would import and call each: it would run code.
_REFUSED = [
    ("imports", re.compile(r"Unsupported global: GLOBAL (\S+)")),
    ("imports", re.compile(r"Trying to load unsupported GLOBAL (\S+) whose module \S+ is blocked")),
    ("calls", re.compile(r"Trying to call reduce for unrecognized function (.+?)(?: which belongs to .*)?$", re.M)),
    ("calls", re.compile(r"Can only create new object for .* but got (.+)$", re.M)),
    ("calls", re.compile(r"Can only build .* but got (.+)$", re.M)),
]
# Opcodes that name a global: GLOBAL and INST carry "module name"; STACK_GLOBAL (protocol 4+)
# pops the two strings pushed before it. torch's unpickler knows no STACK_GLOBAL or FRAME and
# says only "Unsupported operand", so those globals are found by reading the opcodes here.
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}


def pickle_globals(stream: BinaryIO, max_pickles: int = 5) -> list[str]:
    """module.name of every global the pickles at the start of ``stream`` import, in order, by
    disassembly (:func:`pickletools.genops`: opcodes are parsed, never executed). A legacy
    ``torch.save`` file is five pickles then raw storage bytes; reading stops at the first
    stretch that is not a pickle."""
    found: list[str] = []
    for _ in range(max_pickles):
        pushed: list[str | None] = []  # every value pushed so far: the string, or None
        memo: dict[int, str | None] = {}
        try:
            for op, arg, _pos in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST"):
                    module, name = arg.split(" ", 1)
                    # protocols 0-2 write Python 2 names (__builtin__.exec); unpickling maps them
                    default = (_compat_pickle.IMPORT_MAPPING.get(module, module), name)
                    found.append(".".join(_compat_pickle.NAME_MAPPING.get((module, name), default)))
                elif op.name == "STACK_GLOBAL" and len(pushed) >= 2 and None not in pushed[-2:]:
                    found.append(f"{pushed[-2]}.{pushed[-1]}")
                if op.name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = pushed[-1] if pushed else None
                elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                    pushed.append(memo.get(arg))
                elif op.stack_after:
                    pushed.append(arg if op.name in _STRING_OPS and isinstance(arg, str) else None)
        except Exception:  # noqa: BLE001 - not (or no longer) a pickle
            break
    return list(dict.fromkeys(found))


def unsafe_pickle_globals(path: Path) -> list[str]:
    """The globals in ``path`` (a torch.save zip archive, a legacy torch.save file or a plain
    pickle) that torch.load(weights_only=True) does not allow; [] if it holds none or is not a pickle."""
    from torch import _weights_only_unpickler as unpickler

    allowed: set[str] = set()  # what torch.load(weights_only=True) would load (private API: guarded)
    for getter in ("_get_allowed_globals", "_get_user_allowed_globals"):
        allowed |= set(getattr(unpickler, getter, dict)())
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = []
                for entry in archive.namelist():
                    if entry.endswith(".pkl"):
                        with archive.open(entry) as fh:
                            names += pickle_globals(fh)
        else:
            with open(path, "rb") as fh:
                names = pickle_globals(fh)
    except (OSError, zipfile.BadZipFile):
        return []
    return [name for name in dict.fromkeys(names) if name not in allowed]


def weights_only_refusal(path: Path, exc: BaseException) -> str | None:
    """If ``exc`` is torch.load(weights_only=True) refusing ``path`` because a full unpickler would
    run code, the reason naming the global (or the object it would call); else None."""
    text = str(exc)
    for refused_verb, pattern in _REFUSED:
        if m := pattern.search(text):
            verb, name = refused_verb, m[1].strip()[:120]
            break
    else:
        if not isinstance(exc, pickle.UnpicklingError) or not (unsafe := unsafe_pickle_globals(path)):
            return None
        verb, name = "imports", ", ".join(unsafe[:3]) + (f" and {len(unsafe) - 3} more" if len(unsafe) > 3 else "")
    return f"loading it would run code (it {verb} {name}, which torch.load(weights_only=True) does not allow)"


def load_pickle(path: Path) -> object:
    """``torch.load(path, weights_only=True)`` on the CPU, every failure one CheckpointError line:
    a refusal says the file would run code and names the global, anything else is unreadable."""
    try:
        with warnings.catch_warnings():  # pickles not of protocol 2 warn before failing: noise here
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle errors come in many types
        if refusal := weights_only_refusal(path, exc):
            raise CheckpointError(
                f"{path}: refused to unpickle: {refusal}; convert it to .safetensors with a tool you trust"
            ) from None
        text = str(exc)
        reason = re.search(r"WeightsUnpickler error:\s*(.+)", text) or re.search(r"(.+)", text)
        reason = reason[1].strip()[:120] if reason else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({reason}); is it truncated?") from None


def check_supported(sd: Mapping[str, Tensor], meta: Mapping[str, str], where: str) -> None:
    """Refuse checkpoints of other architectures with one line naming what was found."""
    if any(k.startswith("conditioner.embedders") for k in sd):
        raise CheckpointError(f"{where}: an SDXL checkpoint (conditioner.embedders.*); only SD v1.x is supported")
    if any(k.startswith("cond_stage_model.model.") for k in sd):
        raise CheckpointError(
            f"{where}: an SD 2.x checkpoint (OpenCLIP text encoder, cond_stage_model.model.*); "
            "only SD v1.x is supported"
        )
    to_k = [v for k, v in sd.items() if k.endswith("attn2.to_k.weight")]
    if to_k and to_k[0].shape[1] == 1024:
        raise CheckpointError(
            f"{where}: an SD 2.x checkpoint (1024-d cross-attention context); only SD v1.x (768-d) is supported"
        )
    proj_in = [v for k, v in sd.items() if k.startswith(UNET_PREFIX) and k.endswith("proj_in.weight")]
    if proj_in and proj_in[0].ndim == 2:
        raise CheckpointError(f"{where}: an SD 2.x checkpoint (linear proj_in); only SD v1.x is supported")
    conv_in = sd.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] != 4:
        channels = conv_in.shape[1]
        kind = "an inpainting UNet (9 input channels)" if channels == 9 else f"a UNet with {channels} input channels"
        raise CheckpointError(f"{where}: {kind}; only 4-channel SD v1.x text-to-image UNets are supported")
    markers = ("parameterization", "prediction_type", "v_pred")
    declared = {k: str(v).lower() for k, v in meta.items() if any(s in k.lower() for s in markers)}
    if "v_pred" in sd or any(v in ("v", "v_prediction", "v-prediction", "true") for v in declared.values()):
        raise CheckpointError(
            f"{where}: a v-prediction checkpoint ({declared or 'v_pred key'}); only eps-prediction SD v1.x is supported"
        )


def _check_schedule(sd: Mapping[str, Tensor], where: str) -> None:
    if "alphas_cumprod" not in sd:
        return
    with torch.device("cpu"):  # also when the models are being built on the meta device
        ours = NoiseSchedule.from_kind("scaled_linear", 1000, 0.00085, 0.012).alpha_bar[1:]
    theirs = sd["alphas_cumprod"].double().cpu()
    if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-4, atol=1e-6):
        raise CheckpointError(f"{where}: alphas_cumprod is not SD v1's scaled-linear schedule (0.00085..0.012, 1000 steps)")


def _ema_key(unet_key: str) -> str:
    """LitEma stores ``model.diffusion_model.a.b`` as ``model_ema.diffusion_modelab``."""
    return EMA_PREFIX + unet_key[len("model.") :].replace(".", "")


# --------------------------------------------------------------------------------------------
# Entry points


@dataclass
class SDModels:
    unet: SDUNet | None = None
    vae: AutoencoderKL | None = None
    text_encoder: CLIPTextEncoder | None = None
    used_ema: bool = False
    notes: list[str] = field(default_factory=list)


def convert_state_dict(
    sd: Mapping[str, Tensor],
    meta: Mapping[str, str] | None = None,
    *,
    unet_config: SDUNetConfig | None = None,
    vae_config: VAEConfig | None = None,
    clip_config: CLIPTextConfig | None = None,
    use_ema: bool = True,
    where: str = "checkpoint",
) -> SDModels:
    """An original-layout state dict (full model, or a VAE-only file) -> :class:`SDModels`.

    Configs default to v1-5's; ``use_ema`` takes the ``model_ema.*`` UNet weights when the file
    has them (more than 100 such keys). Raises :class:`CheckpointError`."""
    meta = meta or {}
    check_supported(sd, meta, where)
    _check_schedule(sd, where)
    unet_config = unet_config or SDUNetConfig.full()
    vae_config = vae_config or VAEConfig.full()
    clip_config = clip_config or CLIPTextConfig.full()
    out = SDModels()
    used: set[str] = {k for k in sd if k in SCHEDULE_KEYS or k.endswith("embeddings.position_ids")}
    used |= {EMA_PREFIX + "decay", EMA_PREFIX + "num_updates"}

    has_unet = any(k.startswith(UNET_PREFIX) for k in sd)
    vae_only = not has_unet and "encoder.conv_in.weight" in sd
    if not has_unet and not vae_only:
        raise CheckpointError(f"{where}: no {UNET_PREFIX}* or encoder.* keys; not a Stable Diffusion v1 checkpoint")

    if has_unet:
        width = sd.get(UNET_PREFIX + "input_blocks.0.0.weight")
        if width is not None and width.shape[0] != unet_config.model_channels:
            raise CheckpointError(f"{where}: UNet has {width.shape[0]} model channels, the config {unet_config.model_channels}")
        to_k = next((v for k, v in sd.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")), None)
        if to_k is not None and to_k.shape[1] != unet_config.context_dim:
            raise CheckpointError(
                f"{where}: UNet cross-attends to {to_k.shape[1]}-d text, the config to {unet_config.context_dim}-d"
            )
        rows = unet_rows(unet_config)
        ema_keys = [k for k in sd if k.startswith(EMA_PREFIX)]
        if use_ema and len(ema_keys) > 100:
            absent = [_ema_key(src) for src, _, _ in rows if _ema_key(src) not in sd]
            if absent:
                raise CheckpointError(
                    f"{where}: EMA weights incomplete ({len(absent)} missing, e.g. {absent[0]}); "
                    "convert with use_ema=False"
                )
            source = {src: sd[_ema_key(src)] for src, _, _ in rows}  # each UNet weight from its EMA twin
            used |= {src for src, _, _ in rows} | {_ema_key(src) for src, _, _ in rows}
            out.used_ema = True
        else:
            source = sd
            used |= set(ema_keys)  # EMA weights present but not wanted (or too few to be a copy)
        out.unet = SDUNet(unet_config)
        used |= apply_rows(rows, source, out.unet, f"{where}: UNet")

    vae_prefix = "" if vae_only else VAE_PREFIX
    out.vae = AutoencoderKL(vae_config)
    used |= apply_rows(vae_rows(vae_config, vae_prefix), sd, out.vae, f"{where}: VAE")
    if vae_only:
        ignored = [k for k in sd if k.startswith(("loss.", EMA_PREFIX))]  # training-only: discriminator, LPIPS, EMA
        used |= set(ignored)
        if ignored:
            out.notes.append(f"ignored {len(ignored)} training-only keys ({_group(ignored, 1)})")
    else:
        clip_prefix = CLIP_PREFIX + "text_model." if any(k.startswith(CLIP_PREFIX + "text_model.") for k in sd) else CLIP_PREFIX
        out.text_encoder = CLIPTextEncoder(clip_config)
        used |= apply_rows(clip_rows(clip_config, clip_prefix), sd, out.text_encoder, f"{where}: text encoder")

    unexpected = sorted(set(sd) - used)
    if unexpected:
        raise CheckpointError(f"{where}: {len(unexpected)} unexpected keys: {_group(unexpected)}")
    return out


def convert_checkpoint(path: str | Path, *, use_ema: bool = True, **configs) -> SDModels:
    """Convert an original single-file checkpoint (see :func:`convert_state_dict`)."""
    sd, meta = read_tensors(path)
    return convert_state_dict(sd, meta, use_ema=use_ema, where=str(path), **configs)


def _read_component(folder: Path, name: str) -> tuple[dict[str, Tensor], Path]:
    for fname in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        path = folder / name / fname
        if path.is_file():
            return read_tensors(path)[0], path
    raise CheckpointError(f"{folder / name}: no diffusion_pytorch_model.safetensors or model.safetensors")


def convert_diffusers_folder(
    folder: str | Path,
    *,
    unet_config: SDUNetConfig | None = None,
    vae_config: VAEConfig | None = None,
    clip_config: CLIPTextConfig | None = None,
) -> SDModels:
    """A diffusers folder (``unet/``, ``vae/``, ``text_encoder/`` with safetensors) -> :class:`SDModels`."""
    folder = Path(folder)
    unet_config = unet_config or SDUNetConfig.full()
    vae_config = vae_config or VAEConfig.full()
    clip_config = clip_config or CLIPTextConfig.full()
    scheduler = folder / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        pred = json.loads(scheduler.read_text()).get("prediction_type", "epsilon")
        if pred != "epsilon":
            raise CheckpointError(f"{scheduler}: prediction_type {pred!r}; only eps-prediction SD v1.x is supported")
    out = SDModels()
    for name, model, rows_fn in (
        ("unet", SDUNet(unet_config), lambda sd: unet_rows(unet_config, "", diffusers=True)),
        (
            "vae",
            AutoencoderKL(vae_config),
            lambda sd: vae_rows(
                vae_config, "", True, _OLD_DIFFUSERS_VAE_ATTN if any(".query." in k for k in sd) else None
            ),
        ),
        (
            "text_encoder",
            CLIPTextEncoder(clip_config),
            lambda sd: clip_rows(clip_config, "text_model." if any(k.startswith("text_model.") for k in sd) else ""),
        ),
    ):
        sd, path = _read_component(folder, name)
        check_supported(sd, {}, str(path))
        if name == "unet" and "conv_in.weight" in sd and sd["conv_in.weight"].shape[1] != 4:
            raise CheckpointError(
                f"{path}: a UNet with {sd['conv_in.weight'].shape[1]} input channels; "
                "only 4-channel SD v1.x UNets are supported"
            )
        used = apply_rows(rows_fn(sd), sd, model, str(path))
        unexpected = sorted(set(sd) - used - {k for k in sd if k.endswith("position_ids")})
        if unexpected:
            raise CheckpointError(f"{path}: {len(unexpected)} unexpected keys: {_group(unexpected)}")
        setattr(out, name, model)
    return out
