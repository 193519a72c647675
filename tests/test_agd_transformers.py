"""Guidance adapters (AGD) on the flow / DiT transformers: SD3, Flux, Sana and PixArt."""

import pytest
import torch
from t2i_models import build_pipeline

from stepdistill.backbones.flux import flux_image_ids, pack_latents, unpack_latents
from stepdistill.denoiser import Denoiser, cfg
from stepdistill.guidance_adapters import AdapterGuidedModel, GuidanceAdapters, parameter_share
from stepdistill.objectives.agd import (
    AGDConfig,
    AGDObjective,
    build_adapters,
    cache_trajectories,
    unflatten_condition,
)
from stepdistill.schedules import schedule_from_scheduler
from stepdistill.training import TrainConfig, train

FAMILIES = ("sd3", "flux", "sana", "pixart")
SITES = {  # where the tiny models' adapters sit
    "sd3": ["transformer_blocks.0.attn"],
    "flux": ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"],
    "sana": ["transformer_blocks.0"],  # after each block: Sana's blocks forward no attention kwargs
    "pixart": ["transformer_blocks.0.attn2"],
}
SHAPE, SEQ = (4, 8, 8), 6


@pytest.fixture(scope="module")
def teachers():
    """Frozen tiny transformers and their noise schedules (text encoders and VAEs unused)."""
    out = {}
    for family in FAMILIES:
        pipe = build_pipeline(family)
        out[family] = (pipe.transformer.requires_grad_(False).eval(), schedule_from_scheduler(pipe.scheduler))
    return out


def condition(family: str, n: int, seed: int = 0) -> dict:
    """A random prompt condition of the Denoiser's form (``encoder_hidden_states``, ``added_cond_kwargs``)."""
    gen = torch.Generator().manual_seed(seed)
    extra = {}
    if family in ("sd3", "flux"):
        extra["pooled_projections"] = torch.randn(n, 32 if family == "sd3" else 16, generator=gen)
    else:  # padded prompts: the last tokens of every other prompt are masked out
        mask = torch.ones(n, SEQ, dtype=torch.long)
        mask[::2, SEQ - 2 :] = 0
        extra["encoder_attention_mask"] = mask
    return {"encoder_hidden_states": torch.randn(n, SEQ, 32, generator=gen), "added_cond_kwargs": extra}


def perturb(adapters: GuidanceAdapters, scale: float = 0.05) -> GuidanceAdapters:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapters.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return adapters


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_adapters_leave_the_transformer_exactly_unchanged(teachers, family):
    base, schedule = teachers[family]
    adapters = GuidanceAdapters.for_backbone(base)
    assert adapters.config.sites == SITES[family]
    x, t, cond = torch.randn(3, *SHAPE), torch.tensor([950.0, 500.0, 20.0]), condition(family, 3)
    plain, guided = Denoiser(base, schedule), Denoiser(AdapterGuidedModel(base, adapters), schedule)
    w = torch.tensor([1.0, 3.0, 7.5])
    with torch.no_grad():
        ref = plain(x, t, cond)
        for scale in (1.0, 4.0, w):
            assert torch.equal(guided(x, t, {**cond, "guidance_scale": scale}), ref)
        assert torch.equal(plain(x, t, cond), ref)  # attached processors without the adapters: the plain base
        perturb(adapters)
        moved = {s: guided(x, t, {**cond, "guidance_scale": s}) for s in (1.0, 4.0)}
    assert (moved[4.0] - ref).abs().max() > 1e-4  # the adapters are in the path
    assert (moved[4.0] - moved[1.0]).abs().amax(dim=(1, 2, 3)).min() > 1e-5  # and read w, per sample


def test_native_calls_match_the_denoiser_path_and_bad_inputs_raise(teachers):
    """Called natively (Flux: packed tokens, timestep / 1000, ids), the adapters match the Denoiser path."""
    base, schedule = teachers["flux"]
    adapters = perturb(GuidanceAdapters.for_backbone(base))
    x, cond = torch.randn(2, *SHAPE), condition("flux", 2)
    ehs, pooled = cond["encoder_hidden_states"], cond["added_cond_kwargs"]["pooled_projections"]

    with torch.no_grad():
        native = adapters(base, pack_latents(x), torch.tensor([0.7, 0.2]), 3.0, encoder_hidden_states=ehs,
                          pooled_projections=pooled, guidance=torch.full((2,), 3.5), txt_ids=torch.zeros(SEQ, 3),
                          img_ids=flux_image_ids(8, 8))  # fmt: skip
        via = Denoiser(AdapterGuidedModel(base, adapters), schedule)(
            x, torch.tensor([700.0, 200.0]), {**cond, "guidance_scale": 3.0}
        )
    torch.testing.assert_close(unpack_latents(native, 8, 8), via)
    sana, _ = teachers["sana"]
    sana_adapters, prompt = GuidanceAdapters.for_backbone(sana), condition("sana", 2)["encoder_hidden_states"]
    with pytest.raises(ValueError, match="one entry per prompt token"):
        sana_adapters(
            sana, x, 5, 2.0, encoder_hidden_states=prompt, encoder_attention_mask=torch.ones(2, SEQ + 1)
        )
    with pytest.raises(ValueError, match="controlnet_block_samples"):
        sana_adapters(sana, x, 5, 2.0, encoder_hidden_states=prompt, controlnet_block_samples=())
    with pytest.raises(ValueError, match="FluxTransformer2DModel"):
        adapters(sana, x, 5, 2.0, encoder_hidden_states=prompt)
    with pytest.raises(ValueError, match="SanaTransformer2DModel"):
        GuidanceAdapters.for_backbone(torch.nn.Linear(2, 2))


def test_parameter_share_on_real_size_configs():
    """SD3-medium, Flux-dev, Sana-1600M and PixArt-alpha configs, built with meta tensors (no weights)."""
    import diffusers

    configs = {
        "SD3Transformer2DModel": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
            attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
            pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192),
        "FluxTransformer2DModel": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
            attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
            guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
        "SanaTransformer2DModel": dict(in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32,
            num_layers=20, num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240,
            caption_channels=2304, mlp_ratio=2.5, sample_size=32, patch_size=1),
        "PixArtTransformer2DModel": dict(num_attention_heads=16, attention_head_dim=72, in_channels=4,
            out_channels=8, num_layers=28, cross_attention_dim=1152, caption_channels=4096, sample_size=128,
            norm_type="ada_norm_single", use_additional_conditions=True, activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000, norm_elementwise_affine=False, norm_eps=1e-6),
    }  # fmt: skip
    sizes = {"SD3Transformer2DModel": 2.03e9, "FluxTransformer2DModel": 11.9e9, "SanaTransformer2DModel": 1.60e9,
             "PixArtTransformer2DModel": 0.611e9}  # fmt: skip
    width = {"PixArtTransformer2DModel": 256}  # the narrowest base: narrower adapters
    with torch.device("meta"):
        for name, config in configs.items():
            base = getattr(diffusers, name)(**config)
            assert sum(p.numel() for p in base.parameters()) == pytest.approx(sizes[name], rel=0.01)
            d = width.get(name, 512)
            share = parameter_share(
                GuidanceAdapters.for_backbone(base, context_dim=d, inner_dim=d, heads=8), base
            )
            assert 0.01 <= share <= 0.05, (name, share)


def train_agd(teachers, family, tmp_path, steps):
    base, schedule = teachers[family]
    uncond = {k: v[:1] if torch.is_tensor(v) else {kk: vv[:1] for kk, vv in v.items()}
              for k, v in condition(family, 1, seed=1).items()}  # fmt: skip
    if "encoder_attention_mask" in uncond["added_cond_kwargs"]:
        uncond["added_cond_kwargs"]["encoder_attention_mask"] = torch.ones(1, SEQ, dtype=torch.long)
    teacher = Denoiser(base, schedule, unconditional=uncond)
    config = AGDConfig(learning_rate=1e-2, lr_warmup_steps=0, lr_scheduler="constant", guidance_max=4.0,
                       solver_steps=[3], num_trajectories=16, trajectories_per_shard=16)  # fmt: skip
    adapters = build_adapters(base, config)
    objective = AGDObjective(teacher, adapters, config, sample_shape=SHAPE)
    dataset = cache_trajectories(
        teacher, config, condition(family, 8), tmp_path / "cache", sample_shape=SHAPE
    )
    base_before = {k: v.clone() for k, v in base.state_dict().items()}
    adapters_before = {k: v.clone() for k, v in adapters.state_dict().items()}
    loop = TrainConfig(output_dir=str(tmp_path / "run"), max_train_steps=steps, train_batch_size=16,
                       report_to="none", checkpointing_steps=10**6)  # fmt: skip
    train(objective, loop, dataset)
    return teacher, adapters, objective, dataset, base_before, adapters_before


@pytest.mark.parametrize("family", FAMILIES)
def test_agd_trains_only_the_adapters_and_they_learn_the_guidance_scale(teachers, family, tmp_path):
    teacher, adapters, objective, dataset, base_before, adapters_before = train_agd(
        teachers, family, tmp_path, 40
    )
    assert "added_cond_kwargs.encoder_attention_mask" in dataset.tensors or family in ("sd3", "flux")
    assert all(torch.equal(v, base_before[k]) for k, v in teacher.model.state_dict().items())
    moved = {
        k.split(".")[0] for k, v in adapters.state_dict().items() if not torch.equal(v, adapters_before[k])
    }
    assert moved >= {"guidance_encoder", "timestep_encoder", "condition_proj", "blocks"}
    tensors = dataset.tensors
    x, t = tensors["x_t"], tensors["t"]
    cond = unflatten_condition(
        {k: v for k, v in tensors.items() if k not in ("x_t", "t", "target", "guidance_scale")}
    )
    with torch.no_grad():
        outs = {w: objective.student(x, t, {**cond, "guidance_scale": w}) for w in (1.0, 4.0)}
        c = teacher(x, t, cond)
        guided4 = cfg(teacher(x, t, teacher.null_condition(cond)), c, 4.0)
    gap = (outs[4.0] - outs[1.0]).pow(2).mean() / (guided4 - c).pow(2).mean()
    assert gap > 0.02, gap  # after training the output depends on w (fresh adapters: exactly 0)
    fresh = (c - guided4).pow(2).mean()
    assert (outs[4.0] - guided4).pow(2).mean() < 0.9 * fresh  # closer to CFG at w = 4 than the base


class Prompts(torch.utils.data.Dataset):
    """Conditions only (nested ``added_cond_kwargs`` too): AGD then draws its pairs on the fly."""

    def __init__(self, family: str):
        self.cond = condition(family, 8)

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        return {
            k: v[i] if torch.is_tensor(v) else {kk: vv[i] for kk, vv in v.items()}
            for k, v in self.cond.items()
        }


@pytest.mark.parametrize("family", ["flux", "sana"])
def test_on_the_fly_pairs_from_nested_conditions_train_the_adapters(teachers, family, tmp_path):
    base, schedule = teachers[family]
    uncond = condition(family, 1, seed=1)  # a batch of one: repeated by the Denoiser
    teacher = Denoiser(base, schedule, unconditional=uncond)
    config = AGDConfig(learning_rate=1e-2, lr_warmup_steps=0, lr_scheduler="constant", solver_steps=[2, 3])
    adapters = build_adapters(base, config)
    before = {k: v.clone() for k, v in adapters.state_dict().items()}
    base_before = {k: v.clone() for k, v in base.state_dict().items()}
    base.enable_gradient_checkpointing()  # the adapters' forward honours it (Sana: its own block loop)
    try:
        objective = AGDObjective(teacher, adapters, config, sample_shape=SHAPE)
        loop = TrainConfig(output_dir=str(tmp_path), max_train_steps=3, train_batch_size=4, report_to="none",
                           checkpointing_steps=10**6)  # fmt: skip
        train(objective, loop, Prompts(family))
    finally:
        base.disable_gradient_checkpointing()
    assert all(torch.equal(v, base_before[k]) for k, v in base.state_dict().items())
    assert any(not torch.equal(v, before[k]) for k, v in adapters.state_dict().items())
