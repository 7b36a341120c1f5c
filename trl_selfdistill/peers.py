"""The peer methods the paper protocol compares self-distillation SFT with, each called through its public API.

Every factory has the signature

    factory(model: str, args: SelfDistillConfig, train_dataset, processing_class, **options) -> transformers.Trainer

`model` is the path of the snapshot S (a saved causal LM + tokenizer folder), `args` the run's common settings (output
folder, steps, batch, learning rate, scheduler, seed, device, logging), `train_dataset` plain-text TRL
prompt/completion rows (`AnswerFormat.training_dataset`: prompt ``"Q: <question>\\nA:"``, completion
``" <answer>\\n"``) and `processing_class` the tokenizer. The trainer returned is ready for
``ForgettingCallback(...).attach(trainer)`` and ``trainer.train()``. Options a factory does not know are refused with
the list of those it knows.

`PEERS` maps each name to its factory; `peer_settings(name, **options)` gives the settings of a run for a results
table. See docs/peers.md for what each peer is, the settings chosen and why, and what cannot run.
"""

import copy
import dataclasses
import math
from collections.abc import Callable

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
from trl import SFTConfig

from .base_trainer import GuardedSFTTrainer
from .config import SelfDistillConfig
from .trainer import SelfDistillSFTTrainer

# ---------------------------------------------------------------------------------------------------------------------
# Shared pieces


def common_fields(args: TrainingArguments, base: type[TrainingArguments]) -> dict:
    """Every `__init__` field of `base` (TrainingArguments or SFTConfig) as set on `args`: steps, batch, learning
    rate, scheduler, seed, device, precision, logging, saving... carried over unchanged to a peer's own config. The
    values are copies: a peer that edits its config (GKD sets `dataset_kwargs`) leaves `args` as it was."""
    return {
        f.name: copy.deepcopy(getattr(args, f.name))
        for f in dataclasses.fields(base)
        if f.init and hasattr(args, f.name)
    }


def _check_args(args, peer: str) -> None:
    if not isinstance(args, SelfDistillConfig):
        raise TypeError(
            f"The `{peer}` peer takes the run's settings as a SelfDistillConfig, got {type(args).__name__}. Build one "
            "with `SelfDistillConfig(output_dir=..., max_steps=..., ...)`."
        )


def _check_prompt_completion(train_dataset, peer: str) -> None:
    """Refuse anything but plain-text prompt/completion rows, before any model is loaded."""
    columns = set(getattr(train_dataset, "column_names", None) or ())
    if not {"prompt", "completion"} <= columns:
        raise ValueError(
            f"The `{peer}` peer takes prompt/completion rows (columns `prompt` and `completion`), got columns "
            f"{sorted(columns)}. Build them with `AnswerFormat().training_dataset(facts)`."
        )
    first = train_dataset[0]
    if not isinstance(first["prompt"], str) or not isinstance(first["completion"], str):
        raise ValueError(
            f"The `{peer}` peer takes plain-text prompts and completions, got {type(first['prompt']).__name__} "
            "prompts (chat messages?). Use `AnswerFormat(chat=False)`, the paper's format."
        )


def tokenize_like_sft(train_dataset: Dataset, tokenizer) -> Dataset:
    """Plain-text prompt/completion rows as the tokens `SFTTrainer` trains on: ``prompt + completion + eos``
    tokenized in one piece, `completion_mask` 1 from where it stops matching the tokenized prompt alone (TRL's
    `common_prefix_length` rule). The `prompt` column is kept (GKD's collator reads it)."""

    def tokenize(row):
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        completion = row["completion"]
        if not completion.endswith(tokenizer.eos_token):
            completion += tokenizer.eos_token
        ids = tokenizer(row["prompt"] + completion)["input_ids"]
        prefix = 0
        while prefix < min(len(prompt_ids), len(ids)) and prompt_ids[prefix] == ids[prefix]:
            prefix += 1
        return {"input_ids": ids, "completion_mask": [0] * prefix + [1] * (len(ids) - prefix)}

    return train_dataset.map(tokenize, remove_columns=[c for c in train_dataset.column_names if c != "prompt"])


def _check_options(peer: str, options: dict, known: dict) -> dict:
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(
            f"Unknown option(s) {', '.join(unknown)} for the `{peer}` peer; it takes {', '.join(sorted(known))}."
        )
    return {**known, **options}


# Each peer's options and their defaults (what its factory takes), and the settings it fixes
DEFAULTS: dict[str, dict] = {
    "l2init": {"l2init_coef": 1.0},
    "gkd": {"teacher_model": None, "lmbda": 0.0, "beta": 0.0},
    "sdft": {
        "num_generations": 1,
        "max_completion_length": 16,
        "stop": "\n",
        "teacher_prompt_template": "{privileged_context}{prompt}",
        "temperature": 1.0,
        "distillation_mode": "topk_logits",
        "distillation_topk": 100,
        "distillation_alpha": 0.5,
    },
}
FIXED: dict[str, dict] = {
    "l2init": {"penalty": "sum of squared differences to the initial weights", "ce": True},
    "gkd": {"divergence": "forward KL(teacher||student)", "loss_temperature": 1.0, "ce": False, "seq_kd": False},
    "sdft": {"teacher_model_kind": "base", "ce": False},
}


def initial_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """θ₀: a detached copy of every trainable weight, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def squared_distance(model: torch.nn.Module, initial: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ (θ − θ₀)² over the weights of `model` named in `initial`, differentiable."""
    total = None
    for name, param in model.named_parameters():
        if name in initial:
            term = (param - initial[name].to(param.device)).pow(2).sum()
            total = term if total is None else total + term
    if total is None:
        raise ValueError("No trainable parameter of the model matches the initial copy; nothing to pull back.")
    return total


# ---------------------------------------------------------------------------------------------------------------------
# l2init: SFT + μ·‖θ − θ₀‖²


class L2InitSFTTrainer(GuardedSFTTrainer):
    r"""
    Plain SFT plus a pull toward the initial weights θ₀ (the paper's control):

        loss = CE(gold) + μ · Σ_i (θ_i − θ₀,i)²      over every trainable parameter entry i

    θ₀ is a copy of the trainable weights when the trainer is built (the snapshot S). The penalty is a **sum** of
    squared differences, not a mean: its gradient on each weight is 2μ(θ_i − θ₀,i), a spring of the same stiffness on
    every weight whatever the model size (a mean would divide that pull by the parameter count, 135M for SmolLM2, so
    μ would have to grow with the model). How μ scales: with SGD the pull shrinks θ − θ₀ by a factor (1 − 2·lr·μ)
    per step; with AdamW (the default) the update is normalised per weight, so what matters is the penalty's gradient,
    norm 2μ‖θ − θ₀‖, against the CE gradient: μ acts on a log scale and is swept (docs/peers.md: 0.1, 1, 10, 100 on
    SmolLM2-135M, from its measured gradient norms). μ = 0 is exactly `SFTTrainer` (the distance is logged, no
    penalty is added). With gradient accumulation the penalty is added once per optimizer step. Logged:
    `l2init_penalty` (μ·Σ(θ−θ₀)², the term added) and `l2init_sq_distance` (Σ(θ−θ₀)²).
    Single process or DDP only: the copy of θ₀ is taken before DeepSpeed/FSDP shard the weights, so those are refused.
    """

    _tag_names = ["trl", "sft", "l2-init", "trl-selfdistill"]

    def __init__(self, model, args: SFTConfig, l2init_coef: float, **kwargs):
        number = isinstance(l2init_coef, (int, float)) and not isinstance(l2init_coef, bool)
        if not number or not 0 <= l2init_coef < math.inf:
            raise ValueError(
                f"`l2init_coef` (μ) must be a finite number ≥ 0, got {l2init_coef!r}. Use 0 for plain SFT."
            )
        if getattr(args, "distill_coef", 0):
            raise ValueError(
                f"L2InitSFTTrainer is SFT plus an L2 pull, but `distill_coef={args.distill_coef}` would add the "
                "distillation term too. Set `distill_coef=0` (the `l2init` factory does)."
            )
        super().__init__(model, args, **kwargs)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(
                "The `l2init` peer keeps a full copy of the initial weights, which does not match the shards "
                "DeepSpeed/FSDP train. Run it on one process or with DDP."
            )
        self.l2init_coef = float(l2init_coef)
        self.initial_weights = initial_copy(self.model)

    def squared_distance(self, model: torch.nn.Module | None = None) -> torch.Tensor:
        """Σ (θ − θ₀)² over the trainable weights of `model` (default: the trained model), differentiable."""
        return squared_distance(self.model if model is None else model, self.initial_weights)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.l2init_coef > 0):  # μ = 0: logged, not trained
            distance = self.squared_distance()
        penalty = self.l2init_coef * distance
        self._metrics[mode]["l2init_penalty"].append(penalty.item())
        self._metrics[mode]["l2init_sq_distance"].append(distance.item())
        if self.l2init_coef == 0:
            return result
        # Trainer sums the micro-batch losses of one step when it passes `num_items_in_batch` (and divides them itself
        # otherwise): the penalty is then split over the micro-batches so it counts once per optimizer step
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None and model.training else 1
        penalty = penalty / steps
        if return_outputs:
            return result[0] + penalty, result[1]
        return result + penalty


def l2init(model: str, args: SelfDistillConfig, train_dataset, processing_class, **options) -> Trainer:
    """SFT + μ·Σ(θ − θ₀)² (`L2InitSFTTrainer`). Option: `l2init_coef` (μ, default 1). `args.distill_coef` is set
    to 0 on a copy of `args`; everything else is used as given."""
    _check_args(args, "l2init")
    opts = _check_options("l2init", options, DEFAULTS["l2init"])
    run_args = copy.copy(args)
    run_args.distill_coef = 0.0
    run_args.teacher_cache_dir = None  # no teacher: nothing to cache
    return L2InitSFTTrainer(
        model, run_args, opts["l2init_coef"], train_dataset=train_dataset, processing_class=processing_class
    )


# ---------------------------------------------------------------------------------------------------------------------
# l2match: SFT + an L2 pull whose gradient norm is the distillation term's, step by step


class MatchedL2SFTTrainer(SelfDistillSFTTrainer):
    r"""
    The paper's control for self-distillation: SFT plus a pull toward the start S, as strong as the distillation term
    would be, but blind to what the model outputs:

        loss = CE(gold) + μ_t · Σ_i (θ_i − θ₀,i)²,   μ_t = ‖∇_θ λτ²·KL_t‖ / (2‖θ − θ₀‖)   (μ_t detached)

    KL_t is `SelfDistillSFTTrainer`'s distillation term on the same micro-batch (teacher S, the run's `distill_coef`,
    `distill_temperature`, `distill_scope`), measured and never trained: its gradient norm sets μ_t so that the pull's
    gradient, 2μ_t(θ − θ₀), has the same norm at every step. If that control forgets as little as self-distillation,
    the KL protects knowledge as any anchor would; if it forgets more, the KL's direction (toward the teacher's
    outputs) matters. θ₀ is the trainable weights when the trainer is built, S itself (for an adapter: the adapter's
    start, the teacher being the base with the adapter off); under full fine-tuning it is read from the teacher, the
    frozen copy of S, not copied again. At θ = θ₀ (the first step) μ_t = 0.

    Each training micro-batch costs one teacher forward, two student forwards and two backward passes (one for the
    KL's gradient, one for the loss). Evaluation computes `SelfDistillSFTTrainer`'s loss. Logged: `l2match_coef`
    (μ_t), `l2match_kl_grad_norm` (‖∇ λτ²KL_t‖), `l2init_sq_distance` (Σ(θ−θ₀)²) and the distillation metrics. One
    process only: the two forwards before one backward do not fit DDP's gradient hooks.
    """

    _tag_names = ["trl", "sft", "l2-init", "trl-selfdistill"]

    def __init__(self, model, args: SelfDistillConfig, **kwargs):
        if not getattr(args, "distill_coef", 0) > 0:
            raise ValueError(
                "MatchedL2SFTTrainer matches the pull to the distillation term's gradient, which needs "
                f"`distill_coef` > 0 (got {getattr(args, 'distill_coef', None)}). Use 1.0 (paper), or plain SFT."
            )
        if args.world_size > 1:
            raise ValueError(
                f"MatchedL2SFTTrainer runs on one process (this launch has {args.world_size}): its two forwards per "
                "micro-batch do not fit DDP's gradient hooks. Launch it without accelerate."
            )
        super().__init__(model, args, **kwargs)
        self.initial_weights = self._initial_weights()
        self._weights = (1.0, 1.0)  # (CE, distillation) multipliers of the parent's loss scales
        self._teacher_states = None  # during a training micro-batch: the teacher's hidden states, computed once

    def _initial_weights(self) -> dict[str, torch.Tensor]:
        """θ₀. Under full fine-tuning the teacher is already a frozen copy of S with the same parameter names: its
        weights are θ₀, and no third copy of the model is made. Otherwise (an adapter, another teacher) a copy."""
        if self.teacher.kind == "model_copy" and self.args.teacher_model_name_or_path is None:
            frozen = dict(self.teacher.model.named_parameters())
            trainable = [n for n, p in self.model.named_parameters() if p.requires_grad]
            if all(n in frozen for n in trainable):
                return {n: frozen[n] for n in trainable}
        return initial_copy(self.model)

    def _loss_scales(self, label_mask, positions, num_items_in_batch):
        ce, distill = super()._loss_scales(label_mask, positions, num_items_in_batch)
        return ce * self._weights[0], distill * self._weights[1]

    def _log_step_metrics(self, *args, **kwargs):
        if self._weights[1]:  # the CE pass (distillation weight 0) logs nothing: the measured pass logged the step
            super()._log_step_metrics(*args, **kwargs)

    def _teacher_hidden(self, inputs: dict) -> torch.Tensor:
        if self._teacher_states is None:
            return super()._teacher_hidden(inputs)
        if not self._teacher_states:
            self._teacher_states.append(super()._teacher_hidden(inputs))
        return self._teacher_states[0]

    def _term(self, model, inputs, num_items_in_batch, ce: float, distill: float) -> torch.Tensor:
        """The parent's loss with its CE and distillation terms weighted by `ce` and `distill`."""
        self._weights = (ce, distill)
        try:
            return super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        finally:
            self._weights = (1.0, 1.0)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        trainable = [p for p in model.parameters() if p.requires_grad]
        self._teacher_states = []  # one teacher forward serves both passes
        try:
            distill = self._term(model, inputs, num_items_in_batch, ce=0.0, distill=1.0)  # logs the step
            grads = torch.autograd.grad(distill, trainable, allow_unused=True)
            kl_norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads if g is not None))
            loss = self._term(model, inputs, num_items_in_batch, ce=1.0, distill=0.0)
        finally:
            self._teacher_states = None
        distance = squared_distance(model, self.initial_weights)
        with torch.no_grad():
            norm = 2 * distance.detach().double().sqrt()
            coef = (kl_norm / norm).float() if norm > 0 else torch.zeros((), device=loss.device)
        metrics = self._metrics["train"]
        metrics["l2match_coef"].append(coef.item())
        metrics["l2match_kl_grad_norm"].append(kl_norm.item())
        metrics["l2init_sq_distance"].append(distance.item())
        return loss + coef.to(loss.device) * distance


# ---------------------------------------------------------------------------------------------------------------------
# gkd: TRL's GKDTrainer, off-policy, forward KL


def gkd(model: str, args: SelfDistillConfig, train_dataset, processing_class, **options) -> Trainer:
    """
    TRL's `GKDTrainer` (`trl.experimental.gkd`), off-policy, forward KL, teacher = a separate frozen copy.

    Settings: `lmbda=0` (never the student's generations: the gold completions only), `seq_kd=False`, `beta=0`:
    in TRL's `generalized_jsd_loss`, β = 0 is `F.kl_div(student_logp, teacher_logp, log_target=True)` =
    Σ p_teacher (log p_teacher − log p_student) = KL(teacher ‖ student), the forward KL of the paper (β = 1 is the
    reverse KL). The loss is that KL alone, per completion token; there is no CE on the gold answer. Temperature: the
    loss is computed at temperature 1 whatever the config (`GKDTrainer.compute_loss` does not pass
    `GKDConfig.temperature`, which only sets the sampling temperature, unused with `lmbda=0`), so τ cannot be matched.
    Every `TrainingArguments`/`SFTConfig` field of `args` is carried over (steps, batch, lr, scheduler, seed, device,
    logging).

    Options: `teacher_model` (path of the teacher, default `model`, i.e. S), `lmbda` (0), `beta` (0).

    With the default teacher (S itself) the student starts equal to the teacher, so the loss is 0 at the first step
    and the gold answers are never a target: this peer cannot learn new facts; it is in the table as the
    "distillation without CE" point. A teacher that knows the facts (e.g. the SFT run's final model) makes it
    learn them from that teacher.

    Data: the rows are tokenized exactly as `SFTTrainer` tokenizes them (`tokenize_like_sft`; no chat template), and
    GKD's collator takes those `input_ids`/`completion_mask` as they are.
    """
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    _check_args(args, "gkd")
    _check_prompt_completion(train_dataset, "gkd")
    opts = _check_options("gkd", options, DEFAULTS["gkd"])
    teacher = model if opts["teacher_model"] is None else opts["teacher_model"]
    config = GKDConfig(**common_fields(args, SFTConfig), lmbda=opts["lmbda"], beta=opts["beta"], seq_kd=False)
    student = AutoModelForCausalLM.from_pretrained(model, **(args.model_init_kwargs or {}))
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher, **(args.model_init_kwargs or {}))
    teacher_model.requires_grad_(False)
    return GKDTrainer(
        model=student,
        teacher_model=teacher_model,
        args=config,
        train_dataset=tokenize_like_sft(train_dataset, processing_class),
        processing_class=processing_class,
    )


# ---------------------------------------------------------------------------------------------------------------------
# sdft: TRL's SDFTTrainer, on-policy self-distillation with the answer shown to the teacher


def sdft_dataset(train_dataset: Dataset, shot_separator: str = "\n") -> Dataset:
    """Prompt/completion rows → SDFT's `prompt`/`privileged_context`: the privileged context is the fact itself as a
    one-shot demonstration (``prompt + completion + shot_separator``, i.e. ``"Q: <q>\\nA: <a>\\n\\n"``), which the
    teacher template ``"{privileged_context}{prompt}"`` puts before the question: the few-shot format of
    `AnswerFormat.prompt_for` with one shot."""
    return train_dataset.map(
        lambda row: {
            "prompt": row["prompt"],
            "privileged_context": row["prompt"] + row["completion"] + shot_separator,
        },
        remove_columns=train_dataset.column_names,
    )


def sdft(model: str, args: SelfDistillConfig, train_dataset, processing_class, **options) -> Trainer:
    """
    TRL's `SDFTTrainer` (`trl.experimental.sdft`): the student samples a completion for the plain prompt, the teacher
    (the frozen S, `teacher_model_kind="base"`, TRL's default, "matching the paper" per its docs) scores the same
    tokens with the fact shown before the question, and the student is distilled toward it. No CE term, no PEFT
    needed (full fine-tuning keeps a second frozen copy of S, loaded from `model`).

    Settings (TRL's defaults unless said): `distillation_mode="topk_logits"`, `distillation_topk=100`,
    `distillation_alpha=0.5`, `distillation_is_clip=2.0`, temperature 1.0 (it divides the logits of sampling and of
    both sides of the divergence, so τ cannot be set alone); `num_generations` 1 instead of TRL's 8 (so a step of
    batch B sees B different facts, as every other method does; with 8, B/8 facts per step),
    `max_completion_length` 16 instead of 256 (answers are a few tokens) and generation stops at the answer format's
    end of line as well as at EOS (the `stop` option). Every `TrainingArguments` field of `args` is carried over.

    Options: `num_generations` (1), `max_completion_length` (16), `stop` ("\\n"; None: EOS only),
    `teacher_prompt_template` ("{privileged_context}{prompt}"), `temperature` (1.0), `distillation_mode`,
    `distillation_topk`, `distillation_alpha`.
    """
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    _check_args(args, "sdft")
    _check_prompt_completion(train_dataset, "sdft")
    opts = _check_options("sdft", options, DEFAULTS["sdft"])
    config = SDFTConfig(
        **common_fields(args, TrainingArguments),
        num_generations=opts["num_generations"],
        max_completion_length=opts["max_completion_length"],
        teacher_prompt_template=opts["teacher_prompt_template"],
        temperature=opts["temperature"],
        distillation_mode=opts["distillation_mode"],
        distillation_topk=opts["distillation_topk"],
        distillation_alpha=opts["distillation_alpha"],
        teacher_model_kind="base",
    )
    stop_ids = []
    if opts["stop"] is not None:
        stop_ids = processing_class(opts["stop"], add_special_tokens=False)["input_ids"]
        if len(stop_ids) != 1:
            raise ValueError(
                f"`stop={opts['stop']!r}` is {len(stop_ids)} tokens for this tokenizer; generation can only stop at a "
                "single token. Pass a one-token `stop`, or `stop=None` to stop at EOS only (then raise "
                "`max_completion_length`)."
            )
    student = AutoModelForCausalLM.from_pretrained(model, **(args.model_init_kwargs or {}))
    # SDFTTrainer stops generation, and ends the completion it distills on, at every EOS id of the generation config
    eos = student.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    student.generation_config.eos_token_id = [*eos, *[i for i in stop_ids if i not in eos]] or None
    return SDFTTrainer(
        model=student,
        args=config,
        train_dataset=sdft_dataset(train_dataset),
        processing_class=processing_class,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Registry

PeerFactory = Callable[..., Trainer]

PEERS: dict[str, PeerFactory] = {"l2init": l2init, "gkd": gkd, "sdft": sdft}
"""
Name → factory ``(model: str, args: SelfDistillConfig, train_dataset, processing_class, **options) -> Trainer``.

- `l2init`: SFT + μ·Σ(θ−θ₀)² (the paper's control). Same lr/steps as SFT. A fair user sweeps μ on a log scale
  (option `l2init_coef`, e.g. 0.1, 1, 10, 100 on SmolLM2-135M) and reads it at matched new-fact accuracy.
- `gkd`: TRL's GKDTrainer, off-policy (`lmbda=0`), forward KL (`beta=0`), teacher a frozen copy of S. Same
  lr/steps/batch as SFT; the KL is at temperature 1 (GKD's loss has no temperature). With teacher S the loss starts
  at 0 and there is no CE: it cannot learn the new facts (option `teacher_model` for another teacher).
- `sdft`: TRL's SDFTTrainer with `teacher_model_kind="base"` and TRL's loss defaults; the fact is shown to the teacher
  as a one-shot demonstration; one generation per prompt, 16 new tokens at most, stop at end of line. Generation makes
  a step several times slower than SFT on CPU (docs/peers.md). TRL's example uses lr 2e-5 for a 0.8B model; a fair
  user keeps the run's lr or tries a few.
"""


def peer_settings(name: str, **options) -> dict:
    """The settings a run of peer `name` uses, defaults filled in by `options`, for the results table (options a peer
    does not take are refused, as its factory would)."""
    if name not in PEERS:
        raise KeyError(f"Unknown peer {name!r}; the peers are {', '.join(PEERS)}.")
    return {**_check_options(name, options, DEFAULTS[name]), **FIXED[name]}
