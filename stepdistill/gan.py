"""Adversarial pieces shared by the objectives: discriminator heads on a denoiser's features, GAN losses,
and the f-divergence weights read from a discriminator.

DMD2 (Yin et al. 2024b, Sec. 4.3) puts a small classifier on the bottleneck features of the fake score
and trains it with a non-saturating GAN loss; LADD-style and f-distill objectives reuse the same parts.
Everything here is training maths on tensors and modules: no sampling, no export.

- ``gan_feature_block(model)``: the block whose output the head reads (a UNet's mid-block, a
  transformer's middle block); ``captured_output`` records that output while the denoiser runs.
- ``gan_head(model)``: a ``BottleneckHead`` (UNet) or ``TokenHead`` (transformer) sized for ``model``.
- ``discriminator_logits(head, denoiser, x_t, t, cond)``: one logit per sample of noised inputs.
- ``gan_generator_loss`` / ``gan_discriminator_loss``: DMD2 eq. 4 and 5.
- ``f_divergence_weights``: f-distill's per-sample weights from the discriminator's density ratio.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from .backbones import backbone_of
from .conditions import Condition
from .denoiser import Denoiser

F_DIVERGENCES = ("reverse_kl", "forward_kl", "jensen_shannon")


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss ``softplus(-D(x_fake))`` per sample (DMD2 eq. 4)."""
    return F.softplus(-fake_logits).flatten()


def gan_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """``softplus(D(x_fake)) + softplus(-D(x_real))`` (DMD2 eq. 5), mean over the batch."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def f_divergence_weights(
    logits: torch.Tensor, divergence: str = "reverse_kl", max_logit: float = 5.0
) -> torch.Tensor:
    """Per-sample weights ``h(r) = f''(r) r^2`` of the DMD gradient (f-distill, Xu et al. 2025, eq. 9), normalised
    to mean 1 over the batch.

    ``r = p_teacher / p_student`` at a sample is estimated by the GAN discriminator as ``exp(logit)`` (the
    logit of a logistic real/fake classifier is the log density ratio), clipped to ``|logit| <= max_logit``.
    Reverse KL (``f = -log r``) gives ``h = 1``: plain, mode-seeking DMD. Forward KL (``f = r log r``) gives
    ``h = r`` and Jensen-Shannon ``h = r / (r + 1)``: both weigh up samples where the student has too little
    mass, which covers modes.
    """
    if divergence not in F_DIVERGENCES:
        raise ValueError(f"f_divergence must be one of {', '.join(F_DIVERGENCES)}, got {divergence!r}.")
    r = logits.detach().float().flatten().clamp(-max_logit, max_logit).exp()
    h = {"reverse_kl": torch.ones_like(r), "forward_kl": r, "jensen_shannon": r / (r + 1)}[divergence]
    return h / h.mean()


class BottleneckHead(nn.Module):
    """A small classifier on a UNet fake score's bottleneck (mid-block) features: one logit per sample."""

    def __init__(self, channels: int):
        super().__init__()
        groups = 8 if channels % 8 == 0 else 1
        self.net = nn.Sequential(
            nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 1),
        )  # fmt: skip

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.float())


class TokenHead(nn.Module):
    """A small classifier on a transformer block's token features: norm, mean over tokens, MLP, one logit."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(tokens.float()).mean(dim=1))


def gan_feature_block(model: nn.Module) -> nn.Module:
    """The block whose output feeds the GAN head, as ``model``'s backbone family places it (a UNet's
    mid-block, a transformer's middle block)."""
    return backbone_of(model).gan_features(model).block


def gan_head(model: nn.Module) -> nn.Module:
    """``BottleneckHead`` on spatial features (a UNet's mid-block), ``TokenHead`` on token features."""
    site = backbone_of(model).gan_features(model)
    return BottleneckHead(site.width) if site.layout == "spatial" else TokenHead(site.width)


def _features(out):
    """A block's image features: a UNet block's output, or the image-token stream (last item) of a
    joint transformer block's ``(encoder_hidden_states, hidden_states)``."""
    if not isinstance(out, tuple):
        return out
    return out[0] if len(out) == 1 else out[-1]


@contextmanager
def captured_output(module: nn.Module, store: list):
    """Append ``module``'s forward output (its image features) to ``store`` while the block runs."""
    handle = module.register_forward_hook(lambda mod, args, out: store.append(_features(out)))
    try:
        yield store
    finally:
        handle.remove()


def discriminator_logits(
    head: nn.Module, denoiser: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: Condition
) -> torch.Tensor:
    """The head's logits of noised samples ``x_t``: ``denoiser`` runs once on ``(x_t, t, cond)`` and the head
    reads the output of its ``gan_feature_block`` (the denoiser's own prediction is discarded).

    Gradients reach the head, the denoiser's trainable weights and ``x_t`` as the caller's context allows.
    """
    with captured_output(gan_feature_block(denoiser.model), []) as feats:
        denoiser(x_t, t, cond)
    return head(feats[-1])
