"""`SelfDistillSFTTrainer`: SFT plus λ·τ²·D(teacher ‖ student) per token, the teacher being the frozen initial model."""

import hashlib
from contextlib import contextmanager

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, PreTrainedModel
from trl import SFTTrainer
from trl.models.utils import prepare_deepspeed

from .config import SelfDistillConfig
from .data_checks import check_prepared_dataset, check_raw_dataset, check_teacher_source
from .freezing import FreezeConfig, apply_freeze, freeze_for_peft, restrict_peft_config
from .losses import LMHead, teacher_topk, token_divergence, topk_token_divergence
from .model_card import push_to_hub, write_model_card
from .teacher import AdapterCopyTeacher, AdapterDisabledTeacher, ModelTeacher, adapter_parameters, causal_lm
from .teacher_cache import TeacherCache, row_key, tensor_digest, vocab_digest

_NOT_MODEL_INPUTS = ("labels", "shift_labels", "use_cache", "num_items_in_batch")


@contextmanager
def capture_outputs(module: torch.nn.Module):
    """Collect the outputs of every forward call of `module` while the context is open."""
    outputs = []
    handle = module.register_forward_hook(lambda _module, _args, output: outputs.append(output))
    try:
        yield outputs
    finally:
        handle.remove()


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
        self.teacher_cache = self._make_teacher_cache() if args.teacher_cache_dir and self.teacher else None

    # ----------------------------------------------------------------------------------------------------------------
    # Teacher

    def _make_teacher(self, given_peft_model: bool):
        args, model = self.args, self.model
        is_peft = isinstance(model, PeftModel)
        if is_peft and self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            raise ValueError(
                "PEFT with DeepSpeed ZeRO-3 is not supported by the self-distillation teacher (the adapter-disabled "
                "forward on sharded base weights is untested). Use ZeRO-2, FSDP, or DDP."
            )
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
            teacher = ModelTeacher.copy_of(self.accelerator.unwrap_model(model))
        else:
            check_teacher_source(args.teacher_model_name_or_path, args.model_init_kwargs)
            loaded = AutoModelForCausalLM.from_pretrained(
                args.teacher_model_name_or_path, **(args.model_init_kwargs or {})
            )
            teacher = ModelTeacher(loaded, f"`{args.teacher_model_name_or_path}`")
        student_vocab = causal_lm(self.accelerator.unwrap_model(model)).get_output_embeddings().weight.shape[0]
        teacher_vocab = teacher.model.get_output_embeddings().weight.shape[0]
        if teacher_vocab != student_vocab:
            raise ValueError(
                f"The teacher's vocabulary ({teacher_vocab}) differs from the student's ({student_vocab}). Distillation "
                "compares distributions over the same tokens: use a teacher with the student's tokenizer."
            )
        if self.is_deepspeed_enabled:
            teacher.model = prepare_deepspeed(teacher.model, self.accelerator)
        else:
            teacher.model = self.accelerator.prepare_model(teacher.model, evaluation_mode=True)
        return teacher

    def _make_teacher_cache(self) -> TeacherCache:
        """The cache, fingerprinted by teacher weights, tokenizer, training data and the settings that shape it."""
        student_adapters = adapter_parameters(self.model) if isinstance(self.model, PeftModel) else set()
        teacher_tensors = [
            (n, p) for n, p in self.teacher.model.named_parameters() if id(p) not in student_adapters or ".teacher." in n
        ]
        data = hashlib.sha256()
        if hasattr(self.train_dataset, "__len__"):
            for ids in self.train_dataset["input_ids"]:
                data.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
        fingerprint = {
            "teacher": f"{self.teacher.kind}:{tensor_digest(teacher_tensors)}",
            "tokenizer": vocab_digest(self.processing_class),
            "data": data.hexdigest()[:16],
            "temperature": self.args.distill_temperature,
            "scope": self.args.distill_scope,
        }
        return TeacherCache(
            self.args.teacher_cache_dir, fingerprint, self.args.teacher_cache_topk, self.accelerator.process_index
        )

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
        found = [self.teacher_cache.get(k) for k in keys]
        if any(f is None for f in found):
            self.teacher_cache.refresh()  # other processes may have written them since
            found = [self.teacher_cache.get(k) for k in keys]
        if any(f is None for f in found):
            return None
        return torch.cat([f[0] for f in found]), torch.cat([f[1] for f in found])

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
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

        student = causal_lm(self.accelerator.unwrap_model(model))
        with capture_outputs(student.base_model) as backbone_outputs, capture_outputs(student) as lm_outputs:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result

        student_head = LMHead.of(student)
        device = student_head.weight.device
        student_hidden = backbone_outputs[0].last_hidden_state
        student_hidden = (student_hidden[:, :-1] if shifted else student_hidden)[positions].to(device)
        beta, tau = args.divergence_beta, args.distill_temperature
        if cached is not None:
            ids, logps = (t.to(device) for t in cached)
            per_token = topk_token_divergence(student_hidden, student_head, ids, logps, beta, tau)
        else:
            teacher_hidden = (teacher_hidden[:, :-1] if shifted else teacher_hidden)[positions].to(device)
            per_token = token_divergence(student_hidden, student_head, teacher_hidden, self.teacher.head, beta, tau)
            if self.teacher_cache is not None:
                with torch.no_grad():
                    self._fill_cache(keys, positions, student_hidden, student_head, teacher_hidden, mode)

        scale = args.distill_coef * tau**2
        kl_sum, num_positions = per_token.sum(), positions.sum()
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

    def _fill_cache(self, keys, positions, student_hidden, student_head, teacher_hidden, mode):
        """Training: store the teacher's top-k per row. Eval (held-out batches): log the top-k KL beside the exact one."""
        args = self.args
        ids, logps = teacher_topk(teacher_hidden, self.teacher.head, args.teacher_cache_topk, args.distill_temperature)
        if mode == "train":
            counts = positions.sum(1).tolist()
            for key, row_ids, row_logps in zip(keys, ids.split(counts), logps.split(counts)):
                self.teacher_cache.put(key, row_ids, row_logps)
            return
        approx = topk_token_divergence(student_hidden, student_head, ids, logps, args.divergence_beta,
                                       args.distill_temperature)
        gather = self.accelerator.gather_for_metrics
        count = gather(positions.sum()).sum().clamp(min=1)
        self._metrics[mode]["kl_topk"].append((gather(approx.sum()).sum() / count).item())

    # ----------------------------------------------------------------------------------------------------------------
    # Model card and Hub

    def create_model_card(self, model_name=None, dataset_name=None, tags=None, **_hub_kwargs):
        """The package's own card (method, freeze report, forgetting results), written to `output_dir`."""
        write_model_card(self, model_name=model_name, dataset_name=dataset_name, tags=tags)

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True, **kwargs):
        """Save the model, card and results in `output_dir` first, then upload; a failed upload loses nothing."""
        return push_to_hub(self, commit_message=commit_message, blocking=blocking, **kwargs)

    # ----------------------------------------------------------------------------------------------------------------
    # Data

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        """SFTTrainer's preparation between two checks (`trl_selfdistill.data_checks`): raw columns, then tokens."""
        check_raw_dataset(dataset, args, formatting_func, dataset_name)
        raw_rows = len(dataset) if hasattr(dataset, "__len__") else None
        prepared = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        check_prepared_dataset(prepared, raw_rows, processing_class, args, packing, dataset_name)
        return prepared
