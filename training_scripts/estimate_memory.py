"""Accelerator memory that each objective's weights and optimizer state take on real-size teachers.

    python training_scripts/estimate_memory.py                  # SD1.5, SDXL, SD3-medium, Flux-dev, Sana
    python training_scripts/estimate_memory.py --lora_rank 32 --base_dtype float16

The backbones are built from their published configs on PyTorch's meta device (no weights, no
download), the LoRA adapters, fake scores, GAN heads and guidance adapters with the library's own code,
and every parameter is counted: the frozen base in ``--base_dtype``, each trained parameter at 16 bytes
(float32 weight, gradient and two Adam moments), a consistency EMA target adapter at 4. Activations are
not included: they grow with batch size and resolution and shrink with ``--gradient_checkpointing``.
Text encoders and the VAE are offloaded after caching (``--offload cpu``), so they are listed apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stepdistill.cli import parse_args

GIB = 1024**3
TRAINED_BYTES, EMA_BYTES = 16, 4

CLIP_L = (
    "CLIP-L",
    "clip",
    dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
)
CLIP_G = ("OpenCLIP-bigG", "clip", dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                        num_attention_heads=20, projection_dim=1280))  # fmt: skip
T5_XXL = ("T5-XXL", "t5", dict(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64, vocab_size=32128,
                               feed_forward_proj="gated-gelu"))  # fmt: skip
GEMMA2 = ("Gemma-2-2B", "gemma", dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                                      num_key_value_heads=4, head_dim=256, vocab_size=256000))  # fmt: skip
UNET_BASE = dict(in_channels=4, out_channels=4, layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)  # fmt: skip
BACKBONES = {  # name: (diffusers class, config, text encoders (name, kind, config))
    "SD1.5": ("UNet2DConditionModel", dict(**UNET_BASE, sample_size=64, block_out_channels=(320, 640, 1280, 1280),
              cross_attention_dim=768, attention_head_dim=8), [CLIP_L]),
    "SDXL": ("UNet2DConditionModel", dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
             block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
             attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
             addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
             [CLIP_L, CLIP_G]),
    "SD3-medium": ("SD3Transformer2DModel", dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                   attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192), [CLIP_L, CLIP_G, T5_XXL]),
    "Flux-dev": ("FluxTransformer2DModel", dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                 attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                 guidance_embeds=True, axes_dims_rope=(16, 56, 56)), [CLIP_L, T5_XXL]),
    "Sana-1600M": ("SanaTransformer2DModel", dict(in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32,
                   num_layers=20, num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240,
                   caption_channels=2304, mlp_ratio=2.5, sample_size=32, patch_size=1), [GEMMA2]),
}  # fmt: skip


@dataclass
class EstimateArgs:
    lora_rank: int = field(
        default=64, metadata={"help": "LoRA rank of the student and of a LoRA fake score."}
    )
    base_dtype: str = field(default="bfloat16", metadata={"help": "Frozen base dtype: bfloat16, float16 or float32."})  # fmt: skip
    models: list[str] = field(default_factory=lambda: list(BACKBONES), metadata={"help": "Backbones to estimate."})  # fmt: skip


def count(params) -> int:
    return sum(p.numel() for p in params)


def text_encoder_size(kind: str, config: dict) -> int:
    import transformers as tf

    model_cls, config_cls = {"clip": ("CLIPTextModelWithProjection", "CLIPTextConfig"),
                             "t5": ("T5EncoderModel", "T5Config"), "gemma": ("Gemma2Model", "Gemma2Config")}[kind]  # fmt: skip
    with torch.device("meta"):
        return count(getattr(tf, model_cls)(getattr(tf, config_cls)(**config)).parameters())


def estimate(name: str, args: EstimateArgs) -> list[dict]:
    """Rows ``{model, objective, GiB}`` for one backbone."""
    import diffusers

    from stepdistill.guidance_adapters import GuidanceAdapters
    from stepdistill.objectives.dmd import gan_head
    from stepdistill.roles import FAKE_SCORE, STUDENT, lora_roles

    cls, config, _ = BACKBONES[name]
    with torch.device("meta"):
        base = getattr(diffusers, cls)(**config).requires_grad_(False)
        n_base = count(base.parameters())
        gan = count(gan_head(base).parameters())
        agd = count(GuidanceAdapters.for_backbone(base, context_dim=512, inner_dim=512, heads=8).parameters())
        roles = lora_roles(base, None, args.lora_rank, fake_score=True)
    lora = count(roles.trainable[STUDENT])
    assert lora == count(roles.trainable[FAKE_SCORE])
    base_bytes = n_base * torch.empty((), dtype=getattr(torch, args.base_dtype)).element_size()
    rows = {
        "consistency, LoRA student (LCM-LoRA, EMA target adapter)": lora * (TRAINED_BYTES + EMA_BYTES),
        "DMD2, LoRA student + LoRA fake score + GAN head": (2 * lora + gan) * TRAINED_BYTES,
        "DMD2, LoRA student + full fake-score copy + GAN head": (lora + n_base + gan) * TRAINED_BYTES,
        "SiD, LoRA student + LoRA fake score": 2 * lora * TRAINED_BYTES,
        "AGD, guidance adapters": agd * TRAINED_BYTES,
        "any objective, full student + full fake score": 2 * n_base * TRAINED_BYTES,
    }
    out = [{"model": name, "base_params": n_base, "lora_params": lora, "objective": k,
            "gib": (base_bytes + v) / GIB} for k, v in rows.items()]  # fmt: skip
    return out


def main() -> None:
    (args,) = parse_args(EstimateArgs)
    unknown = [m for m in args.models if m not in BACKBONES]
    if unknown:
        raise SystemExit(f"--models must name {', '.join(BACKBONES)}; got {', '.join(unknown)}.")
    print(
        f"Weights + optimizer state on the accelerator (GiB), base in {args.base_dtype}, LoRA rank {args.lora_rank};"
    )
    print("activations excluded; text encoders and VAE offloaded after caching.\n")
    for name in args.models:
        rows = estimate(name, args)
        encoders = ", ".join(f"{n} {text_encoder_size(k, c) / 1e9:.2f} B" for n, k, c in BACKBONES[name][2])
        print(f"### {name}: backbone {rows[0]['base_params'] / 1e9:.2f} B parameters, LoRA r{args.lora_rank} "
              f"{rows[0]['lora_params'] / 1e6:.1f} M per adapter" + (f"; text encoders {encoders}" if encoders else ""))  # fmt: skip
        print("\n| objective | GiB |\n|---|---|")
        for row in rows:
            print(f"| {row['objective']} | {row['gib']:.1f} |")
        print()


if __name__ == "__main__":
    main()
