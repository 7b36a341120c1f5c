"""`SelfDistillSFTTrainer`: SFT plus λ·τ²·D(teacher ‖ student) per token, the teacher the frozen initial model."""

import contextlib
import hashlib
import inspect
import math
from contextlib import contextmanager

import torch
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .base_trainer import CE_FIX, GuardedSFTTrainer, NonFiniteError, nonfinite_parameters
from .config import SelfDistillConfig
from .data_checks import check_real
from .distributed import full_shape, full_tensors, gathered_heads, unwrap
from .freezing import FreezeConfig, apply_freeze, freeze_for_peft, restrict_peft_config
from .losses import TeacherTarget, fused_token_losses, teacher_topk
from .teacher import adapter_parameters, causal_lm, make_teacher
from .teacher_cache import TeacherCache, row_key, tensor_digest, vocab_digest

__all__ = ["NonFiniteError", "SelfDistillSFTTrainer", "nonfinite_parameters"]

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



class SelfDistillSFTTrainer(GuardedSFTTrainer):
    """
    [`~trl.SFTTrainer`] whose loss adds a distillation term toward a frozen teacher (arXiv 2604.15574):

        loss = CE(gold) + λ·τ²·D(p_teacher^τ, p_student^τ)   averaged per token

    The CE keeps SFTTrainer's normalisation and metrics. Both terms come from one projection of the student's last
    hidden states per chunk of the selected positions (`losses.fused_token_losses`), chunks sized to a memory budget.
    The teacher is picked by `args.teacher_mode` (see `trl_selfdistill.teacher`). With `distill_coef=0` this is
    exactly SFTTrainer. The input checks, NaN/inf guards, card and push are `GuardedSFTTrainer`'s. `freeze_config`
    restricts what trains (full fine-tuning) or where adapters go (PEFT).

    λ is `args.distill_coef` when the trainer is built and `trainer.distill_coef` afterwards: a callback may change it
    between steps (e.g. `ForgettingBudgetCallback`); `args` keeps the configured value.
    """

    _tag_names = ["trl", "sft", "self-distillation", "trl-selfdistill"]

    def __init__(
        self, model, args: SelfDistillConfig | None = None, freeze_config: FreezeConfig | None = None, **kwargs
    ):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = SelfDistillConfig(f"{name.split('/')[-1]}-SelfDistill")
        elif not isinstance(args, SelfDistillConfig):
            raise TypeError(
                f"`args` is a {type(args).__name__}; SelfDistillSFTTrainer needs a SelfDistillConfig. Convert it with "
                "`SelfDistillConfig.from_sft_config(your_config, distill_coef=1.0)` (it keeps every field you set)."
            )
        given_peft_model = isinstance(model, PeftModel)
        if freeze_config is not None and kwargs.get("peft_config") is not None and isinstance(model, PreTrainedModel):
            kwargs["peft_config"] = restrict_peft_config(kwargs["peft_config"], model, freeze_config)
        model_source = model if isinstance(model, str) else None  # where a ZeRO-3 teacher loads from
        super().__init__(model, args, **kwargs)  # the input checks run first (`GuardedSFTTrainer`)
        self.freeze_report = None
        if freeze_config is not None:
            freeze = freeze_for_peft if isinstance(self.model, PeftModel) else apply_freeze
            self.freeze_report = freeze(self.model, freeze_config)
            if self.is_world_process_zero():
                print(f"[trl_selfdistill] {self.freeze_report.summary()}")
        self._tokens_seen = 0  # the `num_tokens` metric of the distillation path (SFTTrainer counts its own)
        # `logits_to_keep=1` where the forward takes it: the model's own LM head then projects one position per row
        forward = inspect.signature(type(causal_lm(unwrap(self.model))).forward)
        self._head_skip = {"logits_to_keep": 1} if "logits_to_keep" in forward.parameters else {}
        if args.distill_coef > 0:
            self._check_loss_options()
        self.teacher = make_teacher(self.model, args, self.accelerator, given_peft_model=given_peft_model,
                                    model_source=model_source) if args.distill_coef > 0 else None
        self._distill_coef = args.distill_coef
        if self.teacher is not None:
            self._check_teacher_weights()
        self.teacher_cache = self._make_teacher_cache() if args.teacher_cache_dir and self.teacher else None
        self._row_weights = self._read_row_weights() if self.teacher is not None else None

    @property
    def distill_coef(self) -> float:
        """λ, the weight of the distillation term in the loss of the next steps (and logged as `distill_coef`)."""
        return self._distill_coef

    @distill_coef.setter
    def distill_coef(self, value: float) -> None:
        value = check_real("`distill_coef` (λ)", value, "Use a float ≥ 0, e.g. 1.0 (paper).")
        if not math.isfinite(value) or value < 0:
            raise ValueError(
                f"`distill_coef` (λ) must be a finite number ≥ 0, got {value}: the loss would be "
                f"{'NaN' if math.isnan(value) else 'unbounded'}. Use a float ≥ 0, e.g. 1.0 (paper)."
            )
        if self.teacher is None and value != self._distill_coef:
            raise ValueError(
                f"Cannot set `distill_coef` to {value}: this trainer was built with `distill_coef=0`, so it has no "
                "teacher and trains plain SFT. Build it with `SelfDistillConfig(distill_coef > 0)` (e.g. 1.0) to "
                "change "
                "λ during training."
            )
        self._distill_coef = value

    # ----------------------------------------------------------------------------------------------------------------
    # Teacher

    def _check_loss_options(self) -> None:
        """Refuse the SFTConfig options whose loss the distillation path does not compute, naming the fix."""
        args = self.args
        unsupported = {
            "a custom `compute_loss_func`": self.compute_loss_func is not None,
            f"`label_smoothing_factor={args.label_smoothing_factor}`": args.label_smoothing_factor != 0,
            "`use_liger_kernel=True`": args.use_liger_kernel,
            f"`loss_type={args.loss_type!r}`": args.loss_type not in ("nll", "dft"),
            "sequence parallelism": getattr(self.accelerator.parallelism_config, "sp_enabled", False),
        }
        found = [name for name, present in unsupported.items() if present]
        if found:
            raise ValueError(
                f"{', '.join(found)} cannot be combined with self-distillation (`distill_coef={args.distill_coef}`): "
                "its loss computes the CE (`loss_type` 'nll' or 'dft') and the divergence from one projection of the "
                "hidden states, which those options would replace. Drop them, or set `distill_coef=0` for plain SFT."
            )

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
            (n, p)
            for n, p in self.teacher.model.named_parameters()
            if id(p) not in student_adapters or ".teacher." in n
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
            "precision": self._head_precision(),
        }
        vocab_size = full_shape(self.teacher.head.weight)[0]
        return TeacherCache(self.args.teacher_cache_dir, fingerprint, self.args.teacher_cache_topk, vocab_size)

    # ----------------------------------------------------------------------------------------------------------------
    # Loss

    def _distill_positions(self, inputs: dict) -> tuple[torch.Tensor, bool]:
        """Boolean `[B, T']` mask of the positions the term covers, and whether hidden states need shifting."""
        shifted = "shift_labels" not in inputs
        labels = inputs["labels"][:, 1:] if shifted else inputs["shift_labels"]
        if self.args.distill_scope == "completion":
            return labels != -100, shifted
        if "attention_mask" in inputs:
            real = inputs["attention_mask"].bool()
            real = (real[:, 1:] & real[:, :-1]) if shifted else real
        else:  # padding-free batches: every position is real, but none may predict the next document's start
            real = inputs["position_ids"][:, 1:] != 0
        return (real & (labels == -100) if self.args.distill_scope == "prompt" else real), shifted

    def _read_row_weights(self) -> dict[tuple[int, ...], float] | None:
        """
        A training row's own weight on the distillation term, from a `distill_weight` column of the training data
        (e.g. 0 on new facts, whose answers the teacher does not know): token ids of the prepared row → weight.
        None without the column. Rows are told apart by their tokens, so packing and padding-free are refused.
        """
        dataset = self.train_dataset
        if dataset is None or "distill_weight" not in (dataset.column_names or []):
            return None
        if self.args.packing or self.args.padding_free:
            raise ValueError(
                "A `distill_weight` column weights each training row's distillation term, but packing and "
                "padding-free merge rows. Turn off `packing`/`padding_free`, or drop the column."
            )
        weights: dict[tuple[int, ...], float] = {}
        for ids, weight in zip(dataset["input_ids"], dataset["distill_weight"], strict=True):
            if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
                raise ValueError(f"`distill_weight` must be a finite number ≥ 0 per row, got {weight!r}.")
            if weights.setdefault(tuple(ids), float(weight)) != float(weight):
                raise ValueError(
                    "Two training rows with the same tokens have different `distill_weight`s: give identical rows "
                    "the same weight, or de-duplicate the data."
                )
        return weights

    def _row_weight_tensor(self, inputs: dict) -> torch.Tensor:
        """`[B]` weights of the batch's rows (1 for rows not in the training data, e.g. evaluation rows)."""
        rows = zip(inputs["input_ids"], inputs["attention_mask"].bool(), strict=True)  # no packing: rows are padded
        weights = [self._row_weights.get(tuple(row[real].tolist()), 1.0) for row, real in rows]
        return torch.tensor(weights, dtype=torch.float32)

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
        epoch always runs the teacher and a resumed run uses the same values as an uninterrupted one. With
        `teacher_cache_prefill`, the pre-pass stored every row (as epoch 0) before training: epoch 0 reads them too."""
        epoch = int(self.state.epoch or 0) + (1 if self.args.teacher_cache_prefill else 0)
        found = [self.teacher_cache.get(k, before_epoch=epoch) for k in keys]
        if epoch > 0 and any(f is None for f in found):
            self.teacher_cache.refresh()  # other processes may have written them since
            found = [self.teacher_cache.get(k, before_epoch=epoch) for k in keys]
        if any(f is None for f in found):
            return None
        return torch.cat([f[0] for f in found]), torch.cat([f[1] for f in found])

    def train(self, *args, **kwargs):
        if self.teacher_cache is not None and self.args.teacher_cache_prefill:
            self.prefill_teacher_cache()
        return super().train(*args, **kwargs)

    @torch.no_grad()
    def prefill_teacher_cache(self) -> int:
        """
        The teacher pre-pass: one forward-only pass of the teacher over the training data (no student, no optimizer,
        batches of `teacher_cache_prefill_batch_size`, each process its share) storing the top-k of every example not
        cached yet, so that the first epoch already reads the cache. Rows are keyed per example, whatever the batch.
        Returns the number of examples stored by this process. `train()` calls it when `teacher_cache_prefill=True`.
        """
        args = self.args
        if "attention_mask" not in self.data_collator([self.train_dataset[0]]):
            raise ValueError(
                "`teacher_cache_prefill` needs per-example rows, but this collator packs a batch into one row "
                "(padding-free): its cache keys depend on the batch. Set `teacher_cache_prefill=False` (the first "
                "epoch "
                "fills the cache), or turn off `padding_free`."
            )
        loader = self.accelerator.prepare(
            torch.utils.data.DataLoader(
                self.train_dataset,
                batch_size=args.teacher_cache_prefill_batch_size,
                collate_fn=self.data_collator,
                num_workers=args.dataloader_num_workers,
            )
        )
        stored = 0
        for batch in tqdm(loader, desc="Teacher pre-pass", disable=not self.is_world_process_zero()):
            inputs = self._prepare_inputs(batch)
            positions, shifted = self._distill_positions(inputs)
            keys = self._row_keys(inputs, positions)
            missing = any(self.teacher_cache.get(key, before_epoch=1) is None for key in keys)
            # Skip only when no process misses a row: the sharded teacher's forward is a collective
            if not self.accelerator.reduce(torch.tensor(int(missing), device=self.accelerator.device), "sum"):
                continue  # a resumed run, or another run's complete cache
            hidden = self._teacher_hidden({k: v for k, v in inputs.items() if k not in _NOT_MODEL_INPUTS})
            self._stop_if_nonfinite((hidden, "teacher output in the cache pre-pass", "Check the teacher's weights."))
            hidden = (hidden[:, :-1] if shifted else hidden)[positions]
            student = causal_lm(unwrap(self.model))
            with gathered_heads(student, self.teacher) as (_, teacher_head), self._head_autocast():
                ids, logps = teacher_topk(hidden, teacher_head, args.teacher_cache_topk, args.distill_temperature)
            counts = positions.sum(1).tolist()
            for key, row_ids, row_logps in zip(keys, ids.split(counts), logps.split(counts), strict=True):
                self.teacher_cache.put(key, row_ids, row_logps, epoch=0)
            stored += len(keys)
        self.accelerator.wait_for_everyone()
        self.teacher_cache.refresh()  # what the other processes stored
        return stored

    def _teacher_hidden(self, inputs: dict) -> torch.Tensor:
        """The teacher's last hidden states, under the autocast the student's wrapped forward runs under (the teacher
        forward goes to the backbone directly, past that wrapper), so that both see the same precision: at step 0
        an unchanged student gives a divergence of exactly 0."""
        with self.accelerator.autocast():
            return self.teacher.last_hidden_state(inputs)

    def _head_autocast(self):
        """The autocast the fused loss's head projections run under (`cast_lm_head_to_fp32`: none, fp32)."""
        return contextlib.nullcontext() if self.args.cast_lm_head_to_fp32 else self.accelerator.autocast()

    def _head_precision(self) -> str:
        """The dtype of the head's products, which the cached log-probs carry: autocast's under mixed precision (unless
        `cast_lm_head_to_fp32`), else the head weight's (fp32 training, or DeepSpeed's bf16 weights)."""
        kind = self.accelerator.device.type
        with self._head_autocast():
            if torch.is_autocast_enabled(kind):
                return str(torch.get_autocast_dtype(kind)).removeprefix("torch.")
        return str(self.teacher.head.weight.dtype).removeprefix("torch.")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher is None:  # plain SFT, with the guard
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        args = self.args
        positions, shifted = self._distill_positions(inputs)
        labels = inputs["labels"][:, 1:] if shifted else inputs["shift_labels"]
        label_mask = labels != -100
        rows = positions | label_mask  # positions the CE or the divergence covers
        use_cache = self.teacher_cache is not None and mode == "train"
        keys = self._row_keys(inputs, positions) if use_cache else None
        cached = self._cached_teacher(keys) if use_cache else None
        model_inputs = {k: v for k, v in inputs.items() if k not in _NOT_MODEL_INPUTS}
        checks = []  # (value, term, fix) read together before the step ends, in one host transfer
        if cached is None:
            teacher_hidden = self._teacher_hidden(model_inputs)
            checks.append(
                (
                    teacher_hidden,
                    "teacher output (last hidden states)",
                    "The teacher produces NaN/inf on this batch: check its weights and dtype (fp16 overflows; use "
                    "bf16 or fp32 for the teacher), or the inputs of this batch.",
                )
            )

        # The student's forward runs through the wrapped model (DDP/FSDP/DeepSpeed hooks); its LM head projects one
        # position per row only, and the losses project the selected hidden states once, below
        student = causal_lm(unwrap(model))
        forward_kwargs = {"use_cache": False, **self._head_skip}
        if self.aux_loss_enabled:
            forward_kwargs["output_router_logits"] = True
        with capture_outputs(student.base_model) as backbone_outputs:
            outputs = model(**model_inputs, **forward_kwargs)
        hidden = backbone_outputs[0].last_hidden_state
        # Full head weights under FSDP2/ZeRO-3 (a collective: every rank enters, whatever its positions)
        where = rows.nonzero(as_tuple=True)  # one host read; boolean-mask indexing would make one per tensor
        with gathered_heads(student, self.teacher) as (student_head, teacher_head):
            device = student_head.weight.device
            hidden = (hidden[:, :-1] if shifted else hidden)[where].to(device)
            if cached is not None:
                uniform = -math.log(cached[1].shape[1] + 1)  # rows the divergence does not cover: a finite stand-in
                teacher = TeacherTarget(
                    topk_ids=self._rows_from_positions(cached[0], rows, positions, 0).to(device),
                    topk_logps=self._rows_from_positions(cached[1], rows, positions, uniform).to(device),
                )
            else:
                selected = (teacher_hidden[:, :-1] if shifted else teacher_hidden)[where].to(device)
                teacher = TeacherTarget(selected, teacher_head)
            targets, covered = labels[where].to(device), positions[where].to(device)
            ce_scale, distill_scale = self._loss_scales(label_mask, positions, num_items_in_batch)
            divergence_weights = covered * distill_scale
            if self._row_weights is not None:
                divergence_weights = divergence_weights * self._row_weight_tensor(inputs).to(device)[where[0]]
            with self._head_autocast():
                fused = fused_token_losses(
                    hidden,
                    student_head,
                    targets,
                    teacher,
                    ce_weights=(targets != -100) * ce_scale,
                    divergence_weights=divergence_weights,
                    beta=args.divergence_beta,
                    temperature=args.distill_temperature,
                    dft=args.loss_type == "dft",
                    topk=args.teacher_cache_topk if self.teacher_cache is not None and cached is None else None,
                    rows=args.loss_chunk_rows,
                )
        loss = fused.loss
        if self.aux_loss_enabled:
            # As SFTTrainer: a per-micro-batch mean; with `num_items_in_batch`, accumulation averaging is the loss's
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps

        valid = targets != -100
        ce_sum, kl_sum = fused.ce.sum(), torch.where(covered, fused.divergence, 0.0).sum()
        self._stop_if_nonfinite(
            *checks,
            (ce_sum, "SFT loss (CE)", CE_FIX),
            (
                kl_sum,
                "distillation term (KL to the teacher" + (", from the teacher cache)" if cached else ")"),
                "Rebuild the teacher cache (delete `teacher_cache_dir`)"
                if cached
                else "Lower the learning rate or `distill_temperature`-sharpened logits overflow: try τ ≥ 0.5, "
                "bf16/fp32, or `max_grad_norm`.",
            ),
        )
        if fused.topk_ids is not None:
            self._store_or_compare_cache(keys, positions, covered, fused, mode)
        self._log_step_metrics(mode, inputs, fused, valid, covered, ce_sum, kl_sum, outputs, cached, use_cache)
        if return_outputs:
            with torch.no_grad():  # as SFTTrainer: the logits for `compute_metrics`, from an extra forward
                outputs = model(**model_inputs)
            return loss, outputs
        return loss

    def _loss_scales(self, label_mask, positions, num_items_in_batch):
        """Per-token weights of the CE and of the divergence, with SFTTrainer's normalisation of the CE.

        CE: Σ over label tokens / `num_items_in_batch` (tokens of the global batch; the micro-batch's own count when
        Trainer gives none), times the number of processes under `average_tokens_across_devices` (DDP averages the
        gradients). Divergence, scaled by λ·τ²: with `distill_scope="completion"` the same denominator as the CE; with
        `"all"` or `"prompt"` a mean over the micro-batch's covered positions, averaged over the accumulation steps.
        """
        args = self.args
        processes = self.accelerator.num_processes // self.get_tp_size()
        across = args.average_tokens_across_devices and num_items_in_batch is not None
        denominator = label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        ce_scale = (processes if across else 1) / torch.as_tensor(denominator).clamp(min=1)
        scale = self.distill_coef * args.distill_temperature**2
        if args.distill_scope == "completion" and num_items_in_batch is not None:
            distill_scale = scale * (processes if across else 1) / torch.as_tensor(num_items_in_batch).clamp(min=1)
        else:
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            distill_scale = scale / positions.sum().clamp(min=1) / steps
        device = label_mask.device
        return torch.as_tensor(ce_scale, device=device), torch.as_tensor(distill_scale, device=device)

    @staticmethod
    def _rows_from_positions(values: torch.Tensor, rows, positions, fill) -> torch.Tensor:
        """Cached per-position values (`[positions.sum(), k]`) laid out on `rows` ⊇ positions. The other rows (CE
        only, divergence weight 0) get `fill`, a finite stand-in (a uniform distribution for the log-probs)."""
        if torch.equal(rows, positions):
            return values
        out = values.new_full((int(rows.sum()), values.shape[1]), fill)
        out[positions[rows].to(out.device)] = values.to(out.device)
        return out

    def _store_or_compare_cache(self, keys, positions, covered, fused, mode) -> None:
        """Training: store the teacher's top-k per row. Eval (held-out batches): log the top-k KL beside the exact."""
        if mode == "train":
            ids, logps = fused.topk_ids[covered], fused.topk_logps[covered]
            counts = positions.sum(1).tolist()
            for key, row_ids, row_logps in zip(keys, ids.split(counts), logps.split(counts), strict=True):
                self.teacher_cache.put(key, row_ids, row_logps, epoch=int(self.state.epoch or 0))
            return
        gather = self.accelerator.gather_for_metrics
        count = gather(covered.sum()).sum().clamp(min=1)
        self._metrics[mode]["kl_topk"].append((gather(fused.topk_divergence[covered].sum()).sum() / count).item())

    def _log_step_metrics(self, mode, inputs, fused, valid, covered, ce_sum, kl_sum, outputs, cached, use_cache):
        """SFTTrainer's metrics (entropy, mean_token_accuracy, num_tokens, aux_loss) and the distillation ones, summed
        over processes in one gather and read in one host transfer (on a GPU, one sync instead of one per metric)."""
        parts = {
            "valid": valid.sum(),
            "entropy": torch.where(valid, fused.entropy, 0.0).sum(),
            "top1": (fused.is_top1 & valid).sum(),
            "ce": ce_sum,
            "kl": kl_sum,
            "covered": covered.sum(),
        }
        if mode == "train":
            if "attention_mask" in inputs:
                parts["tokens"] = inputs["attention_mask"].sum()
            else:
                parts["tokens"] = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
        if self.aux_loss_enabled:
            parts["aux_loss"] = outputs.aux_loss.detach()
        local = torch.stack([v.to(device=fused.ce.device, dtype=torch.float32) for v in parts.values()])
        gathered = self.accelerator.gather_for_metrics(local.unsqueeze(0)).tolist()  # [processes][len(parts)]
        sums = dict(
            zip(parts, map(math.fsum, zip(*gathered, strict=True)), strict=True)
        )  # summed in Python: counts stay exact past 2^24
        num_valid = sums["valid"]
        scale = self.distill_coef * self.args.distill_temperature**2
        metrics = self._metrics[mode]
        metrics["entropy"].append(sums["entropy"] / num_valid if num_valid else 0.0)
        metrics["mean_token_accuracy"].append(sums["top1"] / num_valid if num_valid else 0.0)
        if mode == "train":
            self._tokens_seen += int(sums["tokens"]) // self.get_tp_size()
        metrics["num_tokens"] = [self._tokens_seen]
        if self.aux_loss_enabled:
            metrics["aux_loss"].append(sums["aux_loss"] / len(gathered))  # the mean over processes
        metrics["sft_loss"].append(sums["ce"] / max(num_valid, 1))
        kl = sums["kl"] / max(sums["covered"], 1)
        metrics["kl"].append(kl)
        metrics["distill_loss"].append(scale * kl)
        metrics["distill_coef"].append(self.distill_coef)
        if use_cache:
            metrics["teacher_cache_hit"].append(float(cached is not None))
