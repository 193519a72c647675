"""The training loop's distributed engines: DDP prepared by accelerate, FSDP2 through torch's ``fully_shard``,
DeepSpeed ZeRO through ``deepspeed.initialize``.

One code path serves every world: a single process, ``N`` data-parallel processes (accelerate's DDP
wrapper; gradients are all-reduced in buckets during backward and skipped on accumulation micro-steps),
or ``N`` processes sharding parameters, gradients and optimizer state (FSDP2: every module of the
objective, the frozen teacher included, is sharded block by block). accelerate's own FSDP plugin does
not run on CPU, so FSDP2 is applied with torch's API on CPU (gloo) and GPU (NCCL) alike, whether it was
asked for by an accelerate FSDP config (``fsdp_version: 2``) or by ``--sharding fsdp2``.

DeepSpeed ZeRO-1/2/3 engines are built per phase in :mod:`stepdistill.deepspeed_engines`.

Each phase of an objective gets its own DDP wrapper around all of the objective's modules that reduces
only that phase's parameters (the other phases' and the frozen ones are ignored), so a LoRA student and
a LoRA fake score on one shared frozen base keep separate optimizers and separate gradient reductions.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from .deepspeed_engines import DeepSpeedPhases, claim_deepspeed_launch, deepspeed_launch_sharding

__all__ = [
    "SHARDING", "TrainingEngine", "claim_deepspeed_launch", "local_tensor", "resolve_sharding",
    "shard_optimizer_state",
]  # fmt: skip

SHARDING = ("auto", "none", "fsdp2", "zero1", "zero2", "zero3")


def cpu_only() -> bool:
    """accelerate's ``cpu=`` for this machine: ``True`` without CUDA, so that under ``torchrun`` on a CPU
    machine the processes form a ``MULTI_CPU`` world over gloo instead of each seeing no distribution."""
    return not torch.cuda.is_available()


def process_state():
    """This process's accelerate ``PartialState``, built with :func:`cpu_only`.

    A first bare ``PartialState()`` under ``torchrun`` on a CPU machine sees no distribution, and every
    later ``Accelerator(cpu=True)`` inherits that single-process state.
    """
    from accelerate import PartialState

    return PartialState(cpu=cpu_only())


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this process holds (its shard of a sharded DTensor, its partition of a
    DeepSpeed ZeRO-3 parameter, else the tensor)."""
    from torch.distributed.tensor import DTensor

    if getattr(tensor, "ds_tensor", None) is not None:
        return tensor.ds_tensor
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
    deepspeed = deepspeed_launch_sharding()
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
        self.deepspeed = (
            DeepSpeedPhases(self.zero_stage, accumulation_steps, max_grad_norm) if self.zero_stage else None
        )
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

    def prepare(self, objective, phases, optimizers: dict[str, torch.optim.Optimizer], emas: dict) -> None:
        """One wrapper per phase, reducing only that phase's parameters: accelerate-prepared DDP, or a
        DeepSpeed engine around the phase's own optimizer (every process starts from the main one's weights)."""
        if self.deepspeed is not None:
            roots = _unique_roots(objective.modules.values())
            self.deepspeed.prepare(
                roots, lambda name: _PhaseForward(objective, name), phases, optimizers, emas
            )
            return
        if self.sharding == "fsdp2" or self.accelerator.num_processes == 1:
            return
        for ph in phases:
            module = _PhaseForward(objective, ph.name)
            own = {id(p) for p in ph.parameters}
            ignored = [n for n, p in module.named_parameters() if id(p) not in own]
            module._ddp_params_and_buffers_to_ignore = ignored + [n for n, _ in module.named_buffers()]
            self.wrapped[ph.name] = self.accelerator.prepare_model(module, device_placement=False)

    def loss(self, objective, phase: str, batch: dict, step: int):
        wrapper = self.wrapped.get(phase)
        if self.deepspeed is not None and self.zero_stage < 3:
            wrapper = self.deepspeed.engines[phase]
        return wrapper(batch, step) if wrapper is not None else objective.loss(phase, batch, step)

    def backward(self, phase: str, loss: torch.Tensor, micro_steps: int) -> None:
        """Backward of one micro-step's loss; DeepSpeed also steps at the accumulation boundary."""
        if self.deepspeed is None:
            self.accelerator.backward(loss / micro_steps)
        else:
            self.deepspeed.backward(phase, loss)

    def update(self, phase: str, parameters: list[nn.Parameter], optimizer) -> None:
        """Clip and step one phase's optimizer after its last micro-step (DeepSpeed did both already)."""
        if self.deepspeed is not None:
            return
        if self.max_grad_norm > 0:
            if self.accelerator.scaler is not None:
                self.accelerator.scaler.unscale_(optimizer.optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, self.max_grad_norm)
        optimizer.step()

    def after_load(self) -> None:
        if self.deepspeed is not None:
            self.deepspeed.after_load()

    def optimizers_whole(self):
        """A context in which every phase's optimizer holds its parameters (for its state dict)."""
        return self.deepspeed.optimizers_whole() if self.deepspeed is not None else nullcontext()

    @property
    def forward_everywhere(self) -> bool:
        """Whether a forward outside training (sample grids) must run on every process (sharded weights)."""
        return bool(self.sharded_roots) or self.zero_stage == 3

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
        """FSDP2, ZeRO-3: turn every sharded module back into a plain one holding full weights (for export).

        Phase parameter lists and EMA shadows are updated in place, so what a recipe exports after
        training is exactly what an unsharded run of the same weights would export.
        """
        if self.deepspeed is not None:
            self._renamed = self.deepspeed.gather(emas)
            self.remap(phases)
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
