"""`ForgettingBudgetCallback`: hold forgetting to a stated budget by adapting λ during training, or stop at it."""


from accelerate.utils import broadcast_object_list
from transformers import TrainerCallback

from .data_checks import check_finite, check_real
from .knowledge.callback import ForgettingCallback, log_between_steps
from .knowledge.drift import DriftMeter

METRICS = ("forgetting", "drift_kl")
MODES = ("adapt", "stop", "adapt_or_stop")
LOG_PREFIX = "budget/"


def _check_number(name: str, value, fix: str) -> float:
    return check_finite(name, check_real(f"`{name}`", value, fix), fix)


class ForgettingBudgetCallback(TrainerCallback):
    r"""
    Holds a forgetting signal to `budget` during a `SelfDistillSFTTrainer` run by adapting λ (`trainer.distill_coef`,
    the weight of the distillation term), or stops training at the budget. Register it with `attach`:

        trainer = SelfDistillSFTTrainer(model=model, args=SelfDistillConfig(..., distill_coef=1.0), ...)
        forgetting = ForgettingCallback(splits, fmt=fmt, eval_steps=20, teacher=trainer.teacher).attach(trainer)
        ForgettingBudgetCallback(0.04, forgetting=forgetting).attach(trainer)  # stops at 4%: one interval under 5%

    The signal s (`metric`):

    - `"forgetting"`: relative forgetting of the held-out Known facts of `forgetting` (a `ForgettingCallback`), from
      the start of training: `forgetting_from_start` = (a₀ − a) / a₀, a₀ the held-out accuracy at the first evaluation
      (the model as training began), a the latest. A fraction: `budget=0.05` allows losing 5% of what the model
      answered at the start. From the start rather than from the peak because the budget bounds the loss of what the
      model knew when training began: forgetting from the peak also counts accuracy gained during training and lost
      again, and the peak, a maximum over noisy evaluations, drifts up with every evaluation.
    - `"drift_kl"`, when no fact set is at hand: the mean KL(reference ‖ model) of the next-token distribution at the
      end of prompts (the first answer token), in nats. Either the `drift_kl` that `forgetting` measures (its
      reference: its `teacher` when given, else the model as training began) or, with `prompts` instead of
      `forgetting`, a `DriftMeter` of this callback on those prompts (strings or chat messages, in the training
      format) every `eval_steps` optimizer steps, against the model as training began; `tokenizer` (default: the
      trainer's) and `batch_size` serve that meter.

    The controller acts after each new evaluation k ≥ 1 (evaluation 0, at the start, is the reference: recorded,
    never acted on), with B = `budget`, f = `factor`, ℓ = `low`, λ_k the λ of the steps after evaluation k:

        mode="adapt"           λ_k = min(f·λ_{k-1}, max_coef)   if s_k > B        (over budget: distil harder)
                               λ_k = max(λ_{k-1}/f, min_coef)   if s_k < ℓ·B      (far below: learn more freely)
                               λ_k = λ_{k-1}                    otherwise         (the band [ℓ·B, B] holds λ)
        mode="stop"            λ is never changed; training stops at the first k with s_k > B (the default: the
                               mode that held the budget when measured, docs/trainer.md "Which mode, measured")
        mode="adapt_or_stop"   as "adapt", but training stops at the first k with s_k > B while λ_{k-1} = max_coef
                               (λ can rise no further)

    λ moves on a log scale (by the factor f) inside [min_coef, max_coef]; it starts at the trainer's `distill_coef`.
    A stop takes effect after the optimizer step of the evaluation that exceeded the budget (`control.
    should_training_stop`), so the final model is over budget by what one evaluation interval forgot; save checkpoints
    at the evaluation steps to keep the last one within it. `"stop"` also works with a plain-SFT trainer (no teacher):
    it is early stopping at the budget.

    Logged through `trainer.log` at every evaluation, reference included: `budget/signal` (s_k), `budget/distill_coef`
    (λ_k) and `budget/exceeded` (1.0 when s_k > B, else 0.0). `.history` holds one dict per evaluation (`step`,
    `signal`, `distill_coef`, `exceeded`); `.stopped_at` is the step training stopped at for the budget, or None.
    The trainer's `args.distill_coef` keeps the configured λ. In a multi-process run every process reads the main
    process's signal, so they all take the same decision.
    """

    def __init__(
        self,
        budget: float,
        *,
        forgetting: ForgettingCallback | None = None,
        metric: str = "forgetting",
        mode: str = "stop",
        factor: float = 2.0,
        low: float = 0.5,
        min_coef: float = 0.125,
        max_coef: float = 8.0,
        prompts: list | None = None,
        eval_steps: int | None = None,
        tokenizer=None,
        batch_size: int = 16,
    ):
        if metric not in METRICS:
            raise ValueError(f"Unknown `metric={metric!r}`: choose one of {', '.join(METRICS)}.")
        if mode not in MODES:
            raise ValueError(f"Unknown `mode={mode!r}`: choose one of {', '.join(MODES)}.")
        budget = _check_number("budget", budget, "Pass the allowed forgetting, e.g. 0.05 (5% of the held-out facts).")
        if budget <= 0:
            raise ValueError(f"`budget` must be > 0, got {budget}: it is the forgetting allowed, e.g. 0.05.")
        if metric == "forgetting" and budget >= 1:
            raise ValueError(
                f"`budget={budget}` with `metric='forgetting'`: relative forgetting is a fraction (at most 1, all "
                "held-out facts lost), so this budget can never be exceeded. Pass a fraction, e.g. 0.05 for 5%."
            )
        self.factor = _check_number("factor", factor, "Use a float > 1, e.g. 2.0.")
        if self.factor <= 1:
            raise ValueError(f"`factor` must be > 1, got {factor}: λ is multiplied or divided by it. Use e.g. 2.0.")
        self.low = _check_number("low", low, "Use a float in (0, 1), e.g. 0.5.")
        if not 0 < self.low < 1:
            raise ValueError(
                f"`low` must lie strictly between 0 and 1, got {low}: λ is lowered while the signal is below "
                "`low`·budget. Use e.g. 0.5."
            )
        self.min_coef = _check_number("min_coef", min_coef, "Use a float > 0, e.g. 0.125.")
        self.max_coef = _check_number("max_coef", max_coef, "Use a float ≥ `min_coef`, e.g. 8.0.")
        if not 0 < self.min_coef <= self.max_coef:
            raise ValueError(
                f"Need 0 < min_coef ≤ max_coef, got min_coef={min_coef}, max_coef={max_coef}: λ moves by a factor "
                "between them (at 0 it could never rise again). Use e.g. min_coef=0.125, max_coef=8.0."
            )
        self._check_source(metric, forgetting, prompts, eval_steps, batch_size)
        self.budget, self.metric, self.mode = budget, metric, mode
        self.forgetting, self.prompts, self.eval_steps = forgetting, prompts, eval_steps
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.trainer = None
        self.history: list[dict] = []
        self.stopped_at: int | None = None
        self._meter: DriftMeter | None = None

    @staticmethod
    def _check_source(metric, forgetting, prompts, eval_steps, batch_size) -> None:
        """Where the signal comes from: a `ForgettingCallback`, or (drift only) prompts measured every `eval_steps`."""
        if forgetting is not None and not isinstance(forgetting, ForgettingCallback):
            raise TypeError(
                f"`forgetting` must be a ForgettingCallback, got a {type(forgetting).__name__}. Pass the "
                "`ForgettingCallback(splits, ...)` that evaluates the held-out facts."
            )
        if metric == "forgetting":
            if forgetting is None:
                raise ValueError(
                    "`metric='forgetting'` reads the held-out forgetting of a ForgettingCallback: pass "
                    "`forgetting=ForgettingCallback(splits, eval_steps=N, ...)`, or use `metric='drift_kl'` with "
                    "`prompts` when no fact set is at hand."
                )
            if prompts is not None or eval_steps is not None:
                raise ValueError(
                    "`prompts` and `eval_steps` set the drift meter of `metric='drift_kl'`; with "
                    "`metric='forgetting'` the ForgettingCallback evaluates (set `eval_steps` there). Drop them."
                )
            return
        if (forgetting is None) == (prompts is None):
            raise ValueError(
                "`metric='drift_kl'` needs exactly one source: `forgetting=` (a ForgettingCallback with "
                "`drift_size > 0`, whose `drift_kl` is read) or `prompts=` (measured here every `eval_steps`)."
            )
        if forgetting is not None:
            if not forgetting.drift_size:
                raise ValueError(
                    "`metric='drift_kl'` reads the ForgettingCallback's `drift_kl`, but it was built with "
                    "`drift_size=0` (no drift measured). Give it `drift_size > 0` (e.g. 64), or pass `prompts` here."
                )
            if eval_steps is not None:
                raise ValueError("`eval_steps` sets this callback's own drift meter; with `forgetting=` the "
                                 "ForgettingCallback evaluates (set `eval_steps` there). Drop it.")
            return
        if not prompts:
            raise ValueError("`prompts` is empty: pass the prompts whose next-token distribution must not drift.")
        if isinstance(eval_steps, bool) or not isinstance(eval_steps, int) or eval_steps < 1:
            raise ValueError(
                f"`prompts` are measured every `eval_steps` optimizer steps: pass an integer ≥ 1, got {eval_steps!r}."
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` (prompts per forward of the drift meter) must be an integer ≥ 1, got "
                             f"{batch_size!r}. Use e.g. 16.")

    @property
    def adapts(self) -> bool:
        """Whether this callback changes λ (modes "adapt" and "adapt_or_stop")."""
        return self.mode != "stop"

    def attach(self, trainer) -> "ForgettingBudgetCallback":
        """
        Register with `trainer`, after the callbacks it already has (so after an attached `ForgettingCallback`, whose
        evaluation of the same step it reads), and log through `trainer.log`. Refuses, before any training, a trainer
        without a teacher when λ is adapted, and a starting λ outside [min_coef, max_coef].
        """
        if self.adapts:
            if getattr(trainer, "teacher", None) is None:
                raise ValueError(
                    f"`mode={self.mode!r}` adapts λ, the weight of the distillation term, but this trainer has no "
                    "teacher (built with `distill_coef=0`, or not a SelfDistillSFTTrainer). Build a "
                    "SelfDistillSFTTrainer with `SelfDistillConfig(distill_coef=1.0)` (the starting λ), or use "
                    "`mode='stop'` to stop plain SFT at the budget."
                )
            if not self.min_coef <= trainer.distill_coef <= self.max_coef:
                raise ValueError(
                    f"The trainer's λ (`distill_coef={trainer.distill_coef}`) lies outside [min_coef, max_coef] = "
                    f"[{self.min_coef}, {self.max_coef}], where this callback keeps it. Widen the range or start from "
                    "a λ inside it."
                )
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.trainer is None:
            raise ValueError(
                "ForgettingBudgetCallback changes the trainer's λ and logs through it: register it with "
                "`ForgettingBudgetCallback(...).attach(trainer)`, not through `callbacks=[...]`."
            )
        self.history, self.stopped_at = [], None
        if self.forgetting is not None:
            self._check_forgetting_callback(args)
        else:
            tokenizer = self.tokenizer or processing_class
            if tokenizer is None:
                raise ValueError("ForgettingBudgetCallback needs a tokenizer for `prompts`: pass `tokenizer=` or give "
                                 "the trainer one.")
            self._meter = DriftMeter(self.prompts, tokenizer, self.batch_size, shard=True)  # every rank calls it
            self._meter.snapshot(model)
        self._record(state, control, model)

    def _check_forgetting_callback(self, args) -> None:
        """The ForgettingCallback evaluates before this callback reads it, during training, with a usable reference."""
        callbacks = self.trainer.callback_handler.callbacks
        if self.forgetting not in callbacks or callbacks.index(self.forgetting) > callbacks.index(self):
            raise ValueError(
                "The budget reads the ForgettingCallback's evaluation of each step, so that callback must be "
                "registered with the trainer before this one: call `forgetting.attach(trainer)` (it goes first)."
            )
        if self.forgetting.eval_steps is None and args.eval_strategy == "no":
            raise ValueError(
                "The ForgettingCallback evaluates only at the start and the end of training, so the budget could "
                "never act. Give it `eval_steps=N` (or set the trainer's `eval_strategy='steps'` and `eval_steps`)."
            )
        reference = self.forgetting.history[0]
        if self.metric == "forgetting" and not reference["heldout_known_accuracy"]:
            raise ValueError(
                f"The held-out Known accuracy at the start is {reference['heldout_known_accuracy']}, so relative "
                "forgetting is undefined and the budget cannot be measured. Check the held-out facts and the answer "
                "format (ForgettingCallback `num_shots`, docs/evaluation.md), or use `metric='drift_kl'`."
            )

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._meter is not None and state.global_step % self.eval_steps == 0 or self._forgetting_evaluated():
            self._record(state, control, model)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        # `Trainer.evaluate` during training: the ForgettingCallback (called first) may have evaluated this step
        if self.history and self._forgetting_evaluated():
            self._record(state, control, model)

    def _forgetting_evaluated(self) -> bool:
        """Whether the ForgettingCallback holds an evaluation this callback has not read yet."""
        return self.forgetting is not None and self.forgetting.history[-1]["step"] != self.history[-1]["step"]

    def _evaluation(self, state, model) -> tuple[int, float]:
        """The step and signal of the latest evaluation: the ForgettingCallback's, or one of the drift meter now."""
        if self._meter is not None:
            return state.global_step, self._meter(model)
        latest = self.forgetting.history[-1]
        if self.metric == "forgetting":
            return latest["step"], self.forgetting.final["forgetting_from_start"]
        return latest["step"], latest["drift_kl"]

    def _record(self, state, control, model) -> None:
        """Read the signal of the latest evaluation, update λ or stop (except at the reference), log, keep history."""
        step, signal = self._evaluation(state, model)
        if self.trainer.accelerator.num_processes > 1:
            signal = broadcast_object_list([signal])[0]  # the main process's value everywhere: one decision for all
        coef = getattr(self.trainer, "distill_coef", 0.0)
        exceeded = signal > self.budget
        if self.history:  # not the reference
            if exceeded and (self.mode == "stop" or (self.mode == "adapt_or_stop" and coef >= self.max_coef)):
                control.should_training_stop = True
                self.stopped_at = state.global_step
            elif self.adapts and exceeded:
                coef = min(coef * self.factor, self.max_coef)
            elif self.adapts and signal < self.low * self.budget:
                coef = max(coef / self.factor, self.min_coef)
            if self.adapts:
                self.trainer.distill_coef = coef
        entry = {"step": step, "signal": signal, "distill_coef": coef, "exceeded": exceeded}
        self.history.append(entry)
        logs = {"signal": signal, "distill_coef": coef, "exceeded": float(exceeded)}
        log_between_steps(self.trainer, model, control, {LOG_PREFIX + key: value for key, value in logs.items()})
