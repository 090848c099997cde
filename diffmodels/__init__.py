"""diffmodels: the library behind the DVC pipeline (latent diffusion research).

Layers, each importing only from the ones above it (docs/design.md#layers)::

    core        errors, io, config, checkpoint, tracking, progress, interrupt, device
    models      vae, unet, serpentine, ssm                      (networks only, no I/O)
    data        datasets, masks, images, latent_cache
    diffusion   schedule, samplers, sampling, inpaint, objectives, denoiser
    training    loop, state, optim, precision, ema, distributed
    metrics     leakage, fidelity, seam, fid, inpainting
    sd          Stable Diffusion v1-5: clip, tokenizer, unet, vae, pipeline, convert, weights, baselines
    reporting   report, compare, htmlpage (+ templates/), figures, sampling_figures, vega_offline

``stages/`` (one thin script per DVC stage) sits on top and is not part of the library.
"""
