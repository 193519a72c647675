"""DeepSpeed ZeRO behind the training loop: one ``deepspeed.initialize`` per phase, on CPU (gloo) and GPU alike.

accelerate's DeepSpeed integration wants one engine per model, while the loop's phases train different
parameters of shared modules; so the loop takes an accelerate DeepSpeed launch over before accelerate
starts (:func:`claim_deepspeed_launch`) and builds its engines itself:

- ZeRO-1/2: each phase's engine wraps all of the objective's modules and flattens only the phase's own
  parameters; its Adam moments (ZeRO-1) and gradients too (ZeRO-2) are sharded over the processes, the
  weights stay whole. LoRA students and fake scores on one shared frozen base work as under DDP.
- ZeRO-3: the weights are partitioned too, which needs every module trained whole by one phase (a full
  student, a full fake score); each phase's engine holds its own modules, and the frozen ones (the teacher)
  are partitioned by an engine without optimizer. Forwards gather weights module by module on every process.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

__all__ = ["claim_deepspeed_launch", "deepspeed_launch_sharding", "DeepSpeedPhases"]

_CLAIMED = "STEPDISTILL_DEEPSPEED_LAUNCH"  # set when an accelerate DeepSpeed launch was taken over


def claim_deepspeed_launch() -> None:
    """Take over an accelerate DeepSpeed launch (``ACCELERATE_USE_DEEPSPEED``) before accelerate reads it.

    accelerate then sets up plain data parallelism (and its process group);
    :func:`deepspeed_launch_sharding` picks the ZeRO stage from the launch's settings.
    """
    if os.environ.pop("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        os.environ[_CLAIMED] = "true"


def deepspeed_launch_sharding() -> str | None:
    """``"zero<stage>"`` for a DeepSpeed launch, ``None`` without one; refuses what the loop cannot run."""
    claim_deepspeed_launch()
    if os.environ.get(_CLAIMED) != "true":
        return None
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    offload = {
        os.environ.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{k}_DEVICE", "none") for k in ("OPTIMIZER", "PARAM")
    }
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if config_file not in ("", "none"):
        zero = json.loads(Path(config_file).read_text()).get("zero_optimization", {})
        stage = str(zero.get("stage", stage))
        offload |= {zero.get(k, {}).get("device", "none") for k in ("offload_optimizer", "offload_param")}
    if offload - {"none", ""}:
        raise ValueError(
            "DeepSpeed offload is not used by the training loop (it needs DeepSpeed's CPU Adam): set "
            "offload_optimizer_device and offload_param_device to none."
        )
    if stage not in ("1", "2", "3"):
        raise ValueError(f"DeepSpeed zero_stage must be 1, 2 or 3 for the training loop, got {stage}.")
    return f"zero{stage}"


def _config(stage: int, size: int, accumulation: int, max_grad_norm: float) -> dict:
    bucket = min(500_000_000, max(size, 1 << 20))  # no larger than the phase: small runs stay small
    return {
        "train_micro_batch_size_per_gpu": 1,  # the loop draws its batches itself
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": {
            "stage": stage,
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
            # CPU has no side streams to overlap on, and ZeRO-3's default overlap raced here:
            # now and then non-finite weights after two steps (DeepSpeed issues 2867, 4298)
            **({} if torch.cuda.is_available() else {"overlap_comm": False}),
        },
        "zero_allow_untested_optimizer": True,  # torch's AdamW, on a flat shard of the phase
        "steps_per_print": 1 << 30,
    }


def _container(modules: list[nn.Module]) -> nn.Module:
    return modules[0] if len(modules) == 1 else nn.ModuleList(modules)


class DeepSpeedPhases:
    """The DeepSpeed engines of one training run, one per phase (ZeRO-3: and one for the frozen modules)."""

    def __init__(self, stage: int, accumulation_steps: int, max_grad_norm: float):
        self.stage, self.accumulation, self.max_grad_norm = stage, accumulation_steps, max_grad_norm
        self.engines: dict[str, nn.Module] = {}
        self.frozen: nn.Module | None = None  # ZeRO-3: the engine partitioning the frozen modules
        self._ema_params: dict[int, list[nn.Parameter]] = {}  # ZeRO-3: id(EMA) -> the parameters it follows

    def prepare(self, roots: list[nn.Module], phase_forward, phases, optimizers: dict, emas: dict) -> None:
        """Build the engines; ``phase_forward(name)`` is a module whose forward is that phase's loss."""
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        owned = self._modules_by_phase(roots, phases) if self.stage == 3 else {}
        for ph in phases:
            trainable = [p.requires_grad for p in ph.parameters]
            for p in ph.parameters:  # DeepSpeed flattens and hooks the parameters that require grad
                p.requires_grad_(True)
            model = _container(owned[ph.name]) if self.stage == 3 else phase_forward(ph.name)
            config = _config(
                self.stage, sum(p.numel() for p in ph.parameters), self.accumulation, self.max_grad_norm
            )
            self.engines[ph.name], *_ = deepspeed.initialize(
                model=model, optimizer=optimizers[ph.name], config=config, dist_init_required=False
            )
            for p, flag in zip(ph.parameters, trainable):
                p.requires_grad_(flag)
        if owned.get(None):
            config = _config(3, 1 << 20, 1, 0.0)
            self.frozen, *_ = deepspeed.initialize(
                model=_container(owned[None]), config=config, dist_init_required=False
            )
        if self.stage == 3:  # an EMA follows this process's partition of each weight
            for ema in emas.values():
                self._ema_params[id(ema)] = list(ema.params)
                ema.params = [p.ds_tensor for p in ema.params]
                ema.shadow = [t.detach().float().clone() for t in ema.params]

    @staticmethod
    def _modules_by_phase(roots: list[nn.Module], phases) -> dict[str | None, list[nn.Module]]:
        """ZeRO-3: each module with the phase that trains all of it (``None``: frozen); refuses shared ones."""
        owner = {id(p): ph.name for ph in phases for p in ph.parameters}
        owned: dict[str | None, list[nn.Module]] = {}
        for root in roots:
            params = list(root.parameters())
            names = {owner.get(id(p)) for p in params}
            if not params:
                continue
            if len(names) > 1:
                trained = " and ".join(sorted(n for n in names if n))
                raise ValueError(
                    f"DeepSpeed ZeRO-3 partitions each module for one engine, and a {type(root).__name__} here "
                    f"holds the parameters of {trained}{' beside frozen ones' if None in names else ''} (LoRA "
                    "adapters on a shared base): train full modules (--full), or use --sharding zero2 or fsdp2."
                )
            owned.setdefault(names.pop(), []).append(root)
        return owned

    def backward(self, phase: str, loss: torch.Tensor) -> None:
        engine = self.engines[phase]
        engine.backward(loss)  # scaled by 1 / accumulation steps inside
        engine.step()  # clips and steps the optimizer on the last micro-step only

    @contextmanager
    def optimizers_whole(self) -> Iterator[None]:
        """ZeRO-3 lends each optimizer its float32 shard only while stepping: put it back for a state dict."""
        zero3 = [e.optimizer for e in self.engines.values()] if self.stage == 3 else []
        for optimizer in zero3:
            optimizer._set_fp32_optimizer_param_groups()
        try:
            yield
        finally:
            for optimizer in zero3:
                optimizer._clear_fp32_optimizer_param_groups()

    def after_load(self) -> None:
        """DeepSpeed keeps its own float32 copy of each shard: refresh it from weights loaded in place."""
        for engine in self.engines.values():
            engine.optimizer.refresh_fp32_params()

    def gather(self, emas: dict) -> dict[int, nn.Parameter]:
        """ZeRO-3: plain modules with full weights again (hooks removed), EMA shadows whole; returns
        ``{id(old parameter): new parameter}``."""
        if self.stage != 3:
            return {}
        import deepspeed

        engines = [*self.engines.values(), *([self.frozen] if self.frozen is not None else [])]
        renamed: dict[int, nn.Parameter] = {}
        for engine in engines:
            named = list(engine.module.named_parameters())
            with deepspeed.zero.GatheredParameters([p for _, p in named]):
                full = [p.data.detach().clone() for _, p in named]
            engine.destroy()  # removes its module hooks
            for (name, old), tensor in zip(named, full):
                owner_name, _, attr = name.rpartition(".")
                new = nn.Parameter(tensor, requires_grad=old.requires_grad)
                engine.module.get_submodule(owner_name)._parameters[attr] = new
                renamed[id(old)] = new
        for ema in emas.values():
            params = self._ema_params.pop(id(ema), None)
            if params is None:
                continue
            ema.shadow = [_whole(s, p) for s, p in zip(ema.shadow, params)]
            ema.params = [renamed[id(p)] for p in params]
        self.engines, self.frozen = {}, None
        return renamed


def _whole(partition: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
    """All processes' partitions of a ZeRO-3 parameter's tensor, joined into its full shape."""
    import torch.distributed as dist

    parts = [torch.empty_like(partition) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, partition.contiguous())
    return torch.cat(parts)[: param.ds_numel].view(param.ds_shape)
