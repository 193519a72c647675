"""Guidance adapters: adapter guidance distillation (AGD, Jensen et al. 2025).

Small zero-initialised modules on a frozen diffusion backbone that learn to produce, in *one*
forward, the classifier-free-guided prediction ``uncond + w (cond - uncond)`` at any guidance scale
``w`` (CFG convention: ``w = 1`` is the conditional model). Each adapter is a cross-attention from
the backbone's hidden states to a few context tokens: ``[w-embedding, t-embedding, condition
tokens]`` (AGD Sec. 3); the guidance scale is encoded by fixed random Fourier features
``cos(2 pi (f w + phi))`` followed by an MLP and a LayerNorm. Output projections start at zero, so a
fresh adapter leaves the backbone's output exactly unchanged.

Explicit conditioning, never a side channel: the guidance scale, timestep and condition are
arguments of ``GuidanceAdapters.forward(base, sample, timestep, guidance_scale, ...)``, which runs
the (frozen, unmodified) base model and hands the adapters their context as call arguments:

- ``UNet2DConditionModel``: one adapter per cross-attention module (``attn2``). ``attach(base)``
  swaps in attention processors that hold only their site name; the adapter weights and the context
  tokens reach them through ``cross_attention_kwargs`` on every call. Without those keyword arguments
  the processors run the original attention unchanged.
- ``PixArtTransformer2DModel``: the same, on every cross-attention (``attn2``), through the
  transformer's ``cross_attention_kwargs``.
- ``SD3Transformer2DModel`` and ``FluxTransformer2DModel``: one adapter per joint attention (``attn``
  of every double-stream block, and of every single-stream block for Flux), on the *image* tokens
  only; weights and context reach the processors through ``joint_attention_kwargs``.
- ``UNet2DModel`` and ``SanaTransformer2DModel`` (whose blocks forward no keyword arguments to their
  attention): ``forward`` runs the base's own sub-modules in the order of the base's ``forward`` and
  adds an adapter's output to the hidden states after every attention-bearing block (UNet: down,
  mid, up; Sana: every transformer block). No hook, global or stored state is involved, so gradient
  checkpointing and concurrent calls stay correct.

Transformers are called natively (the tensors their diffusers pipeline feeds them: Flux's packed
tokens, each family's timestep convention); ``AdapterGuidedModel`` wraps base and adapters for
stepdistill's ``Denoiser``, which supplies those conventions. This file imports only torch and
diffusers at module level: exports copy it into the ``adapters/`` folder of a pipeline, so that
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` loads the adapters without
stepdistill installed. That is also why this file keeps its own family knowledge (adapter sites,
attention keyword arguments, dispatch on the saved class name) instead of asking ``stepdistill.backbones``.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

UNETS = ("UNet2DModel", "UNet2DConditionModel")
TRANSFORMERS = (
    "SD3Transformer2DModel",
    "FluxTransformer2DModel",
    "SanaTransformer2DModel",
    "PixArtTransformer2DModel",
)
BACKBONES = UNETS + TRANSFORMERS
# The keyword argument through which a backbone hands extra arguments to its attention processors.
ATTENTION_KWARGS = {
    "UNet2DConditionModel": "cross_attention_kwargs",
    "PixArtTransformer2DModel": "cross_attention_kwargs",
    "SD3Transformer2DModel": "joint_attention_kwargs",
    "FluxTransformer2DModel": "joint_attention_kwargs",
}


def _unwrapped(base: nn.Module) -> nn.Module:
    """The module inside ``torch.compile`` wrappers (whose module names carry an ``_orig_mod.`` prefix)."""
    while isinstance(getattr(base, "_orig_mod", None), nn.Module):
        base = base._orig_mod
    return base


def backbone_kind(base: nn.Module) -> str:
    """The name of the nearest class of ``base`` (unwrapped from ``torch.compile``) in ``BACKBONES``."""
    base = _unwrapped(base)
    return next((c.__name__ for c in type(base).__mro__ if c.__name__ in BACKBONES), type(base).__name__)


def fourier_features(w: torch.Tensor, freqs: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
    """``cos(2 pi (f w + phi))`` for each scalar in ``w`` (N,) and each fixed (f, phi): (N, F)."""
    return torch.cos(2 * math.pi * (w.float()[:, None] * freqs[None] + phases[None]))


def timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of the (float) timestep, ``[cos, sin]`` of ``t * 10000^(-k / half)``: (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angle = t.float()[:, None] * freqs[None]
    return torch.cat([angle.cos(), angle.sin()], dim=1)


class GuidanceScaleEncoder(nn.Module):
    """Guidance scale -> one context token: random Fourier features -> MLP -> LayerNorm (AGD Sec. 3.2)."""

    def __init__(self, dim: int, num_features: int = 64, scale: float = 1.0, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(num_features, generator=generator) * scale)
        self.register_buffer("phases", torch.rand(num_features, generator=generator))
        self.mlp = nn.Sequential(nn.Linear(num_features, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        feats = fourier_features(w, self.freqs, self.phases).to(self.mlp[0].weight.dtype)
        return self.norm(self.mlp(feats))


class AdapterBlock(nn.Module):
    """Cross-attention from hidden states (B, C, H, W) or (B, L, C) to context tokens (B, M, D).

    Returns the adapter's *output* (same shape as ``hidden_states``), to be added by the caller; its
    output projection is zero-initialised, so a fresh block returns exact zeros.
    """

    def __init__(self, channels: int, context_dim: int, inner_dim: int, heads: int):
        super().__init__()
        if inner_dim % heads:
            raise ValueError(f"inner_dim ({inner_dim}) must be divisible by heads ({heads}).")
        self.heads = heads
        self.norm = nn.LayerNorm(channels)
        self.to_q = nn.Linear(channels, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Linear(inner_dim, channels)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def forward(
        self, hidden_states: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``context_mask`` (B, M), optional: True for the context tokens to attend to."""
        spatial = hidden_states.ndim == 4
        if spatial:
            b, c, h, w = hidden_states.shape
            tokens = hidden_states.flatten(2).transpose(1, 2)
        else:
            tokens = hidden_states
        tokens = self.norm(tokens.to(self.to_q.weight.dtype))
        context = context.to(tokens.dtype)

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        q, k, v = split(self.to_q(tokens)), split(self.to_k(context)), split(self.to_v(context))
        mask = None if context_mask is None else context_mask[:, None, None, :].to(torch.bool)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
        out = self.to_out(out).to(hidden_states.dtype)
        return out.transpose(1, 2).reshape(b, c, h, w) if spatial else out


class AdapterAttnProcessor:
    """Attention processor of an adapted ``Attention`` module: the original processor plus, when the call
    brings ``guidance_adapters`` and ``guidance_context`` (via ``cross_attention_kwargs``), the output of
    the adapter of ``site`` computed from the attention's input hidden states.

    It stores no weights and no context: both arrive as call arguments.
    """

    def __init__(self, site: str | None, processor):
        self.site, self.processor = site, processor

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 guidance_adapters=None, guidance_context=None, guidance_context_mask=None):  # fmt: skip
        extra = {} if temb is None else {"temb": temb}
        out = self.processor(attn, hidden_states, encoder_hidden_states, attention_mask, **extra)
        if self.site is None or guidance_adapters is None:
            return out
        if guidance_context is None:
            raise ValueError("guidance_adapters was passed without guidance_context.")
        return out + guidance_adapters.block(self.site)(
            hidden_states, guidance_context, guidance_context_mask
        )


class JointAdapterAttnProcessor:
    """Attention processor of an adapted SD3 / Flux attention: the original processor plus, when the call
    brings ``guidance_adapters`` and ``guidance_context`` (via ``joint_attention_kwargs``), the adapter
    output of ``site`` added to the *image* tokens' attention output.

    Joint (double-stream) attention returns ``(image, text, ...)`` tokens: the adapter reads the image
    tokens it was given. Flux's single-stream attention sees ``[text; image]`` tokens: the first
    ``guidance_text_tokens`` are left alone. It stores no weights and no context.
    """

    def __init__(self, site: str | None, processor):
        self.site, self.processor = site, processor

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 guidance_adapters=None, guidance_context=None, guidance_context_mask=None,
                 guidance_text_tokens=0):  # fmt: skip
        args = (attn, hidden_states, encoder_hidden_states, attention_mask)
        out = self.processor(*args) if image_rotary_emb is None else self.processor(*args, image_rotary_emb)
        if self.site is None or guidance_adapters is None:
            return out
        if guidance_context is None:
            raise ValueError("guidance_adapters was passed without guidance_context.")
        block = guidance_adapters.block(self.site)
        if isinstance(out, tuple):  # joint attention: image tokens first
            return (out[0] + block(hidden_states, guidance_context, guidance_context_mask), *out[1:])
        n = guidance_text_tokens if encoder_hidden_states is None else 0
        delta = block(hidden_states[:, n:], guidance_context, guidance_context_mask)
        return torch.cat([out[:, :n], out[:, n:] + delta], dim=1) if n else out + delta


_PROCESSOR_NAMES = ("AdapterAttnProcessor", "JointAdapterAttnProcessor")


def _site_key(site: str) -> str:
    return site.replace(".", "_")


def _unet2d_sites(base: nn.Module) -> tuple[list[str], list[int]]:
    """Attention-bearing blocks of a ``UNet2DModel`` and their output channels (the mid block if none)."""
    sites, channels = [], []
    blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(base.down_blocks)]
    if base.mid_block is not None:
        blocks.append(("mid_block", base.mid_block))
    blocks += [(f"up_blocks.{i}", b) for i, b in enumerate(base.up_blocks)]
    for name, block in blocks:
        attentions = getattr(block, "attentions", None)
        if attentions is not None and any(a is not None for a in attentions):
            sites.append(name)
            channels.append(block.resnets[-1].out_channels)
    if not sites and base.mid_block is not None:
        sites, channels = ["mid_block"], [base.mid_block.resnets[-1].out_channels]
    return sites, channels


def _attention_sites(base: nn.Module, pattern: str) -> tuple[list[str], list[int]]:
    """Attention modules of ``base`` whose names match ``pattern``, and their query widths."""
    sites, channels = [], []
    for name, module in base.named_modules():
        if re.fullmatch(pattern, name) and hasattr(module, "processor"):
            sites.append(name)
            channels.append(module.to_q.in_features)
    return sites, channels


def _cross_attention_sites(base: nn.Module) -> tuple[list[str], list[int]]:
    """Cross-attention modules (``attn2``) of a ``UNet2DConditionModel`` or PixArt transformer."""
    return _attention_sites(base, r"(.*\.)?attn2")


class GuidanceAdapters(ModelMixin, ConfigMixin):
    """The guidance adapters of one backbone architecture, as a diffusers model (a pipeline component).

    Build them for a backbone with ``GuidanceAdapters.for_backbone(base)``; call them as
    ``adapters(base, sample, timestep, guidance_scale, class_labels=... | encoder_hidden_states=...)``.
    Any checkpoint of the same architecture (the teacher, a fine-tune, a distilled student) can be
    passed as ``base``.

    Args:
        backbone: one of ``BACKBONES``.
        sites: where the adapters sit (block names for ``UNet2DModel`` and Sana, attention module names otherwise).
        channels: hidden width at each site.
        num_class_embeds: class-conditional backbones: number of class ids (null class included).
        condition_dim: width of the prompt tokens the backbone is called with (text-conditional backbones).
        context_dim: width of the context tokens.
        inner_dim, heads: width and heads of each adapter's attention.
        num_fourier_features, fourier_scale, seed: the fixed random Fourier features of the guidance scale.
        timestep_features: sinusoidal features of the timestep; ``timestep_multiplier`` maps the
            backbone's native timestep to the 0..1000 range first (Flux: 1000).
    """

    @register_to_config
    def __init__(
        self,
        backbone: str,
        sites: list[str],
        channels: list[int],
        num_class_embeds: int | None = None,
        condition_dim: int | None = None,
        context_dim: int = 64,
        inner_dim: int = 32,
        heads: int = 4,
        num_fourier_features: int = 64,
        fourier_scale: float = 1.0,
        timestep_features: int = 64,
        seed: int = 0,
        timestep_multiplier: float = 1.0,
    ):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}, got {backbone!r}.")
        if not sites or len(sites) != len(channels):
            raise ValueError("sites and channels must be non-empty lists of equal length.")
        self.guidance_encoder = GuidanceScaleEncoder(context_dim, num_fourier_features, fourier_scale, seed)
        self.timestep_encoder = nn.Sequential(
            nn.Linear(timestep_features, context_dim), nn.SiLU(), nn.Linear(context_dim, context_dim)
        )
        self.class_embedding = nn.Embedding(num_class_embeds, context_dim) if num_class_embeds else None
        self.condition_proj = (
            nn.Sequential(nn.LayerNorm(condition_dim), nn.Linear(condition_dim, context_dim))
            if condition_dim
            else None
        )
        self.blocks = nn.ModuleDict(
            {_site_key(s): AdapterBlock(c, context_dim, inner_dim, heads) for s, c in zip(sites, channels)}
        )

    @classmethod
    def for_backbone(cls, base: nn.Module, **kwargs) -> GuidanceAdapters:
        """Zero-initialised adapters for ``base`` (sites and widths read from the model); ``kwargs`` go to ``__init__``."""
        base, kind = _unwrapped(base), backbone_kind(base)
        if kind == "UNet2DModel":
            sites, channels = _unet2d_sites(base)
            if base.config.time_embedding_type != "positional" or any(
                hasattr(b, "skip_conv") for b in [*base.down_blocks, *base.up_blocks]
            ):
                raise ValueError("guidance adapters support UNet2DModel with positional time embeddings and no skip blocks.")  # fmt: skip
            extra = {"num_class_embeds": base.config.num_class_embeds}
        elif kind == "UNet2DConditionModel":
            sites, channels = _cross_attention_sites(base)
            if not sites:
                raise ValueError("this UNet2DConditionModel has no cross-attention modules to adapt.")
            extra = {"condition_dim": base.config.cross_attention_dim}
        elif kind in ("SD3Transformer2DModel", "FluxTransformer2DModel"):
            sites, channels = _attention_sites(base, r"(single_)?transformer_blocks\.\d+\.attn")
            extra = {"condition_dim": base.config.joint_attention_dim}
            if kind == "FluxTransformer2DModel":  # Flux is called with timestep / 1000
                extra["timestep_multiplier"] = 1000.0
        elif kind == "PixArtTransformer2DModel":
            sites, channels = _cross_attention_sites(base)
            if not sites or not base.config.caption_channels:
                raise ValueError("guidance adapters support text-conditional PixArt transformers (caption_channels set).")  # fmt: skip
            extra = {"condition_dim": base.config.caption_channels}
        elif kind == "SanaTransformer2DModel":
            cfg = base.config
            sites = [f"transformer_blocks.{i}" for i in range(len(base.transformer_blocks))]
            channels = [cfg.num_attention_heads * cfg.attention_head_dim] * len(sites)
            extra = {"condition_dim": cfg.caption_channels, "timestep_multiplier": 1.0 / cfg.timestep_scale}
        else:
            raise ValueError(f"guidance adapters support {', '.join(BACKBONES)}, not {kind}.")
        return cls(backbone=kind, sites=sites, channels=channels, **extra, **kwargs)

    def block(self, site: str) -> AdapterBlock:
        """The adapter at ``site``."""
        return self.blocks[_site_key(site)]

    def context(self, guidance_scale: torch.Tensor, timestep: torch.Tensor, class_labels=None,
                encoder_hidden_states=None) -> torch.Tensor:  # fmt: skip
        """Context tokens ``[w, t, condition...]`` of shape (B, 2 + M, context_dim)."""
        tokens = [
            self.guidance_encoder(guidance_scale),
            self.timestep_encoder(timestep_features(timestep, self.config.timestep_features).to(self.dtype)),
        ]
        tokens = [tok[:, None] for tok in tokens]
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("these guidance adapters are class-conditional: pass class_labels.")
            tokens.append(self.class_embedding(class_labels.long())[:, None])
        if self.condition_proj is not None:
            if encoder_hidden_states is None:
                raise ValueError("these guidance adapters need encoder_hidden_states (prompt tokens).")
            tokens.append(self.condition_proj(encoder_hidden_states.to(self.dtype)))
        return torch.cat(tokens, dim=1)

    def attach(self, base: nn.Module) -> None:
        """Install adapter processors on ``base``'s attention modules (idempotent; backbones in ``ATTENTION_KWARGS``).

        The processors behave exactly as the originals unless a call passes the adapters and their
        context through the backbone's attention keyword arguments, so the attached base still is
        the plain base.
        """
        if self.config.backbone not in ATTENTION_KWARGS:
            return
        joint = ATTENTION_KWARGS[self.config.backbone] == "joint_attention_kwargs"
        wrapper = JointAdapterAttnProcessor if joint else AdapterAttnProcessor
        sites = set(self.config.sites)
        for name, module in _unwrapped(base).named_modules():
            processor = getattr(module, "processor", None)
            if processor is None or not hasattr(module, "set_processor"):
                continue
            if type(processor).__name__ in _PROCESSOR_NAMES:
                continue
            module.set_processor(wrapper(name if name in sites else None, processor))

    def forward(
        self,
        base: nn.Module,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        guidance_scale: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        **base_kwargs,
    ) -> torch.Tensor:
        """The backbone's prediction at ``guidance_scale`` in one forward of ``base`` with the adapters.

        ``guidance_scale`` and ``timestep`` are scalars or one value per sample. ``sample``, ``timestep``
        and ``base_kwargs`` are what the backbone's own ``forward`` takes (e.g. ``added_cond_kwargs`` for
        SDXL; ``pooled_projections`` for SD3; Flux's packed tokens, ``timestep / 1000``, ``img_ids``,
        ``txt_ids`` and ``guidance``; ``encoder_attention_mask`` for Sana and PixArt, which also masks
        the adapters' prompt tokens). Returns the raw model output tensor.
        """
        kind = self.config.backbone
        if backbone_kind(base) != kind:
            raise ValueError(f"these adapters were built for a {kind}, got a {type(base).__name__}.")
        n = sample.shape[0]
        t = _per_sample(timestep, n, sample.device, "timestep")
        w = _per_sample(guidance_scale, n, sample.device, "guidance_scale")
        context = self.context(w, t * self.config.timestep_multiplier, class_labels, encoder_hidden_states)
        mask = _context_mask(base_kwargs.get("encoder_attention_mask"), context)
        base_kwargs.pop("return_dict", None)
        if kind == "UNet2DModel":
            return self._unet2d_forward(base, sample, t, class_labels, context)
        if kind == "SanaTransformer2DModel":
            return self._sana_forward(base, sample, t, encoder_hidden_states, context, mask, **base_kwargs)
        self.attach(base)
        key = ATTENTION_KWARGS[kind]
        kwargs = dict(base_kwargs.pop(key, None) or {})
        kwargs.update(guidance_adapters=self, guidance_context=context)
        if mask is not None:
            kwargs["guidance_context_mask"] = mask
        if kind == "FluxTransformer2DModel":
            kwargs["guidance_text_tokens"] = encoder_hidden_states.shape[1]
        out = base(sample, timestep=t, encoder_hidden_states=encoder_hidden_states, return_dict=False,
                   **{key: kwargs}, **base_kwargs)  # fmt: skip
        return out[0]

    def _unet2d_forward(self, base, sample, timesteps, class_labels, context) -> torch.Tensor:
        """``UNet2DModel.forward`` on ``base``'s own modules, with adapter outputs added after adapted blocks."""
        cfg = base.config
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        emb = base.time_embedding(base.time_proj(timesteps.to(sample.device)).to(dtype=base.dtype))
        if base.class_embedding is not None:
            if class_labels is None:
                raise ValueError("class_labels should be provided when doing class conditioning")
            labels = base.time_proj(class_labels) if cfg.class_embed_type == "timestep" else class_labels
            emb = emb + base.class_embedding(labels).to(dtype=base.dtype)

        def adapt(name: str, h: torch.Tensor) -> torch.Tensor:
            key = _site_key(name)
            return h + self.blocks[key](h, context) if key in self.blocks else h

        sample = base.conv_in(sample)
        res = (sample,)
        for i, block in enumerate(base.down_blocks):
            sample, res_samples = block(hidden_states=sample, temb=emb)
            sample = adapt(f"down_blocks.{i}", sample)
            res += res_samples
        if base.mid_block is not None:
            sample = adapt("mid_block", base.mid_block(sample, emb))
        for i, block in enumerate(base.up_blocks):
            res_samples, res = res[-len(block.resnets) :], res[: -len(block.resnets)]
            sample = adapt(f"up_blocks.{i}", block(sample, res_samples, emb))
        return base.conv_out(base.conv_act(base.conv_norm_out(sample)))

    def _sana_forward(self, base, sample, timestep, encoder_hidden_states, context, context_mask, guidance=None,
                      encoder_attention_mask=None, attention_mask=None, **unsupported) -> torch.Tensor:  # fmt: skip
        """``SanaTransformer2DModel.forward`` on ``base``'s own modules, with adapter outputs added after blocks."""
        if unsupported:
            raise ValueError(f"guidance adapters on Sana do not support {', '.join(sorted(unsupported))}.")
        dtype = sample.dtype

        def bias(mask):  # a 0/1 mask of shape (B, M) becomes an additive (B, 1, M) bias, as Sana does
            return (
                (1 - mask.to(dtype)).mul(-10000.0).unsqueeze(1)
                if mask is not None and mask.ndim == 2
                else mask
            )

        attention_mask, encoder_attention_mask = bias(attention_mask), bias(encoder_attention_mask)
        n, _, height, width = sample.shape
        p = base.config.patch_size
        h, w = height // p, width // p
        hidden = base.patch_embed(sample)
        if guidance is not None:
            temb, embedded = base.time_embed(timestep, guidance=guidance, hidden_dtype=hidden.dtype)
        else:
            temb, embedded = base.time_embed(timestep, batch_size=n, hidden_dtype=hidden.dtype)
        prompt = base.caption_projection(encoder_hidden_states).view(n, -1, hidden.shape[-1])
        prompt = base.caption_norm(prompt)
        checkpoint = torch.is_grad_enabled() and base.gradient_checkpointing
        for i, block in enumerate(base.transformer_blocks):
            args = (hidden, attention_mask, prompt, encoder_attention_mask, temb, h, w)
            hidden = base._gradient_checkpointing_func(block, *args) if checkpoint else block(*args)
            key = _site_key(f"transformer_blocks.{i}")
            if key in self.blocks:
                hidden = hidden + self.blocks[key](hidden, context, context_mask)
        hidden = base.proj_out(base.norm_out(hidden, embedded, base.scale_shift_table))
        hidden = hidden.reshape(n, h, w, p, p, -1).permute(0, 5, 1, 3, 2, 4)
        return hidden.reshape(n, -1, h * p, w * p)


def _context_mask(encoder_attention_mask: torch.Tensor | None, context: torch.Tensor) -> torch.Tensor | None:
    """Which context tokens to attend to, from the prompt's mask ((B, M) 0/1 or a (B, 1, M) additive bias)."""
    if encoder_attention_mask is None:
        return None
    m = encoder_attention_mask
    keep = m.flatten(1) > -1 if m.ndim == 3 else m > 0.5
    if keep.shape[1] != context.shape[1] - 2:
        raise ValueError("encoder_attention_mask must have one entry per prompt token.")
    return torch.cat([torch.ones_like(keep[:, :2]), keep], dim=1)


def _per_sample(value, n: int, device, name: str) -> torch.Tensor:
    value = torch.as_tensor(value, device=device)
    if value.ndim == 0:
        return value.expand(n)
    if value.shape != (n,):
        raise ValueError(f"{name} must be a scalar or have one value per sample ({n}), got shape {tuple(value.shape)}.")  # fmt: skip
    return value


class AdapterGuidedModel(nn.Module):
    """A backbone and its guidance adapters as one module: ``model(sample, timestep, guidance_scale=w, **cond)``.

    The form stepdistill's ``Denoiser`` expects (a plain module returning a tensor); ``guidance_scale``
    is an ordinary, required keyword argument. UNets take the Denoiser's arguments natively. For the
    transformers, ``sample``, ``timestep`` and ``cond`` follow the Denoiser's conventions (unpacked
    latents, ``{"encoder_hidden_states", "added_cond_kwargs"}``); the family's call in
    ``stepdistill.backbones`` (Flux packing, timestep scales, PixArt's learned sigma) maps them onto the
    base, so this path needs stepdistill installed. An ``embedded_guidance`` attribute, when set, is
    Flux-dev's embedded guidance.
    """

    def __init__(self, base: nn.Module, adapters: GuidanceAdapters):
        super().__init__()
        self.base, self.adapters = base, adapters

    @property
    def config(self):
        return self.base.config

    def forward(self, sample: torch.Tensor, timestep, *, guidance_scale, **cond) -> torch.Tensor:
        if self.adapters.config.backbone in UNETS:
            return self.adapters(self.base, sample, timestep, guidance_scale, **cond)
        from stepdistill.backbones import backbone_of

        family = backbone_of(self.base)
        t = torch.as_tensor(timestep, device=sample.device)
        guidance = None
        if getattr(self.base.config, "guidance_embeds", False):
            guidance = torch.full(
                (len(sample),), getattr(self, "embedded_guidance", family.embedded_guidance)
            )
        bound = _BoundAdapters(self.base, self.adapters, guidance_scale)
        return family.call(
            bound, sample, t.expand(len(sample)) if t.ndim == 0 else t, cond, guidance=guidance
        )


class _BoundAdapters:
    """``base`` as the Denoiser calls it, run with the adapters at one guidance scale (made per call)."""

    def __init__(self, base: nn.Module, adapters: GuidanceAdapters, guidance_scale):
        self.base, self.adapters, self.guidance_scale = base, adapters, guidance_scale

    @property
    def config(self):
        return self.base.config

    def parameters(self):
        return self.base.parameters()

    def buffers(self):
        return self.base.buffers()

    def __call__(self, hidden_states, *, timestep, encoder_hidden_states, return_dict=True, **kwargs):
        out = self.adapters(self.base, hidden_states, timestep, self.guidance_scale,
                            encoder_hidden_states=encoder_hidden_states, **kwargs)  # fmt: skip
        return (out,)


def parameter_share(adapters: nn.Module, base: nn.Module) -> float:
    """Adapter parameters as a fraction of the base's."""
    return sum(p.numel() for p in adapters.parameters()) / sum(p.numel() for p in base.parameters())
