import dataclasses

import pytest
import yaml

from diffmodels.core.config import EvalParams, Params, flatten, load_params, parse_params
from diffmodels.core.errors import ParamsError
from tests.conftest import ROOT, params_with


def error_of(overrides=None, mutate=None) -> str:
    raw = params_with(overrides)
    if mutate:
        mutate(raw)
    with pytest.raises(ParamsError) as info:
        parse_params(raw, source="params.yaml")
    return str(info.value)


def test_shipped_params_validate():
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    assert params.data.resolution % 8 == 0
    assert params.data.mask_sets == tuple(params.data.mask_sets)  # lists become tuples (frozen)


def test_unknown_key_suggests_closest_dotted_name():
    msg = error_of(mutate=lambda r: r["data"].update(resolutoin=32))
    assert msg == "params.yaml: unknown key 'data.resolutoin' (did you mean 'data.resolution'?)"


def test_unknown_top_level_key_suggested():
    msg = error_of(mutate=lambda r: r.update(sed=1))
    assert msg == "params.yaml: unknown key 'sed' (did you mean 'seed'?)"


def test_unknown_key_without_close_match_has_no_suggestion():
    msg = error_of(mutate=lambda r: r["data"].update(zzzzzz=1))
    assert msg == "params.yaml: unknown key 'data.zzzzzz'"


def test_a_key_that_is_not_a_string_is_unknown():
    msg = error_of(mutate=lambda r: r["tracking"].update({7: 1}))  # YAML `7: 1`
    assert msg.startswith("params.yaml: unknown key 'tracking.7'") and "\n" not in msg


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"data.resolution": 30}, "data.resolution must be >= 16, <= 1024, a multiple of 8 (got 30: not a multiple of 8)"),
        ({"data.resolution": 2048}, "data.resolution must be >= 16, <= 1024, a multiple of 8 (got 2048: not <= 1024)"),
        ({"data.resolution": "64"}, "data.resolution must be an integer (>= 16, <= 1024, a multiple of 8) (got '64')"),
        ({"data.resolution": True}, "data.resolution must be an integer"),
        ({"data.labels": "yes"}, "data.labels must be true or false (got 'yes')"),
        ({"data.channels": 2}, "data.channels must be one of 1, 3; got 2"),
        ({"data.dataset": "fashion-mnist"}, "(did you mean 'fashion_mnist'?)"),
        ({"data.val_fraction": 1.5}, "data.val_fraction must be >= 0, < 1 (got 1.5: not < 1)"),
        ({"data.val_fraction": float("nan")}, "data.val_fraction must be a finite number"),
        ({"data.max_train": 0}, "data.max_train must be >= 1 (got 0: not >= 1)"),
        ({"data.mask_sets": ["centre_aligned", "halfaligned"]}, "data.mask_sets[1] must be one of"),
        ({"data.mask_sets": "centre_aligned"}, "data.mask_sets must be a list (got 'centre_aligned')"),
        ({"data": 5}, "data must be a mapping of keys to values (got 5)"),
        ({"seed": -1}, "seed must be >= 0"),
        # Literal[1, 3] alone would take YAML true and 1.0 (they compare equal to 1)
        ({"data.channels": True}, "data.channels must be one of 1, 3; got True"),
        ({"data.channels": 1.0}, "data.channels must be one of 1, 3; got 1.0"),
        ({"vae.amp": True}, "vae.amp must be one of 'auto', 'bf16', 'fp16', 'off'; got True"),
        ({"vae.lr": 2}, "vae.lr must be > 0, <= 1 (got 2.0: not <= 1)"),
        ({"sample.why_iterate_steps": [200, 0]}, "sample.why_iterate_steps[1] must be >= 1 (got 0: not >= 1)"),
        ({"data.max_train": "many"}, "data.max_train must be an integer (>= 1) (got 'many')"),
        ({"tracking.experiment": ""}, "tracking.experiment must be a non-empty string (got '')"),
        ({"data.resolution": 4}, "(got 4: not >= 16)"),  # the first bound broken, in the order they read
        ({"vae.arch": "unet"}, "vae.arch must be one of 'localized', 'conventional'; got 'unet'"),
        ({"vae.disc_weight": 0.5, "vae.disc_start": 800, "vae.steps": 800},
         "vae.disc_start must be < vae.steps when vae.disc_weight > 0"),
        ({"vae.arch": "conventional", "vae.norm_groups": 16}, "vae.norm_groups 16 must divide every width [8, 16, 32, 64]"),
        ({"vae.disc_weight": -1.0}, "vae.disc_weight must be >= 0"),
        ({"vae.freq_weight": -1.0}, "vae.freq_weight must be >= 0"),
        ({"sample.ddim_images": 1}, "sample.ddim_images must be >= 2, <= 100000 (got 1: not >= 2)"),
        ({"eval.fid_bootstrap": 1}, "eval.fid_bootstrap must be >= 2"),
        ({"eval.fid_real_images": "all"}, "eval.fid_real_images must be an integer (>= 4) (got 'all')"),
        # a KID subset larger than a generated set: the key, the set and the fix
        ({"eval.kid_subset_size": 100, "sample.ddpm_images": 64},
         "eval.kid_subset_size 100 exceeds the 64 images of sample.ddpm_images: set it to at most 64 or null"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(overrides, expected):
    msg = error_of(overrides)
    assert expected in msg
    assert msg.count("\n") == 0, "one problem -> one line"


def test_missing_key_is_reported_with_expected_type():
    msg = error_of(mutate=lambda r: r["data"].pop("channels"))
    assert msg == "params.yaml: missing key 'data.channels' (expected one of 1, 3)"


def test_an_empty_group_reports_each_key_missing():
    msg = error_of({"eval": None})
    assert msg.splitlines()[:3] == ["params.yaml: missing key 'eval.fid_real_images' (expected an integer (>= 4) or null)",
                                    "params.yaml: missing key 'eval.fid_batch_size' (expected an integer (>= 1))",
                                    "params.yaml: missing key 'eval.kid_subsets' (expected an integer (>= 1))"]
    assert len(msg.splitlines()) == len(EvalParams.model_fields)
    assert error_of(mutate=lambda r: r["data"].pop("max_train")) == (
        "params.yaml: missing key 'data.max_train' (expected an integer (>= 1) or null)")


def test_params_are_frozen():
    params = parse_params(params_with())
    with pytest.raises(ValueError):
        params.vae.lr = 1.0
    assert params.vae.amp == "auto" == params.ddpm.amp  # one mode string for both training stages


def test_cross_field_checks():
    assert "data.source must name a folder" in error_of({"data.dataset": "folder", "data.source": None})
    assert "data.val_fraction + data.test_fraction must be < 1" in error_of(
        {"data.val_fraction": 0.6, "data.test_fraction": 0.5}
    )


def test_a_group_rule_is_reported_beside_another_groups_bad_value():
    msg = error_of({"data.resolution": 30, "ddpm.beta_start": 0.5, "ddpm.beta_end": 0.1})
    assert msg.splitlines() == [
        "params.yaml: data.resolution must be >= 16, <= 1024, a multiple of 8 (got 30: not a multiple of 8)",
        "params.yaml: ddpm.beta_start must be < ddpm.beta_end (got 0.5 >= 0.1)",
    ]


def test_rules_across_groups():
    msg = error_of({"distributed.nproc_per_node": 3})
    assert msg.splitlines() == [
        "params.yaml: vae.batch_size 32 must be a multiple of distributed.nproc_per_node 3 "
        "(each process takes an equal share of the batch)",
        "params.yaml: ddpm.batch_size 64 must be a multiple of distributed.nproc_per_node 3 "
        "(each process takes an equal share of the batch)",
    ]


def test_every_problem_is_listed_one_per_line():
    msg = error_of({"data.resolution": 30, "data.channels": 2}, mutate=lambda r: r.update(sed=1))
    lines = msg.splitlines()
    assert len(lines) == 3
    assert all(line.startswith("params.yaml: ") for line in lines)


def test_yaml_1_1_exponent_strings_are_numbers():
    params = parse_params(params_with({"data.val_fraction": "5e-2"}))
    assert params.data.val_fraction == pytest.approx(0.05)


def test_load_params_reports_yaml_syntax_and_missing_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ParamsError, match=r"params.yaml: line \d+"):
        load_params(bad)
    with pytest.raises(ParamsError, match="file not found"):
        load_params(tmp_path / "nope.yaml")


def test_flatten_uses_dotted_names_and_filters_groups():
    params = parse_params(params_with())
    flat = flatten(params, groups=("seed", "data"))
    assert flat["seed"] == params.seed
    assert flat["data.resolution"] == params.data.resolution
    assert isinstance(flat["data.mask_sets"], str)
    assert not any(k.startswith("tracking.") for k in flat)
    every = flatten(params)
    assert "tracking.experiment" in every


def test_params_yaml_declares_every_schema_group():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(raw) == set(Params.model_fields)


@pytest.mark.parametrize("overrides, key", [
    ({"ddpm.base_channels": 48}, "ddpm.ssm_headdim 64"),  # SSM width 96 does not split into heads of 64
    ({"ddpm.ssm_expand": 0}, "ddpm.ssm_expand"),
    ({"ddpm.mixer": "attention", "ddpm.attention_heads": 3}, "ddpm.attention_heads 3"),
    ({"ddpm.norm_groups": 5}, "ddpm.norm_groups 5"),
    ({"ddpm.mixer_downsample": [4]}, "ddpm.mixer_downsample lists [4]"),
    ({"ddpm.channel_mult": [1, 2, 2, 2, 2]}, "change ddpm.channel_mult or data.resolution"),
])
def test_networks_that_cannot_be_built_fail_at_load_naming_the_key(overrides, key):
    """The denoiser's constraints are checked with the params, not deep inside the SSM."""
    msg = error_of(overrides)
    assert key in msg and len(msg.splitlines()) == 1, msg


def test_params_that_validate_build_a_unet_and_params_that_fail_do_not():
    """problems() is exactly the set of configs UNet rejects, over a grid of widths and heads."""
    import torch

    from diffmodels.models.unet import UNet, UNetConfig

    base = parse_params(params_with()).ddpm
    for mixer in ("serpentine", "attention"):
        for width in (8, 12, 16, 20, 24, 40, 48):
            for heads in (1, 3, 4):
                cfg = UNetConfig.from_params(base, in_channels=2, latent_size=4, num_classes=0, mixer=mixer,
                                             base_channels=width, norm_groups=4, attention_heads=heads)
                torch.manual_seed(0)
                try:
                    UNet(cfg)
                    built = True
                except ValueError:
                    built = False
                assert built == (not cfg.problems()), (mixer, width, heads, cfg.problems())


def test_network_configs_take_the_params_names():
    """UNetConfig and VAEConfig fields are the ddpm / vae keys of the same name (the data decides
    the rest), and from_params copies each of them."""
    from diffmodels.models.unet import UNetConfig
    from diffmodels.models.vae import VAEConfig

    params = parse_params(params_with())
    for config_cls, group, from_data in ((UNetConfig, params.ddpm, {"in_channels", "latent_size", "num_classes"}),
                                         (VAEConfig, params.vae, {"in_channels", "latent_channels"})):
        names = {f.name for f in dataclasses.fields(config_cls)} - from_data
        assert names <= set(type(group).model_fields), names - set(type(group).model_fields)
    unet = UNetConfig.from_params(params.ddpm, in_channels=4, latent_size=8, num_classes=10)
    assert {k: getattr(unet, k) for k in ("channel_mult", "scan_directions", "scan_merge", "ssm_state", "dropout")} == {
        k: getattr(params.ddpm, k) for k in ("channel_mult", "scan_directions", "scan_merge", "ssm_state", "dropout")}
    assert (unet.in_channels, unet.latent_size, unet.num_classes) == (4, 8, 10)
    vae = VAEConfig.from_params(params.vae, in_channels=1, latent_channels=4)
    assert vae.channel_mult == params.vae.channel_mult and vae.upsample == params.vae.upsample
