"""Configuration of the self-distillation trainer."""

import copy
import re
from dataclasses import dataclass, field
from typing import Literal

from trl import SFTConfig

from .data_checks import check_finite, check_numeric_fields

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
DISTILL_SCOPES = ("completion", "all", "prompt")
TEACHER_MODES = ("auto", "adapter_disabled", "adapter_copy", "model_copy")
# Keys of nested dicts (`model_init_kwargs`, ...) whose values are credentials
SECRET_KEYS = frozenset({"token", "hub_token", "use_auth_token", "api_key", "password"})
# A Hugging Face access token (also what the model card redacts)
HF_TOKEN = re.compile(r"hf_[A-Za-z0-9]{20,}")


def _without_secrets(value):
    """`value` with credentials dropped: secret dict keys set to None, Hugging Face tokens inside strings redacted."""
    if isinstance(value, str):
        return HF_TOKEN.sub("[REDACTED]", value)
    if isinstance(value, dict):
        return {k: None if k in SECRET_KEYS else _without_secrets(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_without_secrets(v) for v in value)
    return value


@dataclass
class SelfDistillConfig(SFTConfig):
    r"""
    [`~trl.SFTConfig`] plus the self-distillation term of arXiv 2604.15574:

        loss = CE(gold) + distill_coef · distill_temperature² · D(p_teacher^τ, p_student^τ)   (per token)

    The teacher is the frozen initial model (or a snapshot of it, see `teacher_mode`). With `distill_coef=0` the
    trainer is exactly [`~trl.SFTTrainer`] and runs no teacher forward.
    """

    distill_coef: float = field(
        default=1.0,
        metadata={"help": "λ, weight of the distillation term. 0 disables it (plain SFT, no teacher forward)."},
    )
    distill_temperature: float = field(
        default=2.0,
        metadata={
            "help": "τ, temperature applied to both teacher and student logits. The term is scaled by τ² so its "
            "gradient keeps the same magnitude across temperatures. Default 2.0 with `distill_scope='all'`: on "
            "genuine held-out facts of the embedded SmolLM2 it was the setting that cut forgetting below plain SFT's "
            "(docs/reproduction.md); the paper's 0.5 forgot as much as SFT or more there."
        },
    )
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = field(
        default="forward_kl",
        metadata={
            "help": "`forward_kl`: KL(teacher ‖ student), the paper's choice (mass-covering). `reverse_kl`: "
            "KL(student ‖ teacher) (mode-seeking). `jsd`: generalized Jensen-Shannon divergence "
            "β·KL(teacher ‖ m) + (1-β)·KL(student ‖ m) with m = β·teacher + (1-β)·student, β = `jsd_beta`."
        },
    )
    jsd_beta: float = field(
        default=0.5,
        metadata={
            "help": "β of the generalized JSD, strictly between 0 and 1 (at both ends the JSD is identically 0; use "
            "`divergence='forward_kl'` or `'reverse_kl'` instead). Only read when `divergence='jsd'`."
        },
    )
    distill_scope: Literal["completion", "all", "prompt"] = field(
        default="all",
        metadata={
            "help": "Positions the distillation term covers. `all` (default): every non-padding position, prompt "
            "included, the term averaged over them. `completion`: the positions the CE loss trains on (answer tokens "
            "for prompt-completion data), with the CE's denominator: on the new facts' answers the teacher's "
            "distribution fights the CE, and far fewer new facts were learned (docs/reproduction.md). "
            "`prompt`: the real positions the CE does not train on (the prompt), so the term constrains how the "
            "question is read and leaves the answer free to learn."
        },
    )
    teacher_mode: Literal["auto", "adapter_disabled", "adapter_copy", "model_copy"] = field(
        default="auto",
        metadata={
            "help": "Where the teacher comes from. `auto` picks by the model given: base model + `peft_config` → "
            "`adapter_disabled` (the same model with its adapter off, no second copy); an already-adapted PeftModel "
            "→ `adapter_copy` (its adapter copied once into a frozen `teacher` adapter: the snapshot recipe); full "
            "fine-tuning → `model_copy` (a frozen copy of the initial weights), or the model at "
            "`teacher_model_name_or_path` when that is set."
        },
    )
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local path of a teacher to load instead of copying the initial model (e.g. a stage-1 "
            "snapshot checkpoint). Its vocabulary must match the student's. Implies `teacher_mode='model_copy'`."
        },
    )

    teacher_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of an on-disk teacher cache: the teacher's top-k log-probs (plus the tail mass) per "
            "position, stored during the first epoch and reused in later ones instead of the teacher forward. A cache "
            "built for other data, tokenizer, teacher or settings is refused. None: always run the teacher."
        },
    )
    teacher_cache_topk: int = field(
        default=64,
        metadata={
            "help": "k of the teacher cache. The cached divergence is computed on k+1 bins (top-k and the tail), a "
            "lower bound of the exact one whose gap shrinks with the teacher's tail mass."
        },
    )

    teacher_cache_prefill: bool = field(
        default=False,
        metadata={
            "help": "Fill the teacher cache in a forward-only pre-pass over the training data before training "
            "(teacher only, larger batches), so that every epoch, the first included, reads the cache instead of "
            "running the teacher. Without it the first epoch runs the exact teacher and fills the cache."
        },
    )
    teacher_cache_prefill_batch_size: int = field(
        default=64,
        metadata={"help": "Examples per batch of the teacher pre-pass (no gradients are kept: larger than training)."},
    )
    loss_chunk_rows: int | None = field(
        default=None,
        metadata={
            "help": "Positions per chunk of the fused CE + divergence (each chunk builds the student's and the "
            "teacher's `[rows, V]` logits once). None: as many as fit 256 MiB of fp32 buffers "
            "(`trl_selfdistill.losses.FUSED_BUDGET_BYTES`), so small batches build their logits in one chunk; on a "
            "GPU at least 256 rows (`FUSED_MIN_ROWS_ACCELERATOR`). Lower it to save memory; results are the same up "
            "to rounding."
        },
    )
    cast_lm_head_to_fp32: bool = field(
        default=False,
        metadata={
            "help": "Under bf16/fp16 mixed precision (autocast), project the student's and the teacher's hidden "
            "states through the LM head in fp32 in the CE + divergence (slower on GPUs). Off: in the mixed-precision "
            "dtype, as SFTTrainer's own head does; the softmax and everything after it are fp32 either way. No effect "
            "where the weights themselves are bf16/fp16 (DeepSpeed). The teacher's forward always runs under the "
            "same autocast as the student's."
        },
    )
    card_base_model: str | None = field(
        default=None,
        metadata={
            "help": "The base model the model card names (a Hub id, in the card's `base_model` metadata). Default: "
            "the trained model's own name or path. Set it when the model was loaded from a local copy or a snapshot "
            "of a Hub model, so the card links the model it derives from."
        },
    )

    @classmethod
    def from_sft_config(cls, config, **distill_fields) -> "SelfDistillConfig":
        """
        A `SelfDistillConfig` with every field of `config` (an `SFTConfig`, or any `TrainingArguments`), plus
        `distill_fields` (e.g. `distill_coef=1.0`). Fields are read as set, not through `to_dict()`, which replaces
        `eos_token`/`pad_token` with placeholders that SFTTrainer then refuses.
        """
        from dataclasses import fields as dataclass_fields

        own = {f.name for f in dataclass_fields(cls) if f.init}
        values = {f.name: getattr(config, f.name) for f in dataclass_fields(config) if f.init and f.name in own}
        return cls(**{**values, **distill_fields})

    def __post_init__(self):
        check_numeric_fields(self)  # before any comparison: `distill_coef="1.0"` gets a TypeError naming the field
        # TRL's configs still default the old `gradient_checkpointing` name (True), which transformers 5 renamed
        # `activation_checkpointing` and warns about on every config: carry the value over, as transformers would
        if getattr(self, "activation_checkpointing", False) is None and self.gradient_checkpointing is not None:
            self.activation_checkpointing = self.gradient_checkpointing
        super().__post_init__()
        check_finite("distill_coef", self.distill_coef, "Use a float ≥ 0, e.g. 1.0 (paper), or 0 for plain SFT.")
        check_finite("distill_temperature", self.distill_temperature, "Use a float > 0, e.g. 0.5 (paper).")
        check_finite("jsd_beta", self.jsd_beta, "Use a float strictly between 0 and 1, e.g. 0.5.")
        if self.loss_chunk_rows is not None and (
            isinstance(self.loss_chunk_rows, bool)
            or not isinstance(self.loss_chunk_rows, int)
            or self.loss_chunk_rows < 1
        ):
            raise ValueError(f"`loss_chunk_rows` must be an integer ≥ 1 or None, got {self.loss_chunk_rows!r}.")
        if self.distill_coef < 0:
            raise ValueError(f"`distill_coef` (λ) must be ≥ 0, got {self.distill_coef}. Use 0 for plain SFT.")
        if self.distill_temperature <= 0:
            raise ValueError(
                f"`distill_temperature` (τ) must be > 0, got {self.distill_temperature}. The paper uses 0.5."
            )
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"Unknown `divergence={self.divergence!r}`: choose one of {', '.join(DIVERGENCES)}.")
        if self.divergence == "jsd" and not 0.0 < self.jsd_beta < 1.0:
            raise ValueError(
                f"`jsd_beta` must lie strictly between 0 and 1, got {self.jsd_beta}. At β=0 and β=1 the generalized "
                "JSD is identically 0: for the KL limits set `divergence='forward_kl'` or `divergence='reverse_kl'`."
            )
        if self.distill_scope not in DISTILL_SCOPES:
            raise ValueError(
                f"Unknown `distill_scope={self.distill_scope!r}`: choose one of {', '.join(DISTILL_SCOPES)}."
            )
        if self.teacher_mode not in TEACHER_MODES:
            raise ValueError(
                f"Unknown `teacher_mode={self.teacher_mode!r}`: choose one of {', '.join(TEACHER_MODES)}."
            )
        if self.teacher_cache_topk < 1:
            raise ValueError(f"`teacher_cache_topk` must be ≥ 1, got {self.teacher_cache_topk}; 64 is a good start.")
        if self.teacher_cache_prefill_batch_size < 1:
            raise ValueError(
                f"`teacher_cache_prefill_batch_size` must be ≥ 1, got {self.teacher_cache_prefill_batch_size}."
            )
        if self.teacher_cache_prefill and self.teacher_cache_dir is None:
            raise ValueError(
                "`teacher_cache_prefill=True` fills the teacher cache, but `teacher_cache_dir` is not set: "
                "set `teacher_cache_dir` to a folder, or drop `teacher_cache_prefill`."
            )
        if self.teacher_cache_dir is not None and self.distill_coef == 0:
            raise ValueError(
                "`teacher_cache_dir` is set but `distill_coef=0` runs no teacher. Unset `teacher_cache_dir`, or set "
                "`distill_coef > 0`."
            )
        if self.teacher_model_name_or_path is not None and self.teacher_mode in ("adapter_disabled", "adapter_copy"):
            raise ValueError(
                f"`teacher_model_name_or_path` loads a separate teacher model, which contradicts "
                f"`teacher_mode={self.teacher_mode!r}`. Drop one: set `teacher_mode='auto'` (or 'model_copy') to use "
                "the loaded teacher, or unset `teacher_model_name_or_path`."
            )

    def __getstate__(self) -> dict:
        """What pickling writes (`training_args.bin` in every checkpoint and output folder): no credentials.

        `hub_token` is dropped, `token`-like keys of nested dicts (e.g. `model_init_kwargs`) are set to None, and
        Hugging Face tokens inside any string are redacted. The live object keeps them for the upload itself.
        """
        state = {key: _without_secrets(value) for key, value in self.__dict__.items()}
        state["hub_token"] = None
        return state

    def __copy__(self):
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo):
        # A copy in memory keeps the credentials (only what is pickled to disk drops them)
        new = object.__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    @property
    def divergence_beta(self) -> float:
        """β in TRL's chunked-divergence convention: 0 = forward KL, 1 = reverse KL, in between the JSD."""
        return {"forward_kl": 0.0, "reverse_kl": 1.0}.get(self.divergence, self.jsd_beta)
