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
- ``UNet2DModel`` (whose blocks forward no keyword arguments to their attention): ``forward`` runs
  the base's own sub-modules in the order of ``UNet2DModel.forward`` and adds an adapter's output to
  the hidden states after every attention-bearing block (down, mid, up). No hook, global or stored
  state is involved, so gradient checkpointing and concurrent calls stay correct.

Other backbones (the flow transformers) are not wired in yet. This file imports only torch and
diffusers: exports copy it into the ``adapters/`` folder of a pipeline, so that
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` loads the adapters without
stepdistill installed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

BACKBONES = ("UNet2DModel", "UNet2DConditionModel")


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

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
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
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
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
                 guidance_adapters=None, guidance_context=None):  # fmt: skip
        extra = {} if temb is None else {"temb": temb}
        out = self.processor(attn, hidden_states, encoder_hidden_states, attention_mask, **extra)
        if self.site is None or guidance_adapters is None:
            return out
        if guidance_context is None:
            raise ValueError("guidance_adapters was passed without guidance_context.")
        return out + guidance_adapters.block(self.site)(hidden_states, guidance_context)


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


def _cross_attention_sites(base: nn.Module) -> tuple[list[str], list[int]]:
    """Cross-attention modules (``attn2``) of a ``UNet2DConditionModel`` and their query widths."""
    sites, channels = [], []
    for name, module in base.named_modules():
        if name.endswith("attn2") and hasattr(module, "processor"):
            sites.append(name)
            channels.append(module.to_q.in_features)
    return sites, channels


class GuidanceAdapters(ModelMixin, ConfigMixin):
    """The guidance adapters of one backbone architecture, as a diffusers model (a pipeline component).

    Build them for a backbone with ``GuidanceAdapters.for_backbone(unet)``; call them as
    ``adapters(unet, sample, timestep, guidance_scale, class_labels=... | encoder_hidden_states=...)``.
    Any checkpoint of the same architecture (the teacher, a fine-tune, a distilled student) can be
    passed as ``unet``.

    Args:
        backbone: ``"UNet2DModel"`` or ``"UNet2DConditionModel"``.
        sites: where the adapters sit (block names for ``UNet2DModel``, attention module names otherwise).
        channels: hidden width at each site.
        num_class_embeds: class-conditional backbones: number of class ids (null class included).
        condition_dim: width of prompt tokens (``cross_attention_dim``) for ``UNet2DConditionModel``.
        context_dim: width of the context tokens.
        inner_dim, heads: width and heads of each adapter's attention.
        num_fourier_features, fourier_scale, seed: the fixed random Fourier features of the guidance scale.
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
        kind = type(base).__name__
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
        else:
            raise ValueError(f"guidance adapters support {' and '.join(BACKBONES)}, not {kind}.")
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
        """Install ``AdapterAttnProcessor``s on ``base``'s attention modules (idempotent; ``UNet2DConditionModel``).

        The processors behave exactly as the originals unless a call passes the adapters and their
        context through ``cross_attention_kwargs``, so the attached base still is the plain base.
        """
        sites = set(self.config.sites)
        for name, module in base.named_modules():
            processor = getattr(module, "processor", None)
            if processor is None or not hasattr(module, "set_processor"):
                continue
            if (
                isinstance(processor, AdapterAttnProcessor)
                or type(processor).__name__ == "AdapterAttnProcessor"
            ):
                continue
            module.set_processor(AdapterAttnProcessor(name if name in sites else None, processor))

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

        ``guidance_scale`` and ``timestep`` are scalars or one value per sample; ``base_kwargs`` go to a
        ``UNet2DConditionModel`` (e.g. ``added_cond_kwargs``). Returns the raw model output tensor.
        """
        if type(base).__name__ != self.config.backbone:
            raise ValueError(f"these adapters were built for a {self.config.backbone}, got a {type(base).__name__}.")  # fmt: skip
        n = sample.shape[0]
        t = _per_sample(timestep, n, sample.device, "timestep")
        w = _per_sample(guidance_scale, n, sample.device, "guidance_scale")
        context = self.context(w, t, class_labels, encoder_hidden_states)
        if self.config.backbone == "UNet2DModel":
            return self._unet2d_forward(base, sample, t, class_labels, context)
        self.attach(base)
        kwargs = dict(base_kwargs.pop("cross_attention_kwargs", None) or {})
        kwargs.update(guidance_adapters=self, guidance_context=context)
        out = base(sample, t, encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=kwargs, **base_kwargs)  # fmt: skip
        return out.sample

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


def _per_sample(value, n: int, device, name: str) -> torch.Tensor:
    value = torch.as_tensor(value, device=device)
    if value.ndim == 0:
        return value.expand(n)
    if value.shape != (n,):
        raise ValueError(f"{name} must be a scalar or have one value per sample ({n}), got shape {tuple(value.shape)}.")  # fmt: skip
    return value


class AdapterGuidedModel(nn.Module):
    """A backbone and its guidance adapters as one module: ``model(sample, timestep, guidance_scale=w, **cond)``.

    The form the denoiser interface expects (a plain module returning a tensor); ``guidance_scale``
    is an ordinary, required keyword argument.
    """

    def __init__(self, base: nn.Module, adapters: GuidanceAdapters):
        super().__init__()
        self.base, self.adapters = base, adapters

    @property
    def config(self):
        return self.base.config

    def forward(self, sample: torch.Tensor, timestep, *, guidance_scale, **cond) -> torch.Tensor:
        return self.adapters(self.base, sample, timestep, guidance_scale, **cond)


def parameter_share(adapters: nn.Module, base: nn.Module) -> float:
    """Adapter parameters as a fraction of the base's."""
    return sum(p.numel() for p in adapters.parameters()) / sum(p.numel() for p in base.parameters())
