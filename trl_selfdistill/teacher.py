"""Teacher strategies: where the frozen reference distribution comes from.

| model given                              | strategy                | second copy of the base? |
|------------------------------------------|-------------------------|--------------------------|
| base model + `peft_config` (LoRA, QLoRA)  | `AdapterDisabledTeacher` | no                       |
| an already-adapted `PeftModel` (snapshot) | `AdapterCopyTeacher`     | no (adapter-size copy)   |
| full fine-tuning                          | `ModelTeacher` (copy)    | yes, unavoidable         |
| `teacher_model_name_or_path`              | `ModelTeacher` (loaded)  | yes                      |

`make_teacher` picks the strategy from `teacher_mode` and the model (the table), checks the vocabulary, and shards a
separate teacher like the student (TRL's `prepare_deepspeed` / `prepare_fsdp`). Each strategy is a `Teacher`: a
`kind`, a `source` in words, `last_hidden_state(inputs)` and its LM `head`.

The adapter-disabled model equals the initial model only while every trainable parameter is an adapter parameter:
`check_adapter_teacher` refuses the set-ups where that fails. Every teacher forward runs under `no_grad` with dropout
and gradient checkpointing off (eval mode), and returns last hidden states only: logits are never built here.
"""

import copy
from contextlib import contextmanager

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import AutoModelForCausalLM
from trl.trainer.utils import use_adapter

from .distributed import check_engine, forward_through, full_shape, is_partitioned, unwrap
from .losses import LMHead, check_vocabulary

TEACHER_ADAPTER = "teacher"


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside a (possibly PEFT-wrapped) model."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


@contextmanager
def eval_mode(model: nn.Module):
    """Put every submodule in eval mode (dropout and gradient checkpointing off), restoring each one's mode after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _last_hidden_state(model: nn.Module, inputs: dict) -> torch.Tensor:
    # `base_model` is the backbone of a transformers causal LM (what TRL's fused LM head calls too); a sharded model
    # is entered through its wrapper so FSDP2 / DeepSpeed gather the weights the backbone needs
    inner = unwrap(model)
    with torch.no_grad(), eval_mode(inner):
        return forward_through(model, causal_lm(inner).base_model, **inputs, use_cache=False).last_hidden_state


class Teacher:
    """Where the frozen reference distribution comes from: `kind`, `source` (in words), the last hidden states of a
    batch, and the LM head that turns them into logits."""

    kind: str
    source: str
    model: nn.Module

    def last_hidden_state(self, inputs: dict) -> torch.Tensor:
        raise NotImplementedError

    @property
    def head(self) -> LMHead:
        return LMHead.of(causal_lm(unwrap(self.model)))


class AdapterDisabledTeacher(Teacher):
    """The student's own base weights, with every adapter switched off for the teacher forward."""

    kind = "adapter_disabled"

    def __init__(self, model: PeftModel):
        check_adapter_teacher(model)
        self.model = model
        self.source = "initial model (adapter disabled)"

    def last_hidden_state(self, inputs: dict) -> torch.Tensor:
        with use_adapter(self.model, None):
            return _last_hidden_state(self.model, inputs)


class AdapterCopyTeacher(Teacher):
    """The active adapter of an already-adapted `PeftModel`, copied once into a frozen `teacher` adapter."""

    kind = "adapter_copy"

    def __init__(self, model: PeftModel):
        check_adapter_teacher(model)
        student = model.active_adapter
        if TEACHER_ADAPTER in model.peft_config:
            raise ValueError(
                f"The model already has an adapter named {TEACHER_ADAPTER!r}; it is reserved for the frozen teacher. "
                "Rename or delete that adapter first."
            )
        model.add_adapter(TEACHER_ADAPTER, copy.deepcopy(model.peft_config[student]))
        state = get_peft_model_state_dict(model, adapter_name=student)
        set_peft_model_state_dict(model, state, adapter_name=TEACHER_ADAPTER)
        for name, param in model.named_parameters():
            if f".{TEACHER_ADAPTER}." in name:
                param.requires_grad_(False)
        model.set_adapter(student)
        self.model = model
        self.source = f"snapshot of adapter {student!r} at the start of training"

    def last_hidden_state(self, inputs: dict) -> torch.Tensor:
        with use_adapter(self.model, TEACHER_ADAPTER):
            return _last_hidden_state(self.model, inputs)


class ModelTeacher(Teacher):
    """A separate frozen model: a copy of the initial weights (full fine-tuning) or one loaded from a path."""

    kind = "model_copy"

    def __init__(self, model: nn.Module, source: str):
        self.model = model.eval().requires_grad_(False)
        self.source = source

    @classmethod
    def copy_of(cls, model: nn.Module, source: str | None = None,
                model_init_kwargs: dict | None = None) -> "ModelTeacher":
        """A frozen copy of `model`. A ZeRO-3-partitioned model cannot be copied: it is loaded again from `source`
        (the name or path it was loaded from, with `model_init_kwargs`), and refused when there is none."""
        partitioned = any(is_partitioned(p) for p in model.parameters())
        if partitioned and source is not None:
            from .embedded import resolve

            loaded = AutoModelForCausalLM.from_pretrained(resolve(source), **(model_init_kwargs or {}))
            return cls(loaded, f"`{source}` loaded again (the ZeRO-3-partitioned model cannot be copied)")
        if partitioned:
            raise ValueError(
                "The model's weights are already partitioned by DeepSpeed ZeRO-3 (it was loaded after the ZeRO-3 "
                "config existed), so a copy would hold empty partitions. Load the teacher from disk instead: set "
                f"`teacher_model_name_or_path={getattr(model, 'name_or_path', '')!r}` (or the initial weights' path)."
            )
        teacher = copy.deepcopy(causal_lm(model))
        # TRL patches `forward` on the instance with a closure over the original model; the copy must not keep it
        teacher.__dict__.pop("forward", None)
        return cls(teacher, "frozen copy of the model at the start of training")

    def last_hidden_state(self, inputs: dict) -> torch.Tensor:
        return _last_hidden_state(self.model, inputs)


def make_teacher(model: nn.Module, args, accelerator, *, given_peft_model: bool,
                 model_source: str | None = None) -> Teacher:
    """
    The teacher of a run (see the module's table): `args.teacher_mode` (`auto`: adapter copy for a given `PeftModel`,
    adapter disabled for a `peft_config` run, a copy of the model otherwise) or `args.teacher_model_name_or_path`.
    A copy of a ZeRO-3-partitioned model is loaded again from `model_source`, where the trainer loaded it from. A
    separate teacher is sharded like the student under ZeRO-3 and FSDP2, replicated otherwise.
    """
    from trl.models.utils import prepare_deepspeed, prepare_fsdp

    from .validation import check_model_source

    is_peft = isinstance(model, PeftModel)
    check_engine(accelerator)
    mode = args.teacher_mode
    if args.teacher_model_name_or_path is not None:
        mode = "model_copy"
    elif mode == "auto":
        mode = "adapter_copy" if given_peft_model else "adapter_disabled" if is_peft else "model_copy"
    if mode in ("adapter_disabled", "adapter_copy") and not is_peft:
        raise ValueError(
            f"`teacher_mode={mode!r}` needs a PEFT model, but the model is trained fully. Pass a `peft_config` "
            "(or a PeftModel), or use `teacher_mode='model_copy'`."
        )
    if mode == "adapter_disabled":
        return AdapterDisabledTeacher(model)
    if mode == "adapter_copy":
        if not given_peft_model:
            raise ValueError(
                "`teacher_mode='adapter_copy'` copies the adapter of an already-adapted PeftModel, but the adapter "
                "was just created from `peft_config`, so it equals the base model: use `teacher_mode="
                "'adapter_disabled'` (or 'auto'), which needs no copy."
            )
        return AdapterCopyTeacher(model)
    if args.teacher_model_name_or_path is None:
        if is_peft:
            raise ValueError(
                "`teacher_mode='model_copy'` would copy the whole base model although the model is a PeftModel. "
                "Use `teacher_mode='auto'`: the teacher is then the same model with its adapter disabled (or a "
                "frozen copy of the adapter), with no second copy of the base."
            )
        teacher = ModelTeacher.copy_of(unwrap(model), source=model_source, model_init_kwargs=args.model_init_kwargs)
    else:
        check_model_source(args.teacher_model_name_or_path, "teacher_model_name_or_path", tokenizer=False,
                           model_init_kwargs=args.model_init_kwargs)
        path = args.teacher_model_name_or_path
        loaded = AutoModelForCausalLM.from_pretrained(path, **(args.model_init_kwargs or {}))
        teacher = ModelTeacher(loaded, f"`{path}`")
    student_vocab = full_shape(causal_lm(unwrap(model)).get_output_embeddings().weight)[0]
    check_vocabulary(full_shape(teacher.model.get_output_embeddings().weight)[0], student_vocab)
    # Sharded like the student under ZeRO-3 and FSDP2 (each rank holds 1/N of the teacher), replicated otherwise
    if accelerator.state.deepspeed_plugin is not None:
        teacher.model = prepare_deepspeed(teacher.model, accelerator)
    elif accelerator.is_fsdp2:
        teacher.model = prepare_fsdp(teacher.model, accelerator)
    else:
        teacher.model = accelerator.prepare_model(teacher.model, evaluation_mode=True)
    return teacher


def adapter_parameters(model: PeftModel) -> set[int]:
    """`id`s of every parameter that belongs to an adapter layer of a PEFT model."""
    ids = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for layer_name in module.adapter_layer_names:
                ids.update(id(p) for p in getattr(module, layer_name).parameters())
    return ids


def check_adapter_teacher(model: PeftModel) -> None:
    """Refuse set-ups where the adapter-disabled model would not be the initial model, or the kernel miss a delta."""
    config = model.peft_config[model.active_adapter]
    if config.is_prompt_learning:
        raise ValueError(
            f"{config.peft_type} is a prompt-learning method: its virtual tokens shift the positions the teacher and "
            "the student see. Use LoRA (or another adapter method), or full fine-tuning."
        )
    if getattr(config, "bias", "none") != "none":
        raise ValueError(
            f"LoRA `bias={config.bias!r}` trains the base model's biases, which stay on when the adapter is disabled, "
            "so the teacher would drift with the student. Set `bias='none'`."
        )
    if getattr(config, "modules_to_save", None):
        raise ValueError(
            f"`modules_to_save={config.modules_to_save}` trains full copies of base modules, which the "
            "adapter-disabled "
            "teacher would not see consistently. Drop `modules_to_save`, or train fully with a copied teacher."
        )
    if isinstance(causal_lm(model).get_output_embeddings(), BaseTunerLayer):
        raise ValueError(
            "LoRA targets the output embedding (`lm_head`), which the chunked loss reads as a plain weight. Remove "
            "`lm_head` from `target_modules`."
        )
    adapters = adapter_parameters(model)
    trainable_base = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in adapters]
    if trainable_base:
        raise ValueError(
            f"Base weights are trainable ({', '.join(trainable_base[:3])}"
            f"{', ...' if len(trainable_base) > 3 else ''}) while the teacher is the adapter-disabled model: the "
            "teacher would drift with the student. Freeze them (`requires_grad_(False)`), or train fully with "
            "`teacher_mode='model_copy'`."
        )
