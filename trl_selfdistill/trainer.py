"""`SelfDistillSFTTrainer`: SFT plus λ·τ²·D(teacher ‖ student) per token, the teacher being the frozen initial model."""

import hashlib
from contextlib import contextmanager

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, PreTrainedModel
from trl import SFTTrainer
from trl.models.utils import prepare_deepspeed, prepare_fsdp

from .config import SelfDistillConfig
from .distributed import check_engine, full_shape, full_tensors, gathered_heads, local_shard, unwrap
from .freezing import FreezeConfig, apply_freeze, freeze_for_peft, restrict_peft_config
from .losses import teacher_topk, token_divergence, topk_token_divergence
from .model_card import push_checkpoint, push_to_hub, write_model_card
from .teacher import AdapterCopyTeacher, AdapterDisabledTeacher, ModelTeacher, adapter_parameters, causal_lm
from .teacher_cache import TeacherCache, row_key, tensor_digest, vocab_digest

_NOT_MODEL_INPUTS = ("labels", "shift_labels", "use_cache", "num_items_in_batch")


class NonFiniteError(FloatingPointError):
    """A loss term, a teacher output or a weight about to be saved is NaN or infinite; training stops."""


def nonfinite_parameters(model: torch.nn.Module, trainable_only: bool = False) -> list[str]:
    """Names of the parameters holding a NaN or an infinity (the local shard of a sharded parameter)."""
    bad = []
    for name, param in model.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        local = local_shard(param)
        if local.numel() and not torch.isfinite(local.detach()).all():
            bad.append(name)
    return bad


@contextmanager
def capture_outputs(module: torch.nn.Module):
    """Collect the outputs of every forward call of `module` while the context is open."""
    outputs = []
    handle = module.register_forward_hook(lambda _module, _args, output: outputs.append(output))
    try:
        yield outputs
    finally:
        handle.remove()


_CE_FIX = (
    "Lower the learning rate, set `max_grad_norm`, use bf16/fp32 instead of fp16, and check the data of this batch."
)


class SelfDistillSFTTrainer(SFTTrainer):
    """
    [`~trl.SFTTrainer`] whose loss adds a distillation term toward a frozen teacher (arXiv 2604.15574):

        loss = CE(gold) + λ·τ²·D(p_teacher^τ, p_student^τ)   averaged per token

    The CE part is SFTTrainer's own (same normalisation, same metrics). The divergence is computed from the last hidden
    states through TRL's chunked kernel, on the selected positions only, so neither model's full logits are built.
    The teacher is picked by `args.teacher_mode` (see `trl_selfdistill.teacher`). With `distill_coef=0` this is
    exactly SFTTrainer. `freeze_config` restricts what trains (full fine-tuning) or where adapters go (PEFT).
    """

    _tag_names = ["trl", "sft", "self-distillation", "trl-selfdistill"]

    def __init__(self, model, args: SelfDistillConfig | None = None, freeze_config: FreezeConfig | None = None, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = SelfDistillConfig(f"{name.split('/')[-1]}-SelfDistill")
        elif not isinstance(args, SelfDistillConfig):
            raise TypeError(
                f"`args` is a {type(args).__name__}; SelfDistillSFTTrainer needs a SelfDistillConfig. Build one with "
                "`SelfDistillConfig(**your_config.to_dict())` plus the distillation fields."
            )
        given_peft_model = isinstance(model, PeftModel)
        if freeze_config is not None and kwargs.get("peft_config") is not None and isinstance(model, PreTrainedModel):
            kwargs["peft_config"] = restrict_peft_config(kwargs["peft_config"], model, freeze_config)
        super().__init__(model, args, **kwargs)
        self.freeze_report = None
        if freeze_config is not None:
            freeze = freeze_for_peft if isinstance(self.model, PeftModel) else apply_freeze
            self.freeze_report = freeze(self.model, freeze_config)
            if self.is_world_process_zero():
                print(f"[trl_selfdistill] {self.freeze_report.summary()}")
        self.teacher = self._make_teacher(given_peft_model) if args.distill_coef > 0 else None
        if self.teacher is not None:
            self._check_teacher_weights()
        self.teacher_cache = self._make_teacher_cache() if args.teacher_cache_dir and self.teacher else None

    # ----------------------------------------------------------------------------------------------------------------
    # Teacher

    def _make_teacher(self, given_peft_model: bool):
        args, model = self.args, self.model
        is_peft = isinstance(model, PeftModel)
        check_engine(self.accelerator)
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
            teacher = ModelTeacher.copy_of(unwrap(model))
        else:
            loaded = AutoModelForCausalLM.from_pretrained(
                args.teacher_model_name_or_path, **(args.model_init_kwargs or {})
            )
            teacher = ModelTeacher(loaded, f"`{args.teacher_model_name_or_path}`")
        student_vocab = full_shape(causal_lm(unwrap(model)).get_output_embeddings().weight)[0]
        teacher_vocab = full_shape(teacher.model.get_output_embeddings().weight)[0]
        if teacher_vocab != student_vocab:
            raise ValueError(
                f"The teacher's vocabulary ({teacher_vocab}) differs from the student's ({student_vocab}). Distillation "
                "compares distributions over the same tokens: use a teacher with the student's tokenizer."
            )
        # Sharded like the student under ZeRO-3 and FSDP2 (each rank holds 1/N of the teacher), replicated otherwise
        if self.is_deepspeed_enabled:
            teacher.model = prepare_deepspeed(teacher.model, self.accelerator)
        elif self.accelerator.is_fsdp2:
            teacher.model = prepare_fsdp(teacher.model, self.accelerator)
        else:
            teacher.model = self.accelerator.prepare_model(teacher.model, evaluation_mode=True)
        return teacher

    def _check_teacher_weights(self) -> None:
        """Refuse a teacher with NaN/inf weights at the start: every distillation target would be NaN."""
        bad = nonfinite_parameters(self.teacher.model)
        if bad:
            raise NonFiniteError(
                f"The teacher ({self.teacher.source}) has non-finite weights in {len(bad)} tensors "
                f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}), so every distillation target would be NaN. "
                "Load the model again from a good checkpoint (or point `teacher_model_name_or_path` at one)."
            )

    def _make_teacher_cache(self) -> TeacherCache:
        """The cache, fingerprinted by every byte of the teacher weights, the tokenizer, training data and the settings
        that shape it; a `teacher_cache_topk` above the vocabulary is refused here, before any step."""
        student_adapters = adapter_parameters(self.model) if isinstance(self.model, PeftModel) else set()
        teacher_tensors = [
            (n, p) for n, p in self.teacher.model.named_parameters() if id(p) not in student_adapters or ".teacher." in n
        ]
        data = hashlib.sha256()
        if hasattr(self.train_dataset, "__len__"):
            for ids in self.train_dataset["input_ids"]:
                data.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
        fingerprint = {
            "teacher": f"{self.teacher.kind}:{tensor_digest(full_tensors(teacher_tensors))}",
            "tokenizer": vocab_digest(self.processing_class),
            "data": data.hexdigest()[:16],
            "temperature": self.args.distill_temperature,
            "scope": self.args.distill_scope,
        }
        vocab_size = full_shape(self.teacher.head.weight)[0]
        return TeacherCache(self.args.teacher_cache_dir, fingerprint, self.args.teacher_cache_topk, vocab_size)

    # ----------------------------------------------------------------------------------------------------------------
    # Loss

    def _distill_positions(self, inputs: dict) -> tuple[torch.Tensor, bool]:
        """Boolean `[B, T']` mask of the positions the term covers, and whether hidden states need shifting."""
        shifted = "shift_labels" not in inputs
        if self.args.distill_scope == "completion":
            labels = inputs["labels"][:, 1:] if shifted else inputs["shift_labels"]
            return labels != -100, shifted
        if "attention_mask" in inputs:
            real = inputs["attention_mask"].bool()
            return (real[:, 1:] & real[:, :-1]) if shifted else real, shifted
        # Padding-free batches: every position is real, but a position must not predict the next document's start
        return inputs["position_ids"][:, 1:] != 0, shifted

    def _row_keys(self, inputs: dict, positions: torch.Tensor) -> list[str]:
        """Cache keys of the batch rows: real tokens and covered positions, independent of the batch's padding."""
        keys = []
        for row, ids in enumerate(inputs["input_ids"]):
            if "attention_mask" in inputs:
                real = inputs["attention_mask"][row].bool()
                keys.append(row_key(ids[real], positions[row][real[1:] & real[:-1]]))
            else:
                keys.append(row_key(ids, positions[row]))
        return keys

    def _cached_teacher(self, keys: list[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cached top-k of every row, or None. Only entries stored in an earlier epoch are served, so the first
        epoch always runs the teacher and a resumed run uses the same values as an uninterrupted one."""
        epoch = int(self.state.epoch or 0)
        found = [self.teacher_cache.get(k, before_epoch=epoch) for k in keys]
        if epoch > 0 and any(f is None for f in found):
            self.teacher_cache.refresh()  # other processes may have written them since
            found = [self.teacher_cache.get(k, before_epoch=epoch) for k in keys]
        if any(f is None for f in found):
            return None
        return torch.cat([f[0] for f in found]), torch.cat([f[1] for f in found])

    def _stop_if_nonfinite(self, value: torch.Tensor, term: str, fix: str) -> None:
        """Raise before the optimizer step when `value` holds a NaN or an infinity (nothing saved is overwritten)."""
        if not bool(torch.isfinite(value.detach()).all()):
            step, epoch = self.state.global_step, self.state.epoch or 0.0
            raise NonFiniteError(
                f"Non-finite {term} at optimizer step {step + 1} (epoch {epoch:.2f}): training stopped before this "
                f"step's update, so the weights in memory and every checkpoint saved so far are intact. {fix}"
            )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher is None:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self._stop_if_nonfinite(result[0] if return_outputs else result, "SFT loss (CE)", _CE_FIX)
            return result
        mode = "train" if self.model.training else "eval"
        args = self.args
        positions, shifted = self._distill_positions(inputs)
        use_cache = self.teacher_cache is not None and mode == "train"
        keys = self._row_keys(inputs, positions) if use_cache else None
        cached = self._cached_teacher(keys) if use_cache else None
        if cached is None:
            teacher_hidden = self.teacher.last_hidden_state(
                {k: v for k, v in inputs.items() if k not in _NOT_MODEL_INPUTS}
            )
            self._stop_if_nonfinite(
                teacher_hidden, "teacher output (last hidden states)",
                "The teacher produces NaN/inf on this batch: check its weights and dtype (fp16 overflows; use bf16 or "
                "fp32 for the teacher), or the inputs of this batch.",
            )

        student = causal_lm(self.accelerator.unwrap_model(model))
        with capture_outputs(student.base_model) as backbone_outputs, capture_outputs(student) as lm_outputs:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        self._stop_if_nonfinite(loss, "SFT loss (CE)", _CE_FIX)

        with gathered_heads(student, self.teacher) as (student_head, teacher_head):
            device = student_head.weight.device
            student_hidden = backbone_outputs[0].last_hidden_state
            student_hidden = (student_hidden[:, :-1] if shifted else student_hidden)[positions].to(device)
            beta, tau = args.divergence_beta, args.distill_temperature
            if cached is not None:
                ids, logps = (t.to(device) for t in cached)
                per_token = topk_token_divergence(student_hidden, student_head, ids, logps, beta, tau)
            else:
                teacher_hidden = (teacher_hidden[:, :-1] if shifted else teacher_hidden)[positions].to(device)
                per_token = token_divergence(student_hidden, student_head, teacher_hidden, teacher_head, beta, tau)
                if self.teacher_cache is not None:
                    with torch.no_grad():
                        self._fill_cache(keys, positions, student_hidden, student_head, teacher_hidden, teacher_head,
                                         mode)

        scale = args.distill_coef * tau**2
        kl_sum, num_positions = per_token.sum(), positions.sum()
        self._stop_if_nonfinite(
            kl_sum, "distillation term (KL to the teacher" + (", from the teacher cache)" if cached else ")"),
            "Rebuild the teacher cache (delete `teacher_cache_dir`)" if cached else
            "Lower the learning rate or `distill_temperature`-sharpened logits overflow: try τ ≥ 0.5, bf16/fp32, or "
            "`max_grad_norm`.",
        )
        if args.distill_scope == "completion" and num_items_in_batch is not None:
            # The same denominator as the CE term: tokens of the whole global batch, DDP averaging undone
            distill = scale * kl_sum / num_items_in_batch
            if args.average_tokens_across_devices:
                distill = distill * (self.accelerator.num_processes // self.get_tp_size())
        else:
            # A per-micro-batch mean; with `num_items_in_batch`, Trainer leaves accumulation averaging to the loss
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            distill = scale * kl_sum / num_positions.clamp(min=1) / steps
        loss = loss + distill

        fused = next(out for out in lm_outputs if getattr(out, "log_probs", None) is not None)
        gather = self.accelerator.gather_for_metrics
        ce = gather(-fused.log_probs.detach().sum()).sum() / gather(fused.label_mask.sum()).sum().clamp(min=1)
        count = gather(num_positions).sum().clamp(min=1)
        kl = (gather(kl_sum.detach()).sum() / count).item()
        self._metrics[mode]["sft_loss"].append(ce.item())
        self._metrics[mode]["kl"].append(kl)
        self._metrics[mode]["distill_loss"].append(scale * kl)
        if use_cache:
            self._metrics[mode]["teacher_cache_hit"].append(float(cached is not None))
        return (loss, result[1]) if return_outputs else loss

    def _fill_cache(self, keys, positions, student_hidden, student_head, teacher_hidden, teacher_head, mode):
        """Training: store the teacher's top-k per row. Eval (held-out batches): log the top-k KL beside the exact one."""
        args = self.args
        ids, logps = teacher_topk(teacher_hidden, teacher_head, args.teacher_cache_topk, args.distill_temperature)
        if mode == "train":
            counts = positions.sum(1).tolist()
            for key, row_ids, row_logps in zip(keys, ids.split(counts), logps.split(counts)):
                self.teacher_cache.put(key, row_ids, row_logps, epoch=int(self.state.epoch or 0))
            return
        approx = topk_token_divergence(student_hidden, student_head, ids, logps, args.divergence_beta,
                                       args.distill_temperature)
        gather = self.accelerator.gather_for_metrics
        count = gather(positions.sum()).sum().clamp(min=1)
        self._metrics[mode]["kl_topk"].append((gather(approx.sum()).sum() / count).item())

    # ----------------------------------------------------------------------------------------------------------------
    # Saving, model card and Hub

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """`Trainer.save_model`, refused when a trainable weight is NaN/inf: non-finite weights never overwrite a save."""
        bad = nonfinite_parameters(self.model, trainable_only=True)
        if bad:
            raise NonFiniteError(
                f"Refusing to save: {len(bad)} trainable tensors hold NaN/inf ({', '.join(bad[:3])}"
                f"{', ...' if len(bad) > 3 else ''}) at step {self.state.global_step}. What is on disk is kept. Resume "
                "from the last checkpoint with a lower learning rate, `max_grad_norm`, or bf16/fp32 instead of fp16."
            )
        return super().save_model(output_dir, _internal_call)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None, **_hub_kwargs):
        """The package's own card (method, freeze report, forgetting results), written to `output_dir`."""
        write_model_card(self, model_name=model_name, dataset_name=dataset_name, tags=tags)

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True, **kwargs):
        """Save the model, card and results in `output_dir` first, then upload; a failed upload loses nothing."""
        return push_to_hub(self, commit_message=commit_message, blocking=blocking, **kwargs)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # Trainer's checkpoint push uploads the whole output folder: send only the allowlisted files instead
        push_checkpoint(self, checkpoint_folder)
