"""The backbone registry: families resolve by class (subclasses, torch.compile), each holds its own call,
sample shape, LoRA targets and GAN block; anything else is a plain module."""

import copy
from types import SimpleNamespace

import pytest
import torch
from conftest import TinyMLP, tiny_unet2d
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from t2i_models import BACKBONES, SEQ, random_condition
from torch import nn

from stepdistill.backbones import Backbone, backbone_named, backbone_of, families, model_class_named
from stepdistill.backbones.base import REGISTRY
from stepdistill.backbones.flux import flux_image_ids, pack_latents, unpack_latents
from stepdistill.denoiser import Denoiser, sample_shape_of
from stepdistill.gan import captured_output, gan_feature_block, gan_head
from stepdistill.schedules import schedule_from_scheduler

DDPM = schedule_from_scheduler(DDPMScheduler(beta_schedule="scaled_linear"))
FLOW = schedule_from_scheduler(FlowMatchEulerDiscreteScheduler())
NAMES = ("unet2d", *families())  # every registered family but the plain-module fallback


def tiny(name: str) -> nn.Module:
    return tiny_unet2d() if name == "unet2d" else BACKBONES[name][0]().eval()


def inputs(name: str, n: int = 2, seed: int = 0):
    """``(x, t, cond)`` for the tiny backbone of family ``name``."""
    gen = torch.Generator().manual_seed(seed)
    shape = (1, 8, 8) if name == "unet2d" else (4, 8, 8)
    cond = (
        {"class_labels": torch.tensor([3, 10])[:n]} if name == "unet2d" else random_condition(name, n, seed)
    )
    t = torch.tensor([700.0, 200.0])[:n]
    return torch.randn(n, *shape, generator=gen), t.long() if name in ("unet2d", "sd", "sdxl") else t, cond


def subclassed(model: nn.Module) -> nn.Module:
    """``model`` as an instance of a user subclass of its class (a class name the registry never saw)."""
    model = copy.deepcopy(model)
    model.__class__ = type(f"My{type(model).__name__}", (type(model),), {})
    return model


def test_every_text_to_image_family_has_a_tiny_backbone():
    assert set(families()) == set(BACKBONES)
    assert {"sd", "sdxl", "sd3", "flux", "sana", "pixart"} <= set(families())


@pytest.mark.parametrize("name", NAMES)
def test_families_resolve_by_class_for_subclasses_and_compiled_models(name):
    model = tiny(name)
    assert backbone_of(model) is backbone_named(name)
    assert backbone_of(subclassed(model)) is backbone_named(name)  # a class-name lookup would miss it
    assert backbone_of(torch.compile(model)) is backbone_named(name)  # OptimizedModule, unwrapped
    assert model_class_named(type(model).__name__) is type(model)


def test_unknown_classes_fall_back_to_the_plain_module_path():
    module = backbone_named("module")
    assert backbone_of(TinyMLP()) is module and backbone_of(torch.compile(TinyMLP())) is module
    assert backbone_of(nn.Linear(2, 2)) is module
    assert model_class_named("NoSuchModel") is None
    x, t = torch.randn(3, 2), torch.tensor([10, 500, 900])
    mlp = TinyMLP()
    torch.testing.assert_close(Denoiser(mlp, DDPM)(x, t), mlp(x, t))  # called as model(x_t, t, **cond)


class VideoDenoiser(nn.Module):
    """A plain module on video-like samples ``(N, C, T, H, W)``."""

    sample_shape = (2, 3, 8, 8)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(2, 2, 3, padding=1)

    def forward(self, x, t, scale=None):
        out = self.conv(x) + t.float().reshape(-1, 1, 1, 1, 1) / 1000
        return out if scale is None else out * scale.reshape(-1, 1, 1, 1, 1)


def test_sample_shape_of_a_video_like_plain_module():
    video = VideoDenoiser()
    assert sample_shape_of(video) == (2, 3, 8, 8)
    configured = nn.Conv3d(2, 2, 1)
    configured.config = SimpleNamespace(in_channels=2, sample_size=(5, 4, 4))
    assert sample_shape_of(configured) == (2, 5, 4, 4)  # any number of axes from the config
    with pytest.raises(ValueError, match="sample_shape"):
        sample_shape_of(TinyMLP())
    x, t = torch.randn(2, *sample_shape_of(video)), torch.tensor([100, 900])
    cond = {"scale": torch.tensor([1.0, 2.0])}
    x0 = Denoiser(video, DDPM).predict(
        x, t, cond, to="sample", guidance_scale=2.0, uncond={"scale": torch.ones(2)}
    )
    assert x0.shape == x.shape and torch.isfinite(x0).all()


def test_sample_shapes_of_the_diffusers_families():
    expected = {"unet2d": (1, 8, 8), "flux": (4, 128, 128)}  # Flux: packed channels / 4, pipeline's 1024 px
    for name in NAMES:
        assert sample_shape_of(tiny(name)) == expected.get(name, (4, 8, 8)), name


@pytest.mark.parametrize("name", NAMES)
def test_gan_block_and_lora_targets_of_each_family(name):
    model = tiny(name)
    site = backbone_of(model).gan_features(model)
    if name in ("unet2d", "sd", "sdxl"):
        assert site.block is model.mid_block and site.layout == "spatial"
        assert site.width == model.config.block_out_channels[-1]
    else:
        blocks = [*model.transformer_blocks, *getattr(model, "single_transformer_blocks", [])]
        assert site.block is blocks[len(blocks) // 2] and site.layout == "tokens"
        assert site.width == model.config.num_attention_heads * model.config.attention_head_dim
    assert gan_feature_block(torch.compile(model)) is site.block
    x, t, cond = inputs(name)
    with torch.no_grad(), captured_output(site.block, []) as feats:
        Denoiser(model, DDPM)(x, t, cond)
    assert gan_head(model)(feats[-1]).shape == (2, 1)

    targets = backbone_of(model).lora_targets(model)
    assert targets and all(isinstance(model.get_submodule(n), (nn.Linear, nn.Conv2d)) for n in targets)
    convs = any(n.endswith("conv1") for n in targets)
    assert convs == (name in ("unet2d", "sd", "sdxl"))  # UNets adapt resnet convs, transformers do not
    if name in ("sd3", "flux"):
        assert any(n.endswith("add_q_proj") for n in targets)  # both attention streams


def test_the_gan_block_of_a_module_without_blocks_is_a_clear_error():
    with pytest.raises(ValueError, match="mid-block or transformer blocks; TinyMLP has neither"):
        gan_feature_block(TinyMLP())


def test_the_denoiser_calls_each_family_as_its_pipeline_does():
    unet = tiny("unet2d")
    x, t, cond = inputs("unet2d")
    with torch.no_grad():
        direct = unet(x, t, class_labels=cond["class_labels"]).sample
        torch.testing.assert_close(Denoiser(unet, DDPM)(x, t, cond), direct)
        torch.testing.assert_close(Denoiser(subclassed(unet), DDPM)(x, t, cond), direct)

        sd3 = tiny("sd3")
        x, t, cond = inputs("sd3")
        pooled = cond["added_cond_kwargs"]["pooled_projections"]
        direct = sd3(hidden_states=x, timestep=t, encoder_hidden_states=cond["encoder_hidden_states"],
                     pooled_projections=pooled).sample  # fmt: skip
        torch.testing.assert_close(Denoiser(sd3, FLOW)(x, t, cond), direct)

        flux = tiny("flux")  # packed tokens, timestep / 1000, ids, default embedded guidance 3.5
        x, t, cond = inputs("flux")
        out = flux(hidden_states=pack_latents(x), timestep=t / 1000, guidance=torch.full((2,), 3.5),
                   pooled_projections=cond["added_cond_kwargs"]["pooled_projections"],
                   encoder_hidden_states=cond["encoder_hidden_states"], txt_ids=torch.zeros(SEQ, 3),
                   img_ids=flux_image_ids(8, 8)).sample  # fmt: skip
        torch.testing.assert_close(Denoiser(flux, FLOW)(x, t, cond), unpack_latents(out, 8, 8))


def test_a_compiled_unet_is_called_as_the_unet():
    """The old class-name dispatch sent an ``OptimizedModule`` down the plain-module path (wrong call)."""
    unet = tiny("unet2d")
    x, t, cond = inputs("unet2d")
    with torch.no_grad():
        expected = Denoiser(unet, DDPM)(x, t, cond)
        torch.testing.assert_close(Denoiser(torch.compile(unet, backend="eager"), DDPM)(x, t, cond), expected)


def test_a_new_family_is_one_subclass():
    class Clip(nn.Module):  # a video model called with its own keyword names
        def forward(self, video, noise_level, text):
            return video * text.mean() + noise_level.float().reshape(-1, 1, 1, 1, 1)

    class ClipFamily(Backbone):
        name = "test-clip"
        package = "torch"

        def model_classes(self):
            return (Clip,)

        def call(self, model, x, t, cond, *, timestep_cond=None, guidance=None):
            return model(video=x, noise_level=t, text=cond["encoder_hidden_states"])

        def sample_shape(self, model):
            return (3, 2, 4, 4)

    try:
        clip = type("MyClip", (Clip,), {})()
        assert backbone_of(clip).name == "test-clip" and "test-clip" not in families()
        x, t, cond = (
            torch.ones(2, 3, 2, 4, 4),
            torch.tensor([1, 2]),
            {"encoder_hidden_states": torch.ones(2, 5)},
        )
        assert torch.equal(Denoiser(clip, DDPM)(x, t, cond), clip(x, t, cond["encoder_hidden_states"]))
        assert sample_shape_of(clip) == (3, 2, 4, 4)
    finally:
        REGISTRY[:] = [b for b in REGISTRY if b.name != "test-clip"]


def test_guidance_adapters_accept_subclassed_and_compiled_bases():
    from stepdistill.guidance_adapters import GuidanceAdapters

    unet = tiny("sd")
    sites = GuidanceAdapters.for_backbone(unet).config.sites
    for base in (subclassed(unet), torch.compile(unet)):
        adapters = GuidanceAdapters.for_backbone(base)
        assert adapters.config.backbone == type(unet).__name__ and adapters.config.sites == sites
    x, t, cond = inputs("sd")
    with torch.no_grad():
        for p in adapters.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
        plain = adapters(unet, x, t, 3.0, **cond)
        compiled = adapters(torch.compile(unet, backend="eager"), x, t, 3.0, **cond)
        assert not torch.allclose(plain, adapters(unet, x, t, 1.0, **cond))  # the adapters are in the path
    torch.testing.assert_close(compiled, plain)
