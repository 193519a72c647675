"""Checkpoints of the training loop: safetensors and JSON only, never a pickle, written atomically.

A checkpoint folder ``checkpoint-<step>`` holds ``train_state.safetensors`` (trainable weights, EMA
shadows, optimizer moments, an objective's own state) and ``train_state.json`` (LR-scheduler and
loss-scaler states, the optimizer's hyperparameters, the run's settings, its id, the wall-clock time
spent so far and a save sequence number). Nothing in it can execute code when it is loaded. A sharded
(FSDP2) run of ``N`` processes writes each process's shards: ``train_state.safetensors`` (process 0)
and ``train_state.rank-<r>.safetensors``; all of them are staged and renamed together.

Checkpoints are ordered by their save sequence, not by step: after a resume from an older checkpoint
the newest one written is ``latest`` and rotation removes the oldest written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

import torch

STATE_FILE = "train_state.safetensors"
INFO_FILE = "train_state.json"
PICKLE_SUFFIXES = (".bin", ".pkl", ".pickle", ".pt", ".pth")
_NAME = re.compile(r"checkpoint-(\d+)")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, in one sentence naming it."""


def _info(folder: Path) -> dict:
    path = folder / INFO_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} is unreadable or corrupt ({error}).") from None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest written first (save sequence, then step)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.fullmatch(p.name) and (p / STATE_FILE).exists()]

    def order(path: Path) -> tuple[int, int]:
        try:
            sequence = int(_info(path).get("sequence", -1))
        except CheckpointError:
            sequence = -1
        return sequence, int(_NAME.fullmatch(path.name).group(1))

    return sorted(found, key=order)


def resolve_checkpoint(checkpoint: str, output_dir: str | Path) -> Path:
    """A checkpoint folder from a path or ``"latest"`` (the newest written in ``output_dir``)."""
    if checkpoint == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"no checkpoint in {str(output_dir)!r}.")
        return found[-1]
    return Path(checkpoint)


def state_file(rank: int = 0) -> str:
    """The tensor file of process ``rank`` (only process 0's in an unsharded checkpoint)."""
    return STATE_FILE if rank == 0 else f"train_state.rank-{rank}.safetensors"


def read_tensors(folder: str | Path, rank: int = 0) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint folder, or one sentence naming the missing or corrupt file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(folder) / state_file(rank)
    if not path.exists():
        raise FileNotFoundError(f"{str(folder)!r} is not a checkpoint folder of this loop (no {STATE_FILE}).")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is truncated or corrupt ({error}).") from None


def cached_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """A cache file's tensors and metadata, or ``None`` when it is missing, truncated or corrupt (rebuild it)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        return None


def read_checkpoint(folder: str | Path, rank: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors (process ``rank``'s file) and JSON state of a resumable checkpoint; refuses pickled files."""
    folder = Path(folder)
    pickles = sorted(p.name for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"checkpoint {folder} holds pickled files ({', '.join(pickles)}), which could run code when "
            "loaded; stepdistill checkpoints never contain them, so it is not loaded."
        )
    tensors = read_tensors(folder, rank)
    info = _info(folder)
    if not info:
        raise CheckpointError(f"checkpoint {folder} has no {INFO_FILE}: it cannot be resumed exactly.")
    return tensors, info


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def staging_folder(output_dir: str | Path, step: int, tag: str) -> Path:
    """Where ``checkpoint-<step>`` is assembled before its rename (``tag``: the same on every process)."""
    return Path(output_dir) / f".tmp-checkpoint-{step}-{tag}"


def write_shard(staging: Path, rank: int, tensors: dict[str, torch.Tensor]) -> None:
    """Write process ``rank``'s tensors into a staging folder (the other processes of a sharded save)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(staging / state_file(rank)))


def write_checkpoint(
    output_dir: str | Path,
    step: int,
    tensors: dict[str, torch.Tensor],
    info: dict,
    keep: int | None,
    staging: Path | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically (staging folder, then rename) and keep the ``keep`` newest.

    The caller has checked that ``tensors`` are finite. ``info`` gets the next save sequence number.
    ``staging``: a folder made by :func:`staging_folder` that the other processes of a sharded run
    have already written their shards into.
    """
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    existing = list_checkpoints(root)
    sequence = 1 + max((int(_info(p).get("sequence", -1)) for p in existing), default=0)
    final = root / f"checkpoint-{step}"
    staging = staging or staging_folder(root, step, uuid.uuid4().hex[:8])
    staging.mkdir(exist_ok=True)
    try:
        write_shard(staging, 0, tensors)
        (staging / INFO_FILE).write_text(json.dumps({**info, "sequence": sequence}, indent=1) + "\n")
        if final.exists():  # the same step written again after a resume: park the old one, then swap
            parked = root / f".old-checkpoint-{step}-{uuid.uuid4().hex[:8]}"
            os.replace(final, parked)
            os.replace(staging, final)
            shutil.rmtree(parked, ignore_errors=True)
        else:
            os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if keep:
        for old in [p for p in list_checkpoints(root) if p != final][: max(0, len(existing) + 1 - keep)]:
            shutil.rmtree(old)
    return final


def remove_staging(output_dir: str | Path) -> None:
    """Remove the staging and parked folders a killed run left behind."""
    root = Path(output_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and (
                p.name.startswith(".tmp-checkpoint-") or p.name.startswith(".old-checkpoint-")
            ):
                shutil.rmtree(p, ignore_errors=True)


def optimizer_state(optimizer: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as tensors (``prefix.<param>.<key>``) and its JSON-able parameter groups."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str, saved: dict
) -> None:
    """Restore what :func:`optimizer_state` wrote."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            index, key = name[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(index), {})[key] = value
    for name, value in saved.get("scalars", {}).items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in saved["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def new_run_id() -> str:
    return uuid.uuid4().hex
