"""Small helpers shared by the recipes in ``training_scripts/``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .training import NonFiniteLossError, list_checkpoints


def parse_args(*dataclass_types, args: list[str] | None = None) -> tuple:
    """Parse the command line into the given dataclasses (``HfArgumentParser``, ``--help`` shows every field)
    and seed every random generator with the parsed ``seed``."""
    from accelerate.utils import set_seed
    from transformers import HfArgumentParser

    parsed = HfArgumentParser(dataclass_types).parse_args_into_dataclasses(args)
    seeds = [obj.seed for obj in parsed if isinstance(getattr(obj, "seed", None), int)]
    if seeds and not 0 <= seeds[0] < 2**32:
        raise ValueError(f"--seed must lie in [0, 2**32), got {seeds[0]}.")
    # Seed before any model is built: LoRA initialisation, GAN heads and every other draw follow --seed.
    set_seed(seeds[0] if seeds else 0)
    return parsed


def given_on_command_line(option: str, argv: list[str] | None = None) -> bool:
    """Whether ``--option`` (or ``--option=VALUE``) was written on the command line, not left at its default."""
    argv = sys.argv[1:] if argv is None else argv
    return any(a == f"--{option}" or a.startswith(f"--{option}=") for a in argv)


class _ArgumentError(ValueError):
    """An argparse error (bad value type, missing value, unknown choice) as one sentence."""


def _raise_argument_error(parser: argparse.ArgumentParser, message: str) -> None:
    # argparse names each flag with its dash alias ("--max_train_steps/--max-train-steps"): keep the first
    message = re.sub(r"(--[\w]+)(/--[\w-]+)+", r"\1", message)
    if message.endswith("expected one argument"):  # "--learning_rate -1e-4": argparse reads -1e-4 as a flag
        message += " (a value starting with '-' is written --flag=VALUE)"
    raise _ArgumentError(message + ("" if message.endswith(".") else "."))


_UNUSED = "Some specified arguments are not used by the HfArgumentParser: "


def _one_line(error: BaseException) -> str:
    """The error's message as one line: its first non-empty line, unknown flags named as such."""
    text = str(error)
    if text.startswith(_UNUSED):  # HfArgumentParser's unknown flags: "[... ]" list of the leftovers
        leftovers = re.findall(r"'([^']*)'", text[len(_UNUSED) :])
        flags = [a for a in leftovers if a.startswith("-")] or leftovers
        return f"unknown option {' '.join(flags)} (see --help for the options)."
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _close_progress_bars() -> None:
    """Close open tqdm bars so the error line starts on a fresh line instead of after a bar's text."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()) or ()):
        try:
            bar.close()
        except Exception:  # a half-closed bar must not hide the user's error
            pass
    sys.stdout.flush()


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a bad-input error raised inside the block into one line on stderr and exit status 2.

    Bad input is a ``ValueError``, an ``OSError`` (a missing, unreadable or unwritable path, a hub id
    that cannot be reached), a ``NonFiniteLossError``, or an argparse error of ``parse_args`` called
    inside the block (a bad value type or choice: one sentence naming the flag instead of the usage).
    Programming errors (``TypeError``, ``AttributeError``, ...) keep their traceback.
    """
    original = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = _raise_argument_error
    try:
        with warnings.catch_warnings():  # diffusers' hub look-ups warn about an argument they pass themselves
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks", category=UserWarning)
            yield
    except (ValueError, OSError, NonFiniteLossError) as error:
        _close_progress_bars()
        print(f"error: {_one_line(error)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    finally:
        argparse.ArgumentParser.error = original


def check_output_dir(path: str | os.PathLike, option: str = "--output_dir") -> None:
    """Refuse an output folder that is a file, lies inside a file, or cannot be written, before any compute.

    The folder itself is not created: the nearest existing folder above it must accept a new file.
    """
    target = Path(os.path.expanduser(str(path)))
    if target.exists() and not target.is_dir():
        raise ValueError(f"{option} {str(path)!r} is a file, not a folder.")
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{option} {str(path)!r} cannot be created: {str(existing)!r} is a file.")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError:
        where = "" if existing == target else f" (cannot create files in {str(existing)!r})"
        raise ValueError(f"{option} {str(path)!r} is not writable{where}.") from None


# Option rules by field name, for every dataclass a recipe parses (the library's configs check their
# own cross-field rules in their validate methods).
AT_LEAST_ONE = {
    "train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "logging_steps", "lora_rank",
    "student_update_every", "regression_pairs", "regression_solver_steps", "num_ddim_timesteps",
    "num_segments", "export_num_inference_steps", "eval_steps", "layers_per_block", "num_trajectories",
    "trajectories_per_shard", "context_dim", "inner_dim", "heads", "num_fourier_features", "resolution",
    "max_sequence_length",
}  # fmt: skip
NON_NEGATIVE = {
    "max_train_steps", "validation_steps", "lr_warmup_steps", "eval_samples_per_class", "weight_decay",
    "max_grad_norm", "gan_generator_weight", "gan_discriminator_weight", "regression_weight",
    "guidance_scale", "guidance_scale_min", "guidance_scale_max", "export_guidance_scale",
    "fake_score_train_guidance", "fake_score_guidance", "teacher_guidance", "embedded_guidance",
    "checkpoints_total_limit", "seed",
}  # fmt: skip
POSITIVE = {"lora_alpha", "max_train_minutes", "huber_c", "timestep_scaling", "fourier_scale"}
PROBABILITY = {"condition_dropout"}  # [0, 1]
DECAY = {"ema_decay", "student_ema_decay", "target_ema_decay", "adam_beta1"}  # [0, 1)


def _choices() -> dict[str, tuple[str, ...]]:
    from accelerate.utils import LoggerType
    from diffusers.optimization import SchedulerType

    return {
        "report_to": ("none", *(t.value for t in LoggerType)),
        "lr_scheduler": tuple(t.value for t in SchedulerType),
        "prediction_type": ("epsilon", "v_prediction", "sample"),
        "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    }


def check_options(*configs) -> None:
    """One sentence for the first absurd value among the parsed options, before any compute.

    Numbers must be finite; learning rates, ranks, batch sizes and step counts positive; counts and
    weights non-negative; decays in [0, 1); choices among the accepted names; lists not empty.
    """
    choices = _choices()
    for config in configs:
        for f in dataclasses.fields(config):
            name, value = f.name, getattr(config, f.name)
            flag = f"--{name}"
            if isinstance(value, list):
                if not value:
                    raise ValueError(f"{flag} needs at least one value.")
                values = value
            else:
                values = [value]
            for v in values:
                if isinstance(v, bool) or v is None:
                    continue
                if isinstance(v, str):
                    if name in choices and v not in choices[name]:
                        raise ValueError(f"{flag} must be one of {', '.join(choices[name])}, got {v!r}.")
                    continue
                if not isinstance(v, (int, float)):
                    continue
                if not math.isfinite(v):
                    raise ValueError(f"{flag} must be a finite number, got {v}.")
                if (name.endswith("learning_rate") or name in POSITIVE) and v <= 0:
                    raise ValueError(f"{flag} must be > 0, got {v}.")
                if name in AT_LEAST_ONE and v < 1:
                    raise ValueError(f"{flag} must be >= 1, got {v}.")
                if (name in NON_NEGATIVE or f.type in ("list[int]",)) and v < 0:
                    raise ValueError(f"{flag} must be >= 0, got {v}.")
                if name in PROBABILITY and not 0 <= v <= 1:
                    raise ValueError(f"{flag} must lie in [0, 1], got {v}.")
                if name in DECAY and not 0 <= v < 1:
                    raise ValueError(f"{flag} must lie in [0, 1), got {v}.")


def check_recipe_options(*configs, run, student=None) -> None:
    """What every recipe checks right after parsing, before a teacher is loaded.

    ``configs`` are all parsed dataclasses (``check_options``), ``run`` the loop's ``TrainConfig``
    (output folder, checkpoint to resume or export) and ``student`` the options holding
    ``export_only`` / ``push_to_hub`` / ``hub_model_id`` (validated when it has a ``validate``).
    """
    check_options(*configs)
    if student is not None and hasattr(student, "validate"):
        student.validate()
    check_output_dir(run.output_dir)
    for config in configs:  # other folders a recipe writes to
        for name in ("export_dir", "cache_dir"):
            if getattr(config, name, None):
                check_output_dir(getattr(config, name), f"--{name}")
    resume = run.resume_from_checkpoint
    if resume and resume != "latest" and not Path(resume).is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {resume!r} is not a folder.")
    if getattr(student, "export_only", False):
        if not resume:
            raise ValueError(
                "--export_only needs --resume_from_checkpoint (a checkpoint folder or 'latest')."
            )
        if resume == "latest" and not list_checkpoints(run.output_dir):
            raise FileNotFoundError(
                f"--export_only --resume_from_checkpoint latest: no checkpoint in {str(run.output_dir)!r}."
            )
    if getattr(student, "push_to_hub", False):  # the upload comes after all training: check what it needs now
        from huggingface_hub import constants, get_token
        from huggingface_hub.utils import validate_repo_id

        if not student.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id.")
        try:
            validate_repo_id(student.hub_model_id)
        except ValueError:
            raise ValueError(
                f"--hub_model_id {student.hub_model_id!r} is not a hub repository id (name or namespace/name)."
            ) from None
        if constants.HF_HUB_OFFLINE:
            raise ValueError("--push_to_hub needs the Hub, but HF_HUB_OFFLINE is set.")
        if get_token() is None:
            raise ValueError("--push_to_hub needs a Hugging Face token: run `hf auth login` or set HF_TOKEN.")


def teacher_num_train_timesteps(name_or_path: str | os.PathLike, revision: str | None = None) -> int | None:
    """The teacher scheduler's ``num_train_timesteps`` when its config is at hand without loading weights.

    Read from a local pipeline folder or the hub cache, so that options on the timestep axis are
    checked before the teacher loads; ``None`` when it is not at hand (the teacher loader reports).
    """
    name = "scheduler/scheduler_config.json"
    local = Path(os.path.expanduser(str(name_or_path))) / name
    if local.is_file():
        config = local
    else:
        from huggingface_hub import try_to_load_from_cache

        try:
            config = try_to_load_from_cache(str(name_or_path), name, revision=revision)
        except ValueError:  # not a repo id
            return None
        if not isinstance(config, str):
            return None
    try:
        return int(json.loads(Path(config).read_text()).get("num_train_timesteps", 1000))
    except (OSError, ValueError, TypeError, AttributeError):  # unreadable: the teacher loader reports
        return None
