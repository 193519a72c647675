import pytest
import torch
from conftest import TinyMLP
from diffusers import DDPMScheduler
from torch import nn

from stepdistill.denoiser import Denoiser
from stepdistill.objectives.denoising import DenoisingConfig, DenoisingObjective
from stepdistill.schedules import schedule_from_scheduler
from stepdistill.training import NonFiniteLossError, Phase, TrainConfig, list_checkpoints, train


class Points(torch.utils.data.Dataset):
    def __init__(self, n=256):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 2, generator=g) * 0.1 + torch.tensor([1.0, -1.0])

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i]}


def denoising_run(
    output_dir,
    steps,
    seed_model=0,
    crash_at=None,
    lr=1e-2,
    blow_up_at=None,
    lr_scheduler="cosine",
    ema_decay=0.9,
    **overrides,
):
    torch.manual_seed(seed_model)
    model = TinyMLP()
    schedule = schedule_from_scheduler(DDPMScheduler(prediction_type="v_prediction"))
    objective = DenoisingObjective(
        Denoiser(model, schedule),
        list(model.parameters()),
        DenoisingConfig(learning_rate=lr, lr_warmup_steps=2, lr_scheduler=lr_scheduler, ema_decay=ema_decay),
    )
    if crash_at is not None:  # simulate a killed process: the objective dies at step crash_at
        loss = objective.loss
        objective.loss = lambda phase, batch, step: loss(phase, batch, step) if step < crash_at else 1 / 0
    if blow_up_at is not None:  # a divergent update: the weights turn infinite after step blow_up_at

        def after_update(phase, step):
            if step == blow_up_at:
                with torch.no_grad():
                    next(model.parameters()).mul_(float("inf"))

        objective.after_update = after_update
    options = dict(
        output_dir=str(output_dir), max_train_steps=steps, train_batch_size=16, checkpointing_steps=3
    )
    config = TrainConfig(report_to="none", **{**options, **overrides})
    result = train(objective, config, Points())
    return model, result


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    model_a, result_a = denoising_run(tmp_path / "a", 7)
    with pytest.raises(ZeroDivisionError):
        denoising_run(tmp_path / "b", 7, crash_at=5)
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["checkpoint-3"]
    # a differently initialised model: everything must come from the checkpoint
    model_b, result_b = denoising_run(tmp_path / "b", 7, seed_model=123, resume_from_checkpoint="latest")
    assert result_b.step == 7
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)
    for sa, sb in zip(result_a.emas["model"].shadow, result_b.emas["model"].shadow):
        assert torch.equal(sa, sb)
    assert result_a.last_losses == result_b.last_losses


def test_training_reduces_the_loss_and_moves_parameters(tmp_path):
    torch.manual_seed(0)
    before = [p.detach().clone() for p in TinyMLP().parameters()]
    model, result = denoising_run(tmp_path, 40, checkpointing_steps=100)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert result.last_losses["model"] < 1.0


def test_checkpoints_are_pruned_to_the_limit(tmp_path):
    denoising_run(tmp_path, 5, checkpointing_steps=1, checkpoints_total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-5"]
    assert not list(tmp_path.glob(".tmp-*"))


class TwoPhases:
    """Phase 'a' every step, phase 'b' every second step; each loss pulls its own scalar to 1."""

    def __init__(self, nan_at: int | None = None):
        self.a, self.b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
        self.modules = {"m": nn.ParameterList([self.a, self.b])}
        self.calls, self.nan_at = [], nan_at

    def phases(self):
        return [Phase("a", [self.a], 0.1), Phase("b", [self.b], 0.1, every=2)]

    def loss(self, phase, batch, step):
        self.calls.append((step, phase))
        p = self.a if phase == "a" else self.b
        loss = (p - 1).pow(2).sum() + 0 * (self.b if phase == "a" else self.a).sum()
        if step == self.nan_at:
            loss = loss * float("nan")
        return loss, {}


def test_phases_run_at_their_intervals_and_step_only_their_optimizer(tmp_path):
    obj = TwoPhases()
    config = TrainConfig(
        output_dir=str(tmp_path), max_train_steps=5, report_to="none", checkpointing_steps=10
    )
    b_values = []
    original_loss = obj.loss

    def spy(phase, batch, step):
        b_values.append((step, phase, obj.b.item()))
        return original_loss(phase, batch, step)

    obj.loss = spy
    train(obj, config, None)
    assert obj.calls == [(0, "a"), (0, "b"), (1, "a"), (2, "a"), (2, "b"), (3, "a"), (4, "a"), (4, "b")]
    # 'b' moves only when its own phase ran: equal before phase 'a' of steps 1 and 2
    b_at = {(s, ph): v for s, ph, v in b_values}
    assert b_at[(1, "a")] == b_at[(2, "a")] != b_at[(0, "a")]


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path):
    obj = TwoPhases(nan_at=3)
    config = TrainConfig(output_dir=str(tmp_path), max_train_steps=6, report_to="none", checkpointing_steps=2)
    with pytest.raises(NonFiniteLossError, match=r"'a' loss became non-finite at step 3.*checkpoint-2"):
        train(obj, config, None)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]
    assert (tmp_path / "checkpoint-2" / "train_state.safetensors").exists()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"mixed_precision": "fp8"}, "mixed_precision must be"),
        ({"resume_from_checkpoint": "/no/such/checkpoint"}, "is not a checkpoint folder"),
        ({"checkpointing_steps": 0}, "checkpointing_steps must be"),
        ({"max_train_minutes": 0}, "max_train_minutes must be"),
        ({"max_train_minutes": float("nan")}, "max_train_minutes must be"),
        ({"max_grad_norm": float("inf")}, "max_grad_norm must be"),
        ({"logging_steps": 0}, "logging_steps must be"),
        ({"seed": -1}, "seed must lie"),
    ],
)
def test_bad_loop_options_fail_before_compute(tmp_path, options, message):
    obj = TwoPhases()
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train(obj, TrainConfig(output_dir=str(tmp_path), report_to="none", **options), None)
    assert obj.calls == [] and not list(tmp_path.iterdir())


def test_every_registered_objective_resolves_and_unknown_names_are_refused():
    from stepdistill.objectives import OBJECTIVES, get_objective

    for name in OBJECTIVES:
        config_cls, objective_cls = get_objective(name)
        assert callable(config_cls) and hasattr(objective_cls, "phases") and hasattr(objective_cls, "loss")
    with pytest.raises(ValueError, match="unknown objective 'lcm'; choose one of"):
        get_objective("lcm")


def test_a_spent_wall_clock_budget_stops_the_loop_with_a_checkpoint(tmp_path):
    _, result = denoising_run(tmp_path, 50, checkpointing_steps=100, max_train_minutes=1e-9)
    assert result.step == 1  # the budget is checked after every step
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1"]
    _, resumed = denoising_run(tmp_path, 3, resume_from_checkpoint="latest")  # and the run continues from it
    assert resumed.step == 3


def test_a_phase_that_skips_the_logging_steps_is_still_logged(tmp_path):
    """Phase 'b' runs at even steps only, the loop logs after odd ones: its latest loss must still be logged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = TrainConfig(output_dir=str(tmp_path), max_train_steps=6, report_to="tensorboard", logging_steps=2,
                         checkpointing_steps=10)  # fmt: skip
    train(TwoPhases(), config, None)
    events = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"a/loss", "b/loss", "b/lr"} <= set(tags)
    b_losses = [e.value for e in events.Scalars("b/loss")]
    assert [e.step for e in events.Scalars("b/loss")] == [2, 4, 6]
    assert b_losses[0] > b_losses[1] > b_losses[2]  # each log is b's loss after its latest update
