"""`GuardedSFTTrainer`: TRL's `SFTTrainer` plus the guards every trainer of this package shares.

- What the user passed is checked before the model loads (`validation`: step counts, output folder, model path; an
  empty dataset), the data around SFTTrainer's preparation (`data_checks`: raw columns, then tokens) and the
  tokenizer's special ids after it.
- A non-finite loss stops training before that step's update, and non-finite weights are never saved: nothing on disk
  is overwritten by NaN/inf (`NonFiniteError`).
- The card is the package's (`model_card`), and a push uploads only the files this run saved (`hub`).
- `callbacks=[ForgettingCallback(...)]` is attached as `.attach(trainer)` would; `knowledge_monitor` is the
  callback whose results the card and `forgetting_results.json` report.

`SelfDistillSFTTrainer` adds the distillation term, `peers.L2InitSFTTrainer` a pull toward the initial weights. For
good inputs a `GuardedSFTTrainer` trains exactly as `SFTTrainer` does.
"""

import torch
from trl import SFTTrainer

from .data_checks import check_not_empty, check_prepared_dataset, check_raw_dataset, check_token_ids
from .distributed import local_shard
from .hub import push_checkpoint, push_to_hub, save_with_manifest
from .model_card import write_model_card
from .validation import check_model_source, check_output_dir, check_training_length

CE_FIX = (
    "Lower the learning rate, set `max_grad_norm`, use bf16/fp32 instead of fp16, and check the data of this batch."
)


class NonFiniteError(FloatingPointError):
    """A loss term, a teacher output or a weight about to be saved is NaN or infinite; training stops."""


def _is_conversational(dataset) -> bool:
    if dataset is None:
        return False
    from trl.data_utils import is_conversational

    try:
        return is_conversational(next(iter(dataset)))
    except StopIteration:
        return False


def nonfinite_parameters(model: torch.nn.Module, trainable_only: bool = False) -> list[str]:
    """Names of the parameters holding a NaN or an infinity (the local shard of a sharded parameter)."""
    bad = []
    for name, param in model.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        local = local_shard(param).detach()
        # min and max propagate NaN and ±inf, and need no copy of the tensor (`isfinite` makes ~1.7 of them)
        if local.numel() and not torch.isfinite(torch.stack(torch.aminmax(local))).all():
            bad.append(name)
    return bad


class GuardedSFTTrainer(SFTTrainer):
    """[`~trl.SFTTrainer`] with the package's input checks, NaN/inf guards, card and push (see the module)."""

    teacher = None  # no distillation teacher (a `SelfDistillSFTTrainer` with λ > 0 sets one)

    def __init__(self, model, args=None, **kwargs):
        if args is not None:
            check_training_length(args.max_steps, args.num_train_epochs)
            check_output_dir(args.output_dir)
        if isinstance(model, str):
            check_model_source(model, "model", tokenizer=kwargs.get("processing_class") is None,
                               model_init_kwargs=getattr(args, "model_init_kwargs", None))
        check_not_empty(kwargs.get("train_dataset"), "train")
        # Whether the raw training data is conversational: the format a knowledge monitor asks its facts in
        self.conversational = _is_conversational(kwargs.get("train_dataset"))
        super().__init__(model, args, **kwargs)
        check_token_ids(self)
        from .knowledge.callback import ForgettingCallback

        self.knowledge_monitor: ForgettingCallback | None = None  # the card's and results file's (`attach`)
        for callback in list(self.callback_handler.callbacks):  # `callbacks=[ForgettingCallback(...)]` ≡ `.attach`
            if isinstance(callback, ForgettingCallback) and callback.trainer is None:
                callback.attach(self)

    def _stop_if_nonfinite(self, *checks: tuple[torch.Tensor, str, str]) -> None:
        """Raise before the optimizer step when a checked value holds a NaN or an infinity (nothing saved is
        overwritten). Each check is (value, what it is, the fix to name); all are read in one host transfer (one GPU
        sync for all)."""
        device = checks[0][0].device
        finite = torch.stack([torch.isfinite(v.detach()).all().to(device) for v, _, _ in checks]).tolist()
        for ok, (_, term, fix) in zip(finite, checks, strict=True):
            if not ok:
                step, epoch = self.state.global_step, self.state.epoch or 0.0
                raise NonFiniteError(
                    f"Non-finite {term} at optimizer step {step + 1} (epoch {epoch:.2f}): training stopped before "
                    f"this step's update, so the weights in memory and every checkpoint saved so far are intact. {fix}"
                )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """SFTTrainer's loss, stopped before the step when it is NaN/inf."""
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self._stop_if_nonfinite((result[0] if return_outputs else result, "SFT loss (CE)", CE_FIX))
        return result

    # ----------------------------------------------------------------------------------------------------------------
    # Saving, model card and Hub

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """`Trainer.save_model`, refused when a trainable weight is NaN/inf (non-finite weights never overwrite a save)
        or when a folder stands where a file is written. Records the files it wrote, which a push uploads
        (`hub.save_with_manifest`)."""
        check_output_dir(output_dir or self.args.output_dir)
        bad = nonfinite_parameters(self.model, trainable_only=True)
        if bad:
            raise NonFiniteError(
                f"Refusing to save: {len(bad)} trainable tensors hold NaN/inf ({', '.join(bad[:3])}"
                f"{', ...' if len(bad) > 3 else ''}) at step {self.state.global_step}. What is on disk is kept. "
                "Resume "
                "from the last checkpoint with a lower learning rate, `max_grad_norm`, or bf16/fp32 instead of fp16."
            )
        save = super().save_model
        return save_with_manifest(self, lambda: save(output_dir, _internal_call), output_dir or self.args.output_dir)

    def end(self):
        """Release what training holds (transformers ≥ 5.18's `Trainer.end`); nothing to do on earlier versions."""
        parent = getattr(super(), "end", None)
        if parent is not None:
            parent()

    def create_model_card(self, model_name=None, dataset_name=None, tags=None, **_hub_kwargs):
        """The package's own card (method, freeze report, forgetting results), written to `output_dir`."""
        write_model_card(self, model_name=model_name, dataset_name=dataset_name, tags=tags)

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True, **kwargs):
        """Save the model, card and results in `output_dir` first, then upload; a failed upload loses nothing."""
        return push_to_hub(self, commit_message=commit_message, blocking=blocking, **kwargs)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # Trainer's checkpoint push uploads the whole output folder: send only the allowlisted files instead
        push_checkpoint(self, checkpoint_folder)

    # ----------------------------------------------------------------------------------------------------------------
    # Data

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        """SFTTrainer's preparation between two checks (`trl_selfdistill.data_checks`): raw columns, then tokens."""
        check_raw_dataset(dataset, args, formatting_func, dataset_name)
        raw_rows = len(dataset) if hasattr(dataset, "__len__") else None
        prepared = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        check_prepared_dataset(prepared, raw_rows, processing_class, args, packing, dataset_name)
        return prepared
