"""The SD converter: file formats (nested .ckpt, fp16, EMA, VAE-only, diffusers folders) and one
clear CheckpointError line for every refusal (SD 2.x, SDXL, inpainting, v-prediction, damaged
files, unsafe pickles, missing / unexpected keys)."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shlex

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffmodels.core.errors import CheckpointError
from diffmodels.diffusion.schedule import NoiseSchedule
from diffmodels.sd.convert import (
    convert_checkpoint,
    convert_diffusers_folder,
    convert_state_dict,
    weights_only_refusal,
)

sd_reference = pytest.importorskip("sd_reference")
CONFIGS = sd_reference.CONFIGS
UNET_W = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"


@pytest.fixture(scope="module")
def ref(sd_ref):
    return sd_ref


@pytest.fixture
def sd(ref):
    return sd_reference.original_state_dict(ref)


def _ema_key(key: str) -> str:
    return "model_ema." + key[len("model.") :].replace(".", "")


def test_nested_fp16_ckpt_with_ema(sd, tmp_path):
    full = dict(sd)
    for k, v in sd.items():
        if k.startswith("model.diffusion_model."):
            full[_ema_key(k)] = v + 1.0  # distinguishable EMA copy
    full["model_ema.decay"] = torch.tensor(0.9999)
    full["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    alpha_bar = NoiseSchedule.from_kind("scaled_linear", 1000, 0.00085, 0.012).alpha_bar[1:]
    full["alphas_cumprod"] = alpha_bar.float()
    full["betas"] = torch.zeros(1000)
    path = tmp_path / "model.ckpt"
    half = {k: v.half() if v.is_floating_point() and k != "alphas_cumprod" else v for k, v in full.items()}
    torch.save({"state_dict": {"state_dict": half}, "global_step": 7}, path)

    ema = convert_checkpoint(path, **CONFIGS)
    w = ema.unet.input_blocks[1][0].in_layers[2].weight
    assert ema.used_ema and w.dtype == torch.float32
    assert torch.equal(w, (sd[UNET_W] + 1.0).half().float())

    plain = convert_checkpoint(path, use_ema=False, **CONFIGS)
    assert not plain.used_ema
    assert torch.equal(plain.unet.input_blocks[1][0].in_layers[2].weight, sd[UNET_W].half().float())


def test_wrong_schedule_is_refused(sd):
    sd["alphas_cumprod"] = torch.linspace(0.99, 0.01, 1000)
    with pytest.raises(CheckpointError, match="scaled-linear schedule"):
        convert_state_dict(sd, **CONFIGS)


def _sd2_context(sd):
    for k in [k for k in sd if k.endswith("attn2.to_k.weight")]:
        sd[k] = torch.zeros(sd[k].shape[0], 1024)


def _linear_proj_in(sd):
    for k in [k for k in sd if k.endswith("proj_in.weight")]:
        sd[k] = sd[k].flatten(1)


def _inpainting(sd):
    w = sd["model.diffusion_model.input_blocks.0.0.weight"]
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(w.shape[0], 9, 3, 3)


@pytest.mark.parametrize(
    "edit, meta, message",
    [
        (lambda sd: sd.update({"conditioner.embedders.0.transformer.x": torch.zeros(1)}), {}, "SDXL"),
        (lambda sd: sd.update({"cond_stage_model.model.token_embedding.weight": torch.zeros(1)}), {}, "SD 2.x .*OpenCLIP"),
        (_sd2_context, {}, "SD 2.x .*1024-d"),
        (_linear_proj_in, {}, "SD 2.x .*linear proj_in"),
        (_inpainting, {}, "inpainting UNet .9 input channels"),
        (lambda sd: None, {"modelspec.prediction_type": "v"}, "v-prediction"),
        (lambda sd: None, {"parameterization": "v"}, "v-prediction"),
        (lambda sd: sd.update({"v_pred": torch.zeros(())}), {}, "v-prediction"),
        (lambda sd: sd.pop(UNET_W), {}, r"UNet: does not fit .*missing 1: model.diffusion_model.input_blocks"),
        (
            lambda sd: sd.update({"model.diffusion_model.extra.weight": torch.zeros(1)}),
            {},
            "1 unexpected keys: model.diffusion_model.extra",
        ),
        (lambda sd: sd.update({UNET_W: torch.zeros(3, 3)}), {}, "shape mismatch 1"),
        (
            lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("model.diffusion_model.")],
            {},
            "VAE: does not fit|not a Stable Diffusion",
        ),
    ],
)
def test_refusals(sd, tmp_path, edit, meta, message):
    edit(sd)
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match=message) as info:
        convert_checkpoint(path, **CONFIGS)
    assert "\n" not in str(info.value)


def test_wrong_config_is_named(sd):
    from diffmodels.sd.unet import SDUNetConfig

    with pytest.raises(CheckpointError, match="32 model channels, the config 320"):
        convert_state_dict(sd, unet_config=SDUNetConfig.full(),
                           vae_config=sd_reference.VAE_CONFIG, clip_config=sd_reference.CLIP_CONFIG)
    wide = dataclasses.replace(sd_reference.UNET_CONFIG, context_dim=768)
    with pytest.raises(CheckpointError, match="cross-attends to 32-d text, the config to 768-d"):
        convert_state_dict(sd, **(CONFIGS | {"unet_config": wide}))


def test_damaged_and_foreign_files(sd, tmp_path):
    good = tmp_path / "good.safetensors"
    save_file(sd, str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.safetensors"
    text.write_text("not a checkpoint")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x00\x01garbage" * 10)
    listing = tmp_path / "list.ckpt"
    torch.save([torch.zeros(2)], listing)
    cases = [
        (truncated, "not a readable safetensors file"),
        (text, "not a readable safetensors file"),
        (garbage, "not a readable PyTorch checkpoint"),
        (listing, "holds a list"),
        (tmp_path / "model.onnx", "checkpoint not found"),
    ]
    (tmp_path / "weights.onnx").write_bytes(b"x")
    cases.append((tmp_path / "weights.onnx", "unknown checkpoint type '.onnx'"))
    for path, message in cases:
        with pytest.raises(CheckpointError, match=message):
            convert_checkpoint(path, **CONFIGS)


class _Exec:
    """Unpickling this runs code: it creates ``marker`` with builtins.exec."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


class _System:
    """Unpickling this runs a shell command (os.system, i.e. posix.system) that creates ``marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {shlex.quote(self.marker)}",))


PICKLE_FORMATS = ["torch.save", "legacy torch.save"] + [f"pickle protocol {p}" for p in (0, 2, 4, 5)]


def _write_malicious(path, payload, fmt: str, tensor: torch.Tensor) -> None:
    """``payload`` in a .ckpt as torch.save writes one (zip archive with data.pkl, or the legacy
    run of pickles), or as a plain pickle (which torch.load reads as a legacy file)."""
    if fmt.startswith("pickle"):  # payload first: plain pickles of tensors import storage globals
        with open(path, "wb") as fh:
            pickle.dump({"payload": payload, "state_dict": {}}, fh, protocol=int(fmt.split()[-1]))
    else:
        torch.save({"state_dict": {UNET_W: tensor}, "payload": payload}, path, _use_new_zipfile_serialization=fmt == "torch.save")


@pytest.mark.parametrize("fmt", PICKLE_FORMATS)
@pytest.mark.parametrize("payload, name", [(_System, rf"{os.system.__module__}\.system"), (_Exec, r"(builtins\.)?exec")])
def test_malicious_pickle_is_refused_and_not_executed(sd, tmp_path, fmt, payload, name):
    """torch.load(weights_only=True) refuses each, in its own words ("Unsupported global",
    "... whose module posix is blocked", "Unsupported operand" for opcodes it does not know);
    every refusal says the file would run code and names the global."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    _write_malicious(path, payload(str(marker)), fmt, sd[UNET_W])
    with pytest.raises(CheckpointError) as info:
        convert_checkpoint(path, **CONFIGS)
    msg = str(info.value)
    expected = rf"{re.escape(str(path))}: refused to unpickle: loading it would run code \(it imports {name}, "
    expected += r".*\.safetensors.*"
    assert re.fullmatch(expected, msg), msg
    assert "\n" not in msg and not marker.exists()
    # proof the payload is live: an unsafe load runs it
    if fmt.startswith("pickle"):
        with open(path, "rb") as fh:
            pickle.load(fh)
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("error, named", [
    ("Unsupported global: GLOBAL evil.Payload was not an allowed global by default. Please use ...", "imports evil.Payload"),
    ("Trying to load unsupported GLOBAL nt.system whose module nt is blocked.", "imports nt.system"),
    ("Trying to call reduce for unrecognized function <built-in function system>", "calls <built-in function system>"),
    ("Trying to call reduce for unrecognized function <bound method A.f of <A>> which belongs to <A>",
     "calls <bound method A.f of <A>>"),
    ("Can only create new object for nn.Parameter or classes allowlisted via `add_safe_globals` but got <class 'evil.P'>",
     "calls <class 'evil.P'>"),
    ("Can only build Tensor, Parameter, OrderedDict or types allowlisted via `add_safe_globals`, but got <class 'evil.P'>",
     "calls <class 'evil.P'>"),
])  # fmt: skip
def test_every_weights_only_refusal_wording_names_what_would_run(tmp_path, error, named):
    """The weights-only unpickler's refusals that name what they refused (torch/_weights_only_unpickler.py),
    as torch.load wraps them."""
    path = tmp_path / "evil.ckpt"
    exc = pickle.UnpicklingError(f"Weights only load failed. In PyTorch 2.6, ...\n\n{error}\n\nCheck the documentation ...")
    expected = f"loading it would run code (it {named}, which torch.load(weights_only=True) does not allow)"
    assert weights_only_refusal(path, exc) == expected


def test_unreadable_pickles_are_not_called_malicious(tmp_path):
    """An unknown opcode without any global (garbage, or a plain pickle of plain data) is an
    unreadable file, not a refusal."""
    plain = tmp_path / "plain.ckpt"
    with open(plain, "wb") as fh:
        pickle.dump({"state_dict": {"w": [1.0, 2.0]}}, fh, protocol=4)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x00\x01garbage" * 10)
    for path in (plain, garbage):
        with pytest.raises(CheckpointError, match=r"not a readable PyTorch checkpoint \(Unsupported operand \d+\)"):
            convert_checkpoint(path, **CONFIGS)


def test_vae_only_file(ref, sd, tmp_path):
    vae = {k[len("first_stage_model.") :]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    vae["loss.discriminator.main.0.weight"] = torch.zeros(1)  # a training checkpoint's extras
    path = tmp_path / "vae.safetensors"
    save_file(vae, str(path))
    models = convert_checkpoint(path, vae_config=sd_reference.VAE_CONFIG)
    assert models.unet is None and models.text_encoder is None
    assert torch.equal(models.vae.decoder.conv_out.weight, ref.vae.decoder.conv_out.weight)
    assert "ignored 1 training-only keys" in models.notes[0]


@torch.no_grad()
def test_diffusers_folder(ref, tmp_path):
    for name in ("unet", "vae", "text_encoder"):
        getattr(ref, name).save_pretrained(tmp_path / name, safe_serialization=True)
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "epsilon"}))
    models = convert_diffusers_folder(tmp_path, **CONFIGS)
    g = torch.Generator().manual_seed(3)
    x, t, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 5, 32, generator=g)
    assert (models.unet(x, t, ctx) - ref.unet(x, t, encoder_hidden_states=ctx).sample).abs().max() < 1e-4
    z = torch.randn(1, 4, 8, 8, generator=g)
    assert (models.vae.decode(z) - ref.vae.decode(z).sample).abs().max() < 1e-4
    ids = torch.randint(0, 49408, (1, 77), generator=g)
    assert (models.text_encoder(ids) - ref.text_encoder(input_ids=ids).last_hidden_state).abs().max() < 1e-4

    # older diffusers folders name the VAE attention query/key/value/proj_attn
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    vae_file = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    renamed = {}
    for k, v in load_file(str(vae_file)).items():
        for new, old in old_names.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        renamed[k] = v
    assert any(".query." in k for k in renamed)
    save_file(renamed, str(vae_file))
    old = convert_diffusers_folder(tmp_path, **CONFIGS)
    assert (old.vae.decode(z) - ref.vae.decode(z).sample).abs().max() < 1e-4

    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "v_prediction"}))
    with pytest.raises(CheckpointError, match="prediction_type 'v_prediction'"):
        convert_diffusers_folder(tmp_path, **CONFIGS)
