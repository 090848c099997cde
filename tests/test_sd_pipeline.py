"""Our SD txt2img / img2img equal diffusers' pipelines assembled from the same tiny weights."""

from __future__ import annotations

import pytest
import torch

from diffmodels.sd.pipeline import StableDiffusion, sd_timesteps
from diffmodels.sd.tokenizer import CLIPTokenizer

sd_reference = pytest.importorskip("sd_reference")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

PROMPTS = ["a photo of a cat", "an oil painting of a lighthouse"]
TOL = 1e-4


@pytest.fixture(scope="module")
def pair(sd_ref, tmp_path_factory):
    ref = sd_ref
    tmp = tmp_path_factory.mktemp("sdpipe")
    converted = sd_reference.convert_reference(ref, tmp)
    tokenizer = CLIPTokenizer.default()
    tokenizer_folder = sd_reference.write_tokenizer_folder(tokenizer, tmp)
    hf_tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_folder), model_max_length=77)
    ours = StableDiffusion(converted.unet.eval(), converted.vae.eval(), converted.text_encoder.eval(), tokenizer)
    return ours, ref, hf_tokenizer


# scheduler/scheduler_config.json as SD v1-5 ships it (a PNDMScheduler config; DDIMScheduler reads
# the keys they share and ignores skip_prk_steps). set_alpha_to_one=False: the last DDIM step lands
# on alphas_cumprod[0] (diffusers' 0-based timestep 0, our t = 1), as LDM's sampler does.
V15_SCHEDULER_CONFIG = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False,
}  # fmt: skip


def _scheduler(spacing: str):
    # "leading" is the default timestep_spacing and what v1-5 gets; steps_offset is used by "leading" only
    return diffusers.DDIMScheduler.from_config(V15_SCHEDULER_CONFIG, timestep_spacing=spacing)


def _theirs(ref, hf_tokenizer, spacing: str, img2img: bool = False):
    cls = diffusers.StableDiffusionImg2ImgPipeline if img2img else diffusers.StableDiffusionPipeline
    pipe = cls(
        vae=ref.vae, text_encoder=ref.text_encoder, tokenizer=hf_tokenizer, unet=ref.unet, scheduler=_scheduler(spacing),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_leading_timesteps_are_ldm_spacing():
    ts = sd_timesteps(50)
    assert ts[0] == 982 and ts[-1] == 2 and len(ts) == 50  # diffusers' 981 ... 1, plus one
    sched = _scheduler("leading")
    sched.set_timesteps(5)
    assert [t + 1 for t in sched.timesteps.tolist()] == sd_timesteps(5)
    sched.set_timesteps(3)  # 1000 / 3 does not divide: still 3 steps
    assert [t + 1 for t in sched.timesteps.tolist()] == sd_timesteps(3) == [668, 335, 2]


@pytest.mark.parametrize("spacing, num_steps", [("trailing", 5), ("leading", 5), ("leading", 3)])
@torch.no_grad()
def test_txt2img_matches_diffusers(pair, spacing, num_steps):
    ours, ref, hf_tokenizer = pair
    pipe = _theirs(ref, hf_tokenizer, spacing)
    kwargs = dict(height=16, width=16, num_inference_steps=num_steps, guidance_scale=7.5)
    expected_latents = pipe(PROMPTS, generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs).images
    decoded = ref.vae.decode(expected_latents / ref.vae.config.scaling_factor).sample
    expected = pipe.image_processor.postprocess(decoded, output_type="pt")  # the pipeline's own last step

    steps = []
    got = ours.txt2img(PROMPTS, height=16, width=16, steps=num_steps, guidance=7.5, spacing=spacing,
                       generator=torch.Generator().manual_seed(0), callback=steps.append)
    assert [s.t for s in steps] == sd_timesteps(num_steps, spacing=spacing) and steps[-1].t_prev == 1
    assert got.shape == expected.shape == (2, 3, 16, 16)
    assert (steps[-1].x - expected_latents).abs().max() < TOL
    assert (got - expected).abs().max() < TOL


@torch.no_grad()
def test_guidance_changes_the_result(pair):
    ours, _, _ = pair
    a = ours.txt2img(PROMPTS[:1], height=16, width=16, steps=3, guidance=1.0, generator=torch.Generator().manual_seed(0))
    b = ours.txt2img(PROMPTS[:1], height=16, width=16, steps=3, guidance=7.5, generator=torch.Generator().manual_seed(0))
    assert (a - b).abs().max() > 1e-3


@torch.no_grad()
def test_img2img_matches_diffusers(pair):
    ours, ref, hf_tokenizer = pair
    pipe = _theirs(ref, hf_tokenizer, "leading", img2img=True)
    init = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    expected = pipe(PROMPTS, image=init, strength=0.6, num_inference_steps=5, guidance_scale=5.0,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images  # fmt: skip
    got = ours.img2img(init, PROMPTS, strength=0.6, steps=5, guidance=5.0, generator=torch.Generator().manual_seed(0))
    assert (got - expected).abs().max() < TOL


def test_bad_arguments(pair):
    ours, _, _ = pair
    with pytest.raises(ValueError, match="multiples of 4"):
        ours.txt2img(PROMPTS, height=15, width=16, steps=2)
    with pytest.raises(ValueError, match="strength"):
        ours.img2img(torch.rand(1, 3, 16, 16), PROMPTS[:1], strength=0.0)
    with pytest.raises(ValueError, match="spacing"):
        sd_timesteps(5, spacing="linspace")


@torch.no_grad()
def test_inpaint_matches_diffusers(pair):
    """Latent blending with the 4-channel UNet equals diffusers' StableDiffusionInpaintPipeline."""
    ours, ref, hf_tokenizer = pair
    pipe = diffusers.StableDiffusionInpaintPipeline(
        vae=ref.vae, text_encoder=ref.text_encoder, tokenizer=hf_tokenizer, unet=ref.unet, scheduler=_scheduler("leading"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    init = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    masks = torch.zeros(2, 1, 16, 16)
    masks[0, :, 4:12, 2:10] = 1
    masks[1, :, 8:, :] = 1
    for strength in (1.0, 0.6):
        expected = pipe(PROMPTS, image=init, mask_image=masks, strength=strength, num_inference_steps=5, guidance_scale=5.0,
                        height=16, width=16, generator=torch.Generator().manual_seed(0), output_type="pt").images  # fmt: skip
        steps = []
        got = ours.inpaint(init, masks, PROMPTS, strength=strength, steps=5, guidance=5.0,
                           generator=torch.Generator().manual_seed(0), callback=steps.append)  # fmt: skip
        assert (got - expected).abs().max() < TOL, strength
    # the known region of the final latents is the clean image latents exactly
    z0 = ours.encode_images(init, torch.Generator().manual_seed(0))
    keep = torch.nn.functional.interpolate(masks, size=z0.shape[-2:]) < 0.5
    assert torch.equal(steps[-1].x[keep.expand_as(z0)], z0[keep.expand_as(z0)])


@torch.no_grad()
def test_anagram_of_one_prompt_under_identity_is_txt2img(pair):
    ours, _, _ = pair
    kwargs = dict(height=16, width=16, steps=3, guidance=7.5)
    plain = ours.txt2img(PROMPTS, generator=torch.Generator().manual_seed(1), **kwargs)
    same = ours.anagram(PROMPTS, PROMPTS, flip=lambda z: z, generator=torch.Generator().manual_seed(1), **kwargs)
    assert (plain - same).abs().max() < 1e-6  # 1/2 (a + a) = a exactly


@pytest.mark.parametrize("flip", ["vertical", "horizontal", "rot180"])
@torch.no_grad()
def test_anagram_swapping_prompts_flips_the_trajectory(pair, flip):
    """F(x) = 1/2 [eps_A(x) + P eps_B(P x)] gives P F(P x) = the (B, A) prediction, and DDIM acts
    elementwise, so (B, A) from P z_T ends at P z_0 of (A, B) from z_T."""
    ours, _, _ = pair
    from diffmodels.sd.pipeline import FLIPS

    P = FLIPS[flip]
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    a, b = [], []
    kwargs = dict(flip=flip, height=16, width=16, steps=3, guidance=7.5)
    ours.anagram(PROMPTS, PROMPTS[::-1], latents=z, callback=a.append, **kwargs)
    ours.anagram(PROMPTS[::-1], PROMPTS, latents=P(z), callback=b.append, **kwargs)
    assert (P(a[-1].x) - b[-1].x).abs().max() < 1e-5
    assert (a[-1].x - b[-1].x).abs().max() > 1e-3  # not trivially symmetric


def test_anagram_and_inpaint_arguments(pair):
    ours, _, _ = pair
    with pytest.raises(ValueError, match="flip must be one of vertical, horizontal, rot180"):
        ours.anagram(PROMPTS, PROMPTS, flip="transpose", height=16, width=16, steps=2)
    with pytest.raises(ValueError, match="1 upright prompts for 2 flipped"):
        ours.anagram(PROMPTS[:1], PROMPTS, height=16, width=16, steps=2)
    with pytest.raises(ValueError, match="masks must be"):
        ours.inpaint(torch.rand(2, 3, 16, 16), torch.zeros(2, 1, 8, 8), PROMPTS, steps=2)
