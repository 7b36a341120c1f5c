"""Engine helpers: what the teacher and the distillation term need under DDP, FSDP2 and DeepSpeed ZeRO-2/3.

| engine | student params          | frozen full-FT teacher                     | heads for the kernel               |
|--------|-------------------------|--------------------------------------------|------------------------------------|
| DDP    | replicated              | replicated (`prepare_model(eval)`)         | as they are                        |
| FSDP2  | `DTensor` shards        | sharded by TRL's `prepare_fsdp`            | `full_tensor()` (grad to the shard) |
| ZeRO-2 | replicated (engine)     | replicated (TRL's `prepare_deepspeed`, stage 0) | as they are                   |
| ZeRO-3 | partitioned (`ds_numel`) | partitioned (TRL's `prepare_deepspeed`)   | gathered (`GatheredParameters`)    |

A sharded model's backbone must be called through its wrapper's `forward` (`forward_through`), so FSDP2's root hook
and DeepSpeed's engine gather what the call needs. FSDP1 is legacy in TRL and refused (`check_engine`).
"""

import weakref
from contextlib import ExitStack, contextmanager
from dataclasses import replace

import torch
from accelerate.utils import DistributedType, extract_model_from_parallel
from torch import nn
from torch.distributed.tensor import DTensor

from .losses import LMHead


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP, FSDP or DeepSpeed wrapper (the model itself when it is not wrapped)."""
    return extract_model_from_parallel(model, keep_torch_compile=False)


def is_partitioned(param: torch.Tensor) -> bool:
    """True for a DeepSpeed ZeRO-3 parameter (its data lives in per-rank partitions)."""
    return hasattr(param, "ds_id")


def is_split(tensor: torch.Tensor) -> bool:
    """True when this rank holds only part of `tensor` (an FSDP2 `DTensor` or a ZeRO-3 partition)."""
    return isinstance(tensor, DTensor) or is_partitioned(tensor)


def is_sharded(model: nn.Module) -> bool:
    """True when the weights of `model` are split across ranks (FSDP2 `DTensor`s or ZeRO-3 partitions)."""
    return any(is_split(p) for p in model.parameters())


def full_shape(param: torch.Tensor) -> torch.Size:
    """The shape of the whole parameter, whichever rank holds which part of it."""
    return param.ds_shape if is_partitioned(param) else param.shape


def local_shard(param: torch.Tensor) -> torch.Tensor:
    """The part of `param` this rank holds (the whole tensor when it is not sharded)."""
    if isinstance(param, DTensor):
        return param.to_local()
    if is_partitioned(param):
        return param.ds_tensor
    return param


def forward_through(wrapper: nn.Module, method, *args, **kwargs):
    """Call `method(*args, **kwargs)` inside `wrapper`'s forward when its weights are sharded, directly otherwise.

    FSDP2's root pre-forward hook and DeepSpeed's engine gather the weights a call needs only when the call enters
    through them; calling the backbone directly would see shards (TRL's `_ForwardRedirection` pattern)."""
    if not is_sharded(wrapper):
        return method(*args, **kwargs)
    inner = unwrap(wrapper)
    patched = inner.__dict__.get("forward")  # a forward patched on the instance (TRL does) is put back as it was

    def restore():
        if patched is None:
            inner.__dict__.pop("forward", None)
        else:
            inner.forward = patched

    def redirected(*call_args, **call_kwargs):
        restore()
        return method(*call_args, **call_kwargs)

    inner.forward = redirected
    try:
        return wrapper(*args, **kwargs)
    finally:
        restore()


class _Gathered(torch.autograd.Function):
    """The full data of a gathered ZeRO-3 parameter as a tensor of its own; its gradient goes to the parameter."""

    @staticmethod
    def forward(ctx, param):
        return param.data.detach()

    @staticmethod
    def backward(ctx, grad):
        return grad


_armed: dict[int, weakref.ref] = {}


def _gather_for_gradient(param: torch.Tensor) -> None:
    """Have a ZeRO-3 parameter gathered while a gradient from outside its module's forward accumulates into it.

    ZeRO-3 gathers a parameter for its module's own backward; a gradient reaching it through `_Gathered` arrives
    outside that window, and accumulating a full gradient into an empty partition fails (`The size of tensor a (0)
    must match ...`). The first hook gathers the parameter when it is not available, the second releases it."""
    if id(param) in _armed and _armed[id(param)]() is param:
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    gathered_here = []

    def gather(grad):
        if param.ds_status == ZeroParamStatus.NOT_AVAILABLE:
            param.all_gather()
            gathered_here.append(True)
        return grad

    def release(_param):
        if gathered_here:
            gathered_here.clear()
            param.partition()

    param.register_hook(gather)
    param.register_post_accumulate_grad_hook(release)
    _armed[id(param)] = weakref.ref(param)


def _full(param: torch.Tensor | None) -> torch.Tensor | None:
    if param is None:
        return None
    if isinstance(param, DTensor):
        return param.full_tensor()  # differentiable: the backward reduces the gradient onto this rank's shard
    if not is_partitioned(param):
        return param
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if param.requires_grad:
        _gather_for_gradient(param)
        full = _Gathered.apply(param)
    else:
        full = param.data.detach()
    # DeepSpeed-aware kernels (TRL's chunked kernels) gather any weight not marked available; this one is whole
    full.ds_status = ZeroParamStatus.AVAILABLE
    return full


@contextmanager
def gathered_heads(student: nn.Module, teacher):
    """The heads of `student` (the causal LM, unwrapped) and `teacher`, with full weights, for a matmul or kernel.

    Yields `(student_head, teacher_head)` as `LMHead`s. FSDP2 heads go through `full_tensor()` (one all-gather; its
    backward sends the student's gradient back to its shard, as TRL's `DistillationTrainer` does). ZeRO-3 heads are
    gathered for the block (`deepspeed.zero.GatheredParameters`) and handed out as tensors that outlive it, so an
    autograd graph built inside may run its backward after the block; the student gradient reaches the parameter.
    Both heads must be read inside the block; the teacher's tensors carry no gradient."""
    heads = [LMHead.of(student), teacher.head]
    partitioned = [t for h in heads for t in (h.weight, h.bias) if t is not None and is_partitioned(t)]
    with ExitStack() as stack:
        if partitioned:
            import deepspeed

            unique = list({id(p): p for p in partitioned}.values())
            stack.enter_context(deepspeed.zero.GatheredParameters(unique, modifier_rank=None))
        student_head = replace(heads[0], weight=_full(heads[0].weight), bias=_full(heads[0].bias))
        # An adapter teacher's head is the student's own: its tensors are reused, not gathered a second time
        gathered = {id(heads[0].weight): student_head.weight, id(heads[0].bias): student_head.bias}
        with torch.no_grad():
            teacher_head = replace(heads[1], weight=_full_for_teacher(heads[1].weight, gathered),
                                   bias=_full_for_teacher(heads[1].bias, gathered))
        yield student_head, teacher_head


def _full_for_teacher(param: torch.Tensor | None, gathered: dict) -> torch.Tensor | None:
    """`_full(param)`, or the student's gathered tensor when `param` is also the student's (without its gradient)."""
    if param is None or id(param) not in gathered:
        return _full(param)
    full = gathered[id(param)]
    if not full.requires_grad:
        return full
    teacher = full.detach()
    if hasattr(full, "ds_status"):
        teacher.ds_status = full.ds_status
    return teacher


@contextmanager
def gathered_parameters(params: list[torch.Tensor]):
    """Full, detached copies of `params` for reading (saving, comparing); every rank enters it with the same list."""
    partitioned = [p for p in params if is_partitioned(p)]
    with ExitStack() as stack:
        if partitioned:
            import deepspeed

            stack.enter_context(deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None))
        yield [(p.full_tensor() if isinstance(p, DTensor) else p.data).detach().clone() for p in params]


def as_whole(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` tagged as whole (ZeRO-3's `AVAILABLE`) for DeepSpeed-aware kernels, which gather any weight that lacks
    the tag while ZeRO-3 is on (TRL's chunked kernels): a gathered copy is whole already."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled() and not hasattr(tensor, "ds_status"):
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        tensor.ds_status = ZeroParamStatus.AVAILABLE
    return tensor


def full_tensors(named_params):
    """`(name, full tensor)` for each named parameter, gathered one at a time (peak memory: one whole parameter).
    Collective under FSDP2 and ZeRO-3: every rank must iterate the same parameters in the same order."""
    for name, param in named_params:
        with gathered_parameters([param]) as (full,):
            yield name, full


def check_engine(accelerator) -> None:
    """Refuse engines the teacher does not support, before any weight is loaded."""
    if accelerator.distributed_type == DistributedType.FSDP and accelerator.state.fsdp_plugin.fsdp_version == 1:
        raise ValueError(
            "FSDP1 (`fsdp_version: 1`) is not supported by the self-distillation teacher: its flattened parameters "
            "hide the LM head the distillation term reads, and TRL treats FSDP1 as legacy. Use FSDP2 "
            "(`fsdp_version: 2`, TRL's `fsdp2` accelerate config) or DeepSpeed ZeRO-3 (`zero3`)."
        )


def describe_engine(accelerator) -> str:
    """The engine a run trains under, in words: `DDP, 2 processes`, `FSDP2, 8 processes`, `DeepSpeed ZeRO-3, ...`."""
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        name = f"FSDP{accelerator.state.fsdp_plugin.fsdp_version}"
    elif kind == DistributedType.DEEPSPEED:
        name = f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    elif accelerator.num_processes > 1:
        name = "DDP"
    else:
        name = "one process"
        return f"{name} on {accelerator.device}"
    return f"{name}, {accelerator.num_processes} processes on {accelerator.device.type}"
