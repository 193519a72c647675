import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

# Tiny models: one thread is fastest, and it avoids oversubscribing cores shared with subprocesses.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each test may build its own Accelerator with its own settings."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def tiny_unet2d(num_class_embeds: int | None = 11, seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
        num_class_embeds=num_class_embeds,
    )


def tiny_unet2d_condition(sdxl: bool = False, time_cond_proj_dim: int | None = None, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    extra = {}
    if sdxl:
        extra = dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,
        )
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(4, 8),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=2,
        cross_attention_dim=32,
        attention_head_dim=2,
        time_cond_proj_dim=time_cond_proj_dim,
        **extra,
    )


class TinyMLP(nn.Module):
    """A plain-module denoiser for 2-D points: called as model(x_t, t, class_labels=None)."""

    def __init__(self, dim: int = 2, hidden: int = 64, time_features: int = 8):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0, 4, time_features)))
        self.net = nn.Sequential(
            nn.Linear(dim + 2 * time_features, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, dim),
        )

    def forward(self, x, t, class_labels=None):
        angle = t.float()[:, None] / 1000 * self.freqs
        return self.net(torch.cat([x, angle.sin(), angle.cos()], dim=1))


class GaussianMixtureTeacher(nn.Module):
    """Exact x0-predicting teacher for a 2-D mixture of isotropic Gaussians under a VP schedule.

    E[x0 | x_t] = sum_k r_k(x_t) (mu_k + a std^2 / (a^2 std^2 + s^2) (x_t - a mu_k)), with r_k the
    posterior responsibilities; called as ``model(x_t, t)`` with the schedule's (a_t, s_t).
    """

    def __init__(self, schedule, modes: int = 8, radius: float = 2.0, std: float = 0.05):
        super().__init__()
        angles = torch.arange(modes) * 2 * torch.pi / modes
        self.register_buffer("means", radius * torch.stack([angles.cos(), angles.sin()], 1))
        self.schedule, self.std = schedule, std

    def forward(self, x, t, class_labels=None):
        a, s = self.schedule.alpha_sigma(t)
        a, s = a[:, None, None], s[:, None, None]
        var = a**2 * self.std**2 + s**2
        diff = x[:, None, :] - a * self.means[None]  # (N, K, 2)
        logits = -(diff**2).sum(-1) / (2 * var[..., 0])
        r = logits.softmax(dim=1)[..., None]
        posterior_means = self.means[None] + a * self.std**2 / var * diff
        return (r * posterior_means).sum(1)


def gmm_schedule():
    from diffusers import DDPMScheduler

    from stepdistill.schedules import schedule_from_scheduler

    return schedule_from_scheduler(DDPMScheduler(beta_schedule="scaled_linear", prediction_type="sample"))


def mode_coverage(samples, means):
    """(fraction of samples per mode, median distance to the nearest mode)."""
    d = torch.cdist(samples, means)
    nearest = d.argmin(1)
    share = torch.bincount(nearest, minlength=len(means)).float() / len(samples)
    return share, d.min(1).values.median().item()


def gmm_roles(seed: int = 0, hidden: int = 128):
    """Roles for the 2-D mixture: exact teacher, MLP student and MLP fake score (full, separate modules)."""
    from stepdistill.denoiser import Denoiser
    from stepdistill.roles import FAKE_SCORE, STUDENT, Roles

    schedule = gmm_schedule()
    teacher = GaussianMixtureTeacher(schedule)
    torch.manual_seed(seed)
    student, fake = TinyMLP(hidden=hidden), TinyMLP(hidden=hidden)
    roles = Roles(
        student=Denoiser(student, schedule),
        teacher=Denoiser(teacher, schedule),
        fake_score=Denoiser(fake, schedule),
        trainable={STUDENT: list(student.parameters()), FAKE_SCORE: list(fake.parameters())},
        modules={"student": student, "teacher": teacher, "fake": fake},
    )
    return roles, teacher
