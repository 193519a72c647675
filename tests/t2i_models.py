"""Tiny random text-to-image pipelines of every family, built in code and saved as hub-layout folders.

Tokenizers come from a tiny vocabulary written here (letters, a few words, special tokens), so
nothing is downloaded. Every model is a few thousand parameters; images are 16x16 pixels.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

FAMILIES = ("sd", "sdxl", "sd3", "flux", "sana", "pixart")
RESOLUTION = 16  # pixels; every tiny VAE downsamples by 2, so latents are 8x8
SEQ = 12  # CLIP context length and T5 / Gemma max_sequence_length used by the tests
WORDS = ("a", "cat", "dog", "red", "blue", "photo", "of", "the")


def clip_tokenizer():
    from transformers import CLIPTokenizer

    letters = list(string.ascii_lowercase + string.digits + ".,'!?-")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for piece in letters + [c + "</w>" for c in letters] + [w + "</w>" for w in WORDS]:
        vocab.setdefault(piece, len(vocab))
    merges = []
    for w in WORDS:  # merge each word left to right into its end-of-word form
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            merged = pieces[0] + pieces[1]
            vocab.setdefault(merged, len(vocab))
            pieces = [merged] + pieces[2:]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=SEQ)


def t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in WORDS] + [(c, -3.0) for c in string.ascii_lowercase + string.digits]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def gemma_tokenizer():
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for i in range(256):
        vocab[f"<0x{i:02X}>"] = len(vocab)
    for piece in ["▁"] + list(string.ascii_letters + string.digits + ".,'!?-:\n"):
        vocab.setdefault(piece, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=[])


def clip_text_model(tokenizer, hidden: int = 16, projection: int | None = None, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=SEQ, projection_dim=projection or hidden,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def t5_model(tokenizer, d_model: int = 32, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    return T5EncoderModel(config).eval()


def gemma2_model(tokenizer, hidden: int = 32, seed: int = 0):
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    config = Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
        max_position_embeddings=4096, sliding_window=4096, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )  # fmt: skip
    return Gemma2Model(config).eval()


def autoencoder_kl(latent_channels: int = 4, shift: bool = False, seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    extra = {"shift_factor": 0.1, "use_quant_conv": False, "use_post_quant_conv": False} if shift else {}
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=2, sample_size=RESOLUTION, scaling_factor=0.5, **extra,
    )  # fmt: skip


def autoencoder_dc(seed: int = 0):
    from diffusers import AutoencoderDC

    torch.manual_seed(seed)
    return AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=4,
        encoder_block_types=("ResBlock", "ResBlock"), decoder_block_types=("ResBlock", "ResBlock"),
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), ()), decoder_qkv_multiscales=((), ()),
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.5,
    )  # fmt: skip


def sd_unet(sdxl: bool = False, prediction_type: str = "epsilon", seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    extra = {}
    if sdxl:
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=32 + 6 * 8)  # fmt: skip
    return UNet2DConditionModel(
        sample_size=RESOLUTION // 2, in_channels=4, out_channels=4, block_out_channels=(4, 8),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=2, cross_attention_dim=32,
        attention_head_dim=2, **extra,
    )  # fmt: skip


def sd3_transformer():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=RESOLUTION // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
        pooled_projection_dim=32, pos_embed_max_size=8,
    )  # fmt: skip


def flux_transformer():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
        axes_dims_rope=(4, 2, 2),
    )  # fmt: skip


def sana_transformer():
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(0)
    return SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
        caption_channels=32, sample_size=RESOLUTION // 2, patch_size=1,
    )  # fmt: skip


def pixart_transformer():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    return PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
        norm_num_groups=2, cross_attention_dim=16, caption_channels=32, sample_size=RESOLUTION // 2,
        patch_size=2,
    )  # fmt: skip


# The tiny backbone of every text-to-image family and the extra condition inputs it takes (name: shape).
BACKBONES = {
    "sd": (sd_unet, {}),
    "sdxl": (lambda: sd_unet(sdxl=True), {"text_embeds": (32,), "time_ids": (6,)}),
    "sd3": (sd3_transformer, {"pooled_projections": (32,)}),
    "flux": (flux_transformer, {"pooled_projections": (16,)}),
    "sana": (sana_transformer, {"encoder_attention_mask": None}),
    "pixart": (pixart_transformer, {"encoder_attention_mask": None}),
}


def random_condition(family: str, n: int, seed: int = 0) -> dict:
    """A random prompt condition of ``family``'s tiny backbone, of the Denoiser's form (``SEQ`` tokens)."""
    gen = torch.Generator().manual_seed(seed)
    extra = {}
    for name, shape in BACKBONES[family][1].items():
        extra[name] = (
            torch.ones(n, SEQ, dtype=torch.long) if shape is None else torch.randn(n, *shape, generator=gen)
        )
    cond = {"encoder_hidden_states": torch.randn(n, SEQ, 32, generator=gen)}
    return {**cond, "added_cond_kwargs": extra} if extra else cond


def build_pipeline(family: str, prediction_type: str = "epsilon"):
    """A tiny random pipeline of ``family`` (one of ``FAMILIES``)."""
    import diffusers

    if family in ("sd", "sdxl"):
        scheduler = diffusers.DDIMScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
            prediction_type=prediction_type, timestep_spacing="trailing", steps_offset=1,
        )  # fmt: skip
    if family == "sd":
        tok = clip_tokenizer()
        return diffusers.StableDiffusionPipeline(
            vae=autoencoder_kl(), text_encoder=clip_text_model(tok, hidden=32), tokenizer=tok,
            unet=sd_unet(prediction_type=prediction_type), scheduler=scheduler, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
    if family == "sdxl":
        tok, tok2 = clip_tokenizer(), clip_tokenizer()
        return diffusers.StableDiffusionXLPipeline(
            vae=autoencoder_kl(), text_encoder=clip_text_model(tok, 16), tokenizer=tok,
            text_encoder_2=clip_text_model(tok2, 16, projection=32, seed=1), tokenizer_2=tok2,
            unet=sd_unet(sdxl=True, prediction_type=prediction_type), scheduler=scheduler,
        )  # fmt: skip
    if family == "sd3":
        tok, tok2, tok3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
        return diffusers.StableDiffusion3Pipeline(
            transformer=sd3_transformer(), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=autoencoder_kl(shift=True), text_encoder=clip_text_model(tok, 16, projection=16),
            tokenizer=tok, text_encoder_2=clip_text_model(tok2, 16, projection=16, seed=1),
            tokenizer_2=tok2, text_encoder_3=t5_model(tok3), tokenizer_3=tok3,
        )  # fmt: skip
    if family == "flux":
        tok, tok2 = clip_tokenizer(), t5_tokenizer()
        transformer = flux_transformer()
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096, shift=3.0,
        )  # fmt: skip
        return diffusers.FluxPipeline(
            scheduler=scheduler, vae=autoencoder_kl(shift=True), text_encoder=clip_text_model(tok, 16),
            tokenizer=tok, text_encoder_2=t5_model(tok2), tokenizer_2=tok2, transformer=transformer,
        )  # fmt: skip
    if family == "sana":
        tok = gemma_tokenizer()
        transformer = sana_transformer()
        scheduler = diffusers.DPMSolverMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
        )
        return diffusers.SanaPipeline(
            tokenizer=tok, text_encoder=gemma2_model(tok), vae=autoencoder_dc(), transformer=transformer,
            scheduler=scheduler,
        )  # fmt: skip
    if family == "pixart":
        tok = t5_tokenizer()
        transformer = pixart_transformer()
        scheduler = diffusers.DPMSolverMultistepScheduler(beta_schedule="linear", beta_end=0.02)
        return diffusers.PixArtAlphaPipeline(
            tokenizer=tok, text_encoder=t5_model(tok), vae=autoencoder_kl(), transformer=transformer,
            scheduler=scheduler,
        )  # fmt: skip
    raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}.")


def save_pipeline(family: str, folder: str | Path, prediction_type: str = "epsilon") -> Path:
    """Build the tiny ``family`` pipeline and save it as a hub-layout folder."""
    folder = Path(folder)
    build_pipeline(family, prediction_type).save_pretrained(folder)
    return folder
