"""The training loop's distributed engines: DDP prepared by accelerate, FSDP2 through torch's ``fully_shard``,
DeepSpeed ZeRO-1/2 through ``deepspeed.initialize``.

One code path serves every world: a single process, ``N`` data-parallel processes (accelerate's DDP
wrapper; gradients are all-reduced in buckets during backward and skipped on accumulation micro-steps),
or ``N`` processes sharding parameters, gradients and optimizer state (FSDP2: every module of the
objective, the frozen teacher included, is sharded block by block). accelerate's own FSDP plugin does
not run on CPU, so FSDP2 is applied with torch's API on CPU (gloo) and GPU (NCCL) alike, whether it was
asked for by an accelerate FSDP config (``fsdp_version: 2``) or by ``--sharding fsdp2``.

DeepSpeed: accelerate's integration wants one engine per model, while the loop's phases train different
parameters of shared modules, so the loop takes an accelerate DeepSpeed launch over
(:func:`claim_deepspeed_launch`, before accelerate sees it) and builds one DeepSpeed engine per phase
itself, on CPU (gloo) and GPU alike: ZeRO-1 shards the Adam moments, ZeRO-2 the gradients too. ZeRO-3
partitions every parameter of the module an engine is given, and the phases' engines share modules (the
frozen teacher, a LoRA base): it is refused, FSDP2 shards like it.

Each phase of an objective gets its own DDP wrapper around all of the objective's modules that reduces
only that phase's parameters (the other phases' and the frozen ones are ignored), so a LoRA student and
a LoRA fake score on one shared frozen base keep separate optimizers and separate gradient reductions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "SHARDING", "TrainingEngine", "claim_deepspeed_launch", "local_tensor", "resolve_sharding",
    "shard_optimizer_state",
]  # fmt: skip

SHARDING = ("auto", "none", "fsdp2", "zero1", "zero2")
_CLAIMED = "STEPDISTILL_DEEPSPEED_LAUNCH"  # set when an accelerate DeepSpeed launch was taken over


def claim_deepspeed_launch() -> None:
    """Take over an accelerate DeepSpeed launch (``ACCELERATE_USE_DEEPSPEED``) before accelerate reads it.

    accelerate then sets up plain data parallelism (and its process group); :func:`resolve_sharding`
    picks the ZeRO stage from the launch's settings and the loop builds its own DeepSpeed engines.
    """
    if os.environ.pop("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        os.environ[_CLAIMED] = "true"


def _deepspeed_launch_sharding() -> str | None:
    """``"zero1"``/``"zero2"`` for a DeepSpeed launch, ``None`` without one; refuses what the loop cannot run."""
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
    if stage == "3":
        raise ValueError(
            "DeepSpeed ZeRO-3 partitions every parameter of the module an engine is given, and the training "
            "phases share modules (the frozen teacher, a LoRA base) across their engines: launch with ZeRO-1/2, "
            "or shard with FSDP2 (fsdp_reshard_after_forward: true shards like ZeRO-3)."
        )
    if offload - {"none", ""}:
        raise ValueError(
            "DeepSpeed offload is not used by the training loop (it needs DeepSpeed's CPU Adam): set "
            "offload_optimizer_device and offload_param_device to none, or shard with FSDP2."
        )
    if stage not in ("1", "2"):
        raise ValueError(f"DeepSpeed zero_stage must be 1 or 2 for the training loop, got {stage}.")
    return f"zero{stage}"


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this process holds (its shard for a sharded DTensor, else the tensor)."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After loading local shards into an optimizer's state, make the moments of sharded parameters sharded too."""
    from torch.distributed.tensor import DTensor

    for group in optimizer.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor):
                continue
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and not isinstance(value, DTensor) and value.ndim > 0:
                    optimizer.state[p][key] = DTensor.from_local(
                        value.to(p.device), p.device_mesh, p.placements, run_check=False,
                        shape=p.shape, stride=p.stride(),
                    )  # fmt: skip


def resolve_sharding(requested: str, accelerator) -> str:
    """One of :data:`SHARDING` but ``"auto"``, which follows the launcher (an accelerate FSDP config asks
    for FSDP2, a DeepSpeed config for its ZeRO stage)."""
    if requested not in SHARDING:
        raise ValueError(f"sharding must be one of {', '.join(SHARDING)}, got {requested!r}.")
    if requested != "auto":
        return requested
    deepspeed = _deepspeed_launch_sharding()
    if deepspeed:
        return deepspeed
    launcher_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
    fsdp = accelerator.distributed_type.value == "FSDP" or launcher_fsdp
    if fsdp and os.environ.get("FSDP_VERSION", "2") != "2":
        raise ValueError(
            "the training loop shards with FSDP2 only: set fsdp_version: 2 in the accelerate config."
        )
    return "fsdp2" if fsdp else "none"


class _PhaseForward(nn.Module):
    """All of an objective's modules, whose forward is one phase's loss (what DDP wraps)."""

    def __init__(self, objective, phase: str):
        super().__init__()
        self.parts = nn.ModuleList(_unique_roots(objective.modules.values()))
        self.objective, self.phase = objective, phase

    def forward(self, batch: dict, step: int):
        return self.objective.loss(self.phase, batch, step)


def _unique_roots(modules) -> list[nn.Module]:
    """The distinct modules, without those that are submodules of another one in the list."""
    distinct = list({id(m): m for m in modules}.values())
    inner = {id(sub) for m in distinct for sub in list(m.modules())[1:]}
    return [m for m in distinct if id(m) not in inner]


def _blocks(module: nn.Module) -> list[nn.Module]:
    """The outermost elements of the module lists under ``module`` (UNet down/up blocks, transformer blocks)."""
    found = []
    for child in module.children():
        if isinstance(child, nn.ModuleList):
            found += [b for b in child if any(True for _ in b.parameters())]
        else:
            found += _blocks(child)
    return found


class TrainingEngine:
    """How the loop's modules are wrapped, run and reduced for one world (see the module docstring)."""

    def __init__(self, accelerator, sharding: str = "auto", reshard_after_forward: bool | None = None,
                 max_grad_norm: float = 0.0, accumulation_steps: int = 1):  # fmt: skip
        self.accelerator, self.max_grad_norm, self.accumulation_steps = (
            accelerator,
            max_grad_norm,
            accumulation_steps,
        )
        self.sharding = resolve_sharding(sharding, accelerator)
        if reshard_after_forward is None:  # accelerate's FSDP config: false is ZeRO-2-like, true ZeRO-3-like
            reshard_after_forward = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
        self.reshard_after_forward = reshard_after_forward
        self.wrapped: dict[str, nn.Module] = {}  # DDP wrappers, by phase
        self.deepspeed: dict[str, nn.Module] = {}  # DeepSpeed engines, by phase
        self.sharded_roots: list[nn.Module] = []
        self._renamed: dict[int, nn.Parameter] = {}  # id(parameter before sharding) -> sharded parameter

    @property
    def name(self) -> str:
        if self.sharding == "fsdp2":
            return "FSDP2"
        if self.zero_stage:
            return f"DeepSpeed ZeRO-{self.zero_stage}"
        return "DDP" if self.accelerator.num_processes > 1 else "single process"

    @property
    def zero_stage(self) -> int:
        """The DeepSpeed ZeRO stage (0: not DeepSpeed)."""
        return int(self.sharding[4:]) if self.sharding.startswith("zero") else 0

    def check(self, mixed_precision: str) -> None:
        """Refuse, in one sentence and before any compute, a world this engine cannot serve."""
        if self.sharding == "none":
            return
        if not torch.distributed.is_initialized():  # a world of one needs a process group too
            raise ValueError(f"sharding {self.sharding} needs a launcher (torchrun or accelerate launch).")
        if not self.zero_stage:
            return
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ValueError(f"sharding {self.sharding} needs DeepSpeed: pip install deepspeed.") from None
        if mixed_precision == "fp16":
            raise ValueError(
                "the DeepSpeed engine trains float32 weights under autocast: use --mixed_precision bf16 or no."
            )

    def shard(self, objective) -> None:
        """FSDP2: shard every module of ``objective`` in place (blocks, then roots); before phases are built."""
        if self.sharding != "fsdp2":
            return
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if getattr(objective, "sharding_refused", None):
            raise ValueError(objective.sharding_refused)
        mesh = init_device_mesh(self.accelerator.device.type, (self.accelerator.num_processes,))
        for root in _unique_roots(objective.modules.values()):
            if not any(True for _ in root.parameters()):
                continue
            before = dict(root.named_parameters())
            for block in _blocks(root):
                fully_shard(block, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
            # a root keeps its own (small) group gathered from forward to backward: objectives read features
            # of inner modules (the GAN head on the bottleneck), whose backward bypasses the root's output
            fully_shard(root, mesh=mesh, reshard_after_forward=False)
            after = dict(root.named_parameters())
            self._renamed.update({id(p): after[name] for name, p in before.items()})
            self.sharded_roots.append(root)

    def reshard(self) -> None:
        """FSDP2: put every module back in its sharded state, so the next forward gathers current weights.

        A root stays gathered after a forward (see :meth:`shard`); one gathered before an optimizer step
        of its parameters (a no-grad forward of another phase) would otherwise be reused stale.
        """
        from torch.distributed.fsdp import FSDPModule

        for root in self.sharded_roots:
            for module in root.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()

    def remap(self, phases) -> None:
        """Point phases built from references taken before :meth:`shard` at the sharded parameters."""
        for ph in phases:
            ph.parameters[:] = [self._renamed.get(id(p), p) for p in ph.parameters]

    def prepare(self, objective, phases, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        """One wrapper per phase, reducing only that phase's parameters: accelerate-prepared DDP, or a
        DeepSpeed engine around the phase's own optimizer (every process starts from the main one's weights)."""
        if self.zero_stage:
            self._prepare_deepspeed(objective, phases, optimizers)
            return
        if self.sharding == "fsdp2" or self.accelerator.num_processes == 1:
            return
        for ph in phases:
            module = _PhaseForward(objective, ph.name)
            own = {id(p) for p in ph.parameters}
            ignored = [n for n, p in module.named_parameters() if id(p) not in own]
            module._ddp_params_and_buffers_to_ignore = ignored + [n for n, _ in module.named_buffers()]
            self.wrapped[ph.name] = self.accelerator.prepare_model(module, device_placement=False)

    def _prepare_deepspeed(self, objective, phases, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        import logging

        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        for ph in phases:
            size = sum(p.numel() for p in ph.parameters)
            config = {
                "train_micro_batch_size_per_gpu": 1,  # the loop draws its batches itself
                "gradient_accumulation_steps": self.accumulation_steps,
                "gradient_clipping": self.max_grad_norm,
                "zero_optimization": {
                    "stage": self.zero_stage,  # buckets no larger than the phase: small runs stay small
                    "reduce_bucket_size": min(500_000_000, max(size, 1 << 20)),
                    "allgather_bucket_size": min(500_000_000, max(size, 1 << 20)),
                },
                "zero_allow_untested_optimizer": True,  # torch's AdamW, on a flat shard of the phase
                "steps_per_print": 1 << 30,
            }
            trainable = [p.requires_grad for p in ph.parameters]
            for p in ph.parameters:  # DeepSpeed flattens and hooks the parameters that require grad
                p.requires_grad_(True)
            self.deepspeed[ph.name], *_ = deepspeed.initialize(
                model=_PhaseForward(objective, ph.name), optimizer=optimizers[ph.name], config=config,
                dist_init_required=False,
            )  # fmt: skip
            for p, flag in zip(ph.parameters, trainable):
                p.requires_grad_(flag)

    def loss(self, objective, phase: str, batch: dict, step: int):
        wrapper = self.wrapped.get(phase) or self.deepspeed.get(phase)
        return wrapper(batch, step) if wrapper is not None else objective.loss(phase, batch, step)

    def backward(self, phase: str, loss: torch.Tensor, micro_steps: int) -> None:
        """Backward of one micro-step's loss; DeepSpeed also steps at the accumulation boundary."""
        engine = self.deepspeed.get(phase)
        if engine is None:
            self.accelerator.backward(loss / micro_steps)
            return
        engine.backward(loss)  # scaled by 1 / accumulation steps inside
        engine.step()  # clips and steps the optimizer on the last micro-step only

    def update(self, phase: str, parameters: list[nn.Parameter], optimizer) -> None:
        """Clip and step one phase's optimizer after its last micro-step (DeepSpeed did both already)."""
        if phase in self.deepspeed:
            return
        if self.max_grad_norm > 0:
            if self.accelerator.scaler is not None:
                self.accelerator.scaler.unscale_(optimizer.optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, self.max_grad_norm)
        optimizer.step()

    def after_load(self) -> None:
        """DeepSpeed keeps its own float32 copy of each shard: refresh it from weights loaded in place."""
        for engine in self.deepspeed.values():
            engine.optimizer.refresh_fp32_params()

    @contextmanager
    def accumulating(self, phase: str, last_micro_step: bool) -> Iterator[None]:
        """Skip the gradient reduction on every micro-step but the last of an update."""
        if last_micro_step or self.zero_stage:  # DeepSpeed reduces into its gradient shards every micro-step
            yield
            return
        if self.sharding == "fsdp2":
            for root in self.sharded_roots:
                root.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                for root in self.sharded_roots:
                    root.set_requires_gradient_sync(True)
            return
        wrapper = self.wrapped.get(phase)
        with wrapper.no_sync() if wrapper is not None else nullcontext():
            yield

    def release(self) -> None:
        """Drop the DDP wrappers while every process is still alive (a wrapper destroyed after another
        process has exited can block), then wait for all processes."""
        if not self.wrapped:
            return
        import gc

        prepared = {id(w) for w in self.wrapped.values()}
        self.accelerator._models[:] = [m for m in self.accelerator._models if id(m) not in prepared]
        self.wrapped.clear()
        gc.collect()
        self.accelerator.wait_for_everyone()

    def gather(self, phases, emas) -> None:
        """FSDP2: turn every sharded module back into a plain one holding full weights (for export).

        Phase parameter lists and EMA shadows are updated in place, so what a recipe exports after
        training is exactly what an unsharded run of the same weights would export.
        """
        if not self.sharded_roots:
            return
        from torch.distributed.tensor import DTensor

        renamed: dict[int, nn.Parameter] = {}
        for root in self.sharded_roots:
            renamed.update(_unshard_in_place(root))
        self.sharded_roots = []
        self._renamed = renamed
        self.remap(phases)
        for ema in emas.values():
            ema.params = [renamed.get(id(p), p) for p in ema.params]
            ema.shadow = [s.full_tensor() if isinstance(s, DTensor) else s for s in ema.shadow]


def _unshard_in_place(root: nn.Module) -> dict[int, nn.Parameter]:
    """Undo ``fully_shard`` on ``root`` and its blocks: full plain parameters, the original classes, no hooks.

    Returns ``{id(old sharded parameter): new full parameter}``.
    """
    from torch.distributed._composable.contract import REGISTRY_KEY, STATE_KEY
    from torch.distributed._composable_state import _module_state_mapping
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor

    for (
        module
    ) in root.modules():  # a root kept gathered after a forward registers its sharded parameters again
        if isinstance(module, FSDPModule):
            module.reshard()
    full = {}
    for name, p in root.named_parameters():  # the same order on every process: collectives line up
        full[name] = (p, p.full_tensor() if isinstance(p, DTensor) else p.detach())
    for module in list(root.modules()):
        if not isinstance(module, FSDPModule):
            continue
        state = fully_shard.state(module)
        handles = (state._pre_forward_hook_handle, state._post_forward_hook_handle)
        for handle in {id(h): h for h in handles}.values():
            handle.remove()
        _module_state_mapping.pop(module, None)
        module.__dict__.pop(STATE_KEY, None)  # fully_shard is the only composable API the loop applies
        module.__dict__.pop(REGISTRY_KEY, None)
        module.__class__ = next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))
        for sub in module.modules():
            for flag in ("_is_fsdp_managed_module", "_fsdp_use_orig_params"):
                sub.__dict__.pop(flag, None)
    renamed = {}
    for name, (old, tensor) in full.items():
        owner_name, _, attr = name.rpartition(".")
        owner = root.get_submodule(owner_name)
        new = nn.Parameter(tensor.detach().clone(), requires_grad=old.requires_grad)
        owner._parameters[attr] = new
        renamed[id(old)] = new
    return renamed
