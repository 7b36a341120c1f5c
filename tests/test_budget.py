"""ForgettingBudgetCallback: the λ controller, stopping at the budget, the drift signal, refusals; the runtime λ."""

import math
import re

import pytest
from conftest import config, make_tokenizer, prompt_completion_dataset, tiny_model
from test_knowledge_callback import make_splits
from trl import SFTConfig, SFTTrainer

from trl_selfdistill import ForgettingBudgetCallback, ForgettingCallback, SelfDistillSFTTrainer


class ScriptedForgetting(ForgettingCallback):
    """A ForgettingCallback whose evaluations (every `eval_steps`) read held-out accuracies and drifts from a list."""

    def __init__(self, heldout, drift=None, eval_steps=1):
        super().__init__(make_splits(), eval_steps=eval_steps, drift_size=1)
        self.script = list(zip(heldout, drift or [None] * len(heldout), strict=True))

    def on_train_begin(self, args, state, control, **kwargs):
        self.history = []
        self._append(state)

    def on_step_end(self, args, state, control, **kwargs):
        if self.eval_steps and state.global_step % self.eval_steps == 0:
            self._append(state)

    def on_evaluate(self, args, state, control, **kwargs):
        if self.history[-1]["step"] != state.global_step:
            self._append(state)

    def on_train_end(self, *args, **kwargs):
        pass

    def _append(self, state):
        heldout, drift = self.script[len(self.history)]
        self.history.append({"step": state.global_step, "task_accuracy": None, "new_fact_accuracy": None,
                             "heldout_known_accuracy": heldout, "drift_kl": drift})


def make_trainer(tmp_path, eval_dataset=None, **overrides):
    return SelfDistillSFTTrainer(
        model=tiny_model(), args=config(tmp_path, **overrides), train_dataset=prompt_completion_dataset(),
        eval_dataset=eval_dataset, processing_class=make_tokenizer(),
    )


def run(tmp_path, budget_kwargs, heldout, drift=None, max_steps=None, eval_dataset=None, eval_steps=1, **overrides):
    trainer = make_trainer(tmp_path, max_steps=max_steps or len(heldout) - 1, eval_dataset=eval_dataset, **overrides)
    forgetting = ScriptedForgetting(heldout, drift, eval_steps).attach(trainer)
    budget = ForgettingBudgetCallback(forgetting=forgetting, **budget_kwargs).attach(trainer)
    trainer.train()
    return trainer, budget


def logged(trainer, key):
    return [(log["step"], log[key]) for log in trainer.state.log_history if key in log]


def test_lambda_rises_over_budget_falls_far_below_and_reaches_the_loss(tmp_path):
    # Forgetting from the start (a₀ = 0.8): 0.25, 0.375, 0.025, 0.075, 0.0, 0.0, 0.25 against a budget of 0.1
    heldout = [0.8, 0.6, 0.5, 0.78, 0.74, 0.8, 0.8, 0.6]
    # τ = 0.5: sharp distributions, so the KL is large enough to check the term's scaling on
    trainer, budget = run(tmp_path, dict(budget=0.1, mode="adapt", max_coef=4.0, min_coef=0.5), heldout,
                          distill_temperature=0.5)
    # Over: ×2; far below (< 0.05): ÷2; in the band [0.05, 0.1]: held; clamped to [0.5, 4]
    expected = [1.0, 2.0, 4.0, 2.0, 2.0, 1.0, 0.5, 1.0]
    assert [entry["distill_coef"] for entry in budget.history] == expected
    assert [entry["step"] for entry in budget.history] == list(range(8))
    assert [entry["signal"] for entry in budget.history] == pytest.approx([0, .25, .375, .025, .075, 0, 0, .25])
    assert [entry["exceeded"] for entry in budget.history] == [False, True, True, False, False, False, False, True]
    assert budget.stopped_at is None and trainer.state.global_step == 7
    assert trainer.distill_coef == 1.0 and trainer.args.distill_coef == 1.0  # args keep the configured λ
    # Each step's loss used the λ set at the evaluation before it, and the term scaled with it (λ·τ²·KL)
    assert [coef for _, coef in logged(trainer, "distill_coef")] == expected[:-1]
    for log in trainer.state.log_history:
        if "kl" in log:
            tau = trainer.args.distill_temperature
            assert log["distill_loss"] == pytest.approx(log["distill_coef"] * tau**2 * log["kl"], rel=1e-6)
            assert log["loss"] == pytest.approx(log["sft_loss"] + log["distill_loss"], rel=1e-6)  # what was optimised
    assert max(log["kl"] for log in trainer.state.log_history if "kl" in log) > 0.1
    assert logged(trainer, "budget/distill_coef") == list(enumerate(expected))
    assert [exceeded for _, exceeded in logged(trainer, "budget/exceeded")] == [0, 1, 1, 0, 0, 0, 0, 1]
    assert len(logged(trainer, "budget/signal")) == 8


@pytest.mark.parametrize(
    "mode, max_coef, stop_step, coefs",
    [
        ("stop", 8.0, 2, [1.0, 1.0, 1.0]),  # λ fixed; the first excess (step 2) stops
        ("adapt_or_stop", 2.0, 3, [1.0, 1.0, 2.0, 2.0]),  # step 2 raises λ to its maximum, step 3 stops
        ("adapt", 2.0, None, [1.0, 1.0, 2.0, 2.0, 2.0, 2.0]),  # never stops, λ stays at its maximum
    ],
)
def test_stop_modes(tmp_path, mode, max_coef, stop_step, coefs):
    heldout = [0.8, 0.74, 0.6, 0.6, 0.6, 0.6]  # forgetting 0.075 (in the band), then 0.25 (over a budget of 0.1)
    trainer, budget = run(tmp_path, dict(budget=0.1, mode=mode, max_coef=max_coef), heldout)
    assert budget.stopped_at == stop_step
    assert trainer.state.global_step == (stop_step or 5)
    assert [entry["distill_coef"] for entry in budget.history] == coefs


def test_stop_mode_the_default_stops_plain_sft_at_the_budget(tmp_path):
    # "stop" is the default: the mode that held the budget in docs/trainer.md's measurements
    trainer, budget = run(tmp_path, dict(budget=0.1), [0.8, 0.8, 0.6, 0.6], distill_coef=0.0)
    assert budget.mode == "stop"
    assert trainer.teacher is None and budget.stopped_at == 2 == trainer.state.global_step
    assert [entry["distill_coef"] for entry in budget.history] == [0.0, 0.0, 0.0]


def test_budget_acts_on_evaluations_run_by_trainer_evaluate(tmp_path):
    # No `eval_steps` on the ForgettingCallback: it evaluates inside each epoch-end `Trainer.evaluate` (4 steps/epoch)
    trainer, budget = run(tmp_path, dict(budget=0.1, mode="adapt"), [0.8, 0.6, 0.8], max_steps=8,
                          eval_strategy="epoch", eval_dataset=prompt_completion_dataset(4), eval_steps=None)
    assert [(entry["step"], entry["distill_coef"]) for entry in budget.history] == [(0, 1.0), (4, 2.0), (8, 1.0)]


def test_drift_budget_from_the_forgetting_callback(tmp_path):
    heldout = [0.8] * 4
    trainer, budget = run(tmp_path, dict(budget=0.2, mode="adapt", metric="drift_kl"), heldout,
                          drift=[0.0, 0.3, 0.15, 0.05])
    assert [entry["signal"] for entry in budget.history] == [0.0, 0.3, 0.15, 0.05]
    assert [entry["distill_coef"] for entry in budget.history] == [1.0, 2.0, 2.0, 1.0]


def test_budget_reads_the_real_forgetting_callback_at_the_same_step(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=4, learning_rate=3e-2)
    forgetting = ForgettingCallback(make_splits(), eval_steps=2, teacher=trainer.teacher, max_new_tokens=4)
    forgetting.attach(trainer)
    budget = ForgettingBudgetCallback(1e-6, forgetting=forgetting, metric="drift_kl", mode="adapt").attach(trainer)
    trainer.train()
    # Steps 0, 2, 4 (the end-of-training evaluation is step 4's own): each read right after it was taken
    assert [(entry["step"], entry["signal"]) for entry in budget.history] == [
        (entry["step"], entry["drift_kl"]) for entry in forgetting.history
    ]
    assert [entry["step"] for entry in budget.history] == [0, 2, 4]
    assert budget.history[-1]["signal"] > 1e-6 and trainer.distill_coef == 4.0


def test_drift_budget_on_prompts_measures_the_model_every_eval_steps(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=4, learning_rate=3e-2)
    prompts = ["Q: What is the capital of France?\nA:", "Q: Who wrote Hamlet?\nA:"]
    budget = ForgettingBudgetCallback(1e-6, metric="drift_kl", prompts=prompts, eval_steps=2,
                                      mode="adapt").attach(trainer)
    trainer.train()
    steps = [entry["step"] for entry in budget.history]
    signals = [entry["signal"] for entry in budget.history]
    assert steps == [0, 2, 4]
    assert signals[0] == pytest.approx(0.0, abs=1e-6)  # the reference is the model as training began
    assert all(signal > 1e-6 for signal in signals[1:])  # a high learning rate drifts the model
    assert [entry["distill_coef"] for entry in budget.history] == [1.0, 2.0, 4.0]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"budget": 0.0}, ValueError, "`budget` must be > 0"),
        ({"budget": math.nan}, ValueError, "`budget` must be finite, got nan"),
        ({"budget": math.inf, "metric": "drift_kl"}, ValueError, "`budget` must be finite, got inf"),
        ({"budget": "0.05"}, TypeError, "`budget` must be a number, got the str '0.05'"),
        ({"budget": 5}, ValueError, "relative forgetting is a fraction"),
        ({"factor": 1.0}, ValueError, "`factor` must be > 1"),
        ({"low": 1.0}, ValueError, "`low` must lie strictly between 0 and 1"),
        ({"min_coef": 0.0}, ValueError, "Need 0 < min_coef ≤ max_coef"),
        ({"min_coef": 4.0, "max_coef": 2.0}, ValueError, "Need 0 < min_coef ≤ max_coef"),
        ({"max_coef": math.inf}, ValueError, "`max_coef` must be finite"),
        ({"metric": "accuracy"}, ValueError, "Unknown `metric='accuracy'`: choose one of forgetting, drift_kl"),
        ({"mode": "pause"}, ValueError, "Unknown `mode='pause'`: choose one of adapt, stop, adapt_or_stop"),
        ({"forgetting": None}, ValueError, "pass `forgetting=ForgettingCallback("),
        ({"forgetting": object()}, TypeError, "`forgetting` must be a ForgettingCallback, got a object"),
        ({"prompts": ["Q"]}, ValueError, "Drop them"),
        ({"metric": "drift_kl", "prompts": ["Q"], "eval_steps": 2}, ValueError, "exactly one source"),
        ({"metric": "drift_kl", "forgetting": None, "prompts": ["Q"]}, ValueError, "pass an integer ≥ 1, got None"),
        ({"metric": "drift_kl", "forgetting": None, "prompts": [], "eval_steps": 2}, ValueError, "`prompts` is empty"),
        ({"metric": "drift_kl", "forgetting": "no drift"}, ValueError, "built with `drift_size=0`"),
        ({"metric": "drift_kl", "forgetting": None, "prompts": ["Q"], "eval_steps": 2, "batch_size": 0}, ValueError,
         "`batch_size` (prompts per forward of the drift meter) must be an integer ≥ 1, got 0"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, error, message):
    kwargs = {"budget": 0.05, "forgetting": ScriptedForgetting([1.0]), **kwargs}
    if kwargs["forgetting"] == "no drift":
        kwargs["forgetting"] = ForgettingCallback(make_splits(), eval_steps=1, drift_size=0)
    with pytest.raises(error, match=re.escape(message)):
        ForgettingBudgetCallback(**kwargs)


def test_attach_refuses_a_trainer_without_teacher_and_a_lambda_out_of_range(tmp_path):
    forgetting = ScriptedForgetting([1.0])
    plain = make_trainer(tmp_path / "plain", distill_coef=0.0)
    with pytest.raises(ValueError, match=re.escape("adapts λ, the weight of the distillation term, but this trainer "
                                                   "has no teacher (built with `distill_coef=0`")):
        ForgettingBudgetCallback(0.05, forgetting=forgetting, mode="adapt").attach(plain)
    sft = SFTTrainer(model=tiny_model(), args=config(tmp_path / "sft", cls=SFTConfig),
                     train_dataset=prompt_completion_dataset(), processing_class=make_tokenizer())
    with pytest.raises(ValueError, match="or not a SelfDistillSFTTrainer"):
        ForgettingBudgetCallback(0.05, forgetting=forgetting, mode="adapt_or_stop").attach(sft)
    trainer = make_trainer(tmp_path / "distill", distill_coef=16.0)
    with pytest.raises(ValueError, match=re.escape("λ (`distill_coef=16.0`) lies outside [min_coef, max_coef] = "
                                                   "[0.125, 8.0]")):
        ForgettingBudgetCallback(0.05, forgetting=forgetting, mode="adapt").attach(trainer)
    assert not any(isinstance(cb, ForgettingBudgetCallback) for cb in trainer.callback_handler.callbacks)


@pytest.mark.parametrize(
    "setup, message",
    [
        ("unattached", "register it with `ForgettingBudgetCallback(...).attach(trainer)`"),
        ("forgetting_after", "must be registered with the trainer before this one"),
        ("forgetting_missing", "must be registered with the trainer before this one"),
        ("start_and_end_only", "evaluates only at the start and the end of training, so the budget could never act"),
        ("nothing_known", "held-out Known accuracy at the start is 0.0, so relative forgetting is undefined"),
    ],
)
def test_train_begin_refuses_a_budget_that_cannot_act(tmp_path, setup, message):
    trainer = make_trainer(tmp_path)
    forgetting = ScriptedForgetting([0.0 if setup == "nothing_known" else 0.8] * 4,
                                    eval_steps=None if setup == "start_and_end_only" else 1)
    budget = ForgettingBudgetCallback(0.05, forgetting=forgetting)
    if setup == "unattached":
        forgetting.attach(trainer)
        trainer.add_callback(budget)
    elif setup == "forgetting_after":
        budget.attach(trainer)
        trainer.add_callback(forgetting)
    elif setup != "forgetting_missing":
        forgetting.attach(trainer)
        budget.attach(trainer)
    else:
        budget.attach(trainer)
    with pytest.raises(ValueError, match=re.escape(message)):
        trainer.train()
    assert trainer.state.global_step == 0


@pytest.mark.parametrize(
    "value, error, message",
    [
        (math.nan, ValueError, "must be a finite number ≥ 0, got nan: the loss would be NaN"),
        (math.inf, ValueError, "must be a finite number ≥ 0, got inf: the loss would be unbounded"),
        (-0.5, ValueError, "must be a finite number ≥ 0, got -0.5"),
        ("2.0", TypeError, "`distill_coef` (λ) must be a number, got the str '2.0'"),
        (True, TypeError, "`distill_coef` (λ) must be a number, got the bool True"),
    ],
    ids=repr,
)
def test_runtime_lambda_refuses_non_finite_and_negative_values(tmp_path, value, error, message):
    trainer = make_trainer(tmp_path)
    with pytest.raises(error, match=re.escape(message)):
        trainer.distill_coef = value
    assert trainer.distill_coef == 1.0
    trainer.distill_coef = 0  # turning the term off is allowed: the teacher still exists
    assert trainer.distill_coef == 0.0


def test_runtime_lambda_cannot_be_changed_without_teacher(tmp_path):
    trainer = make_trainer(tmp_path, distill_coef=0.0)
    with pytest.raises(ValueError, match=re.escape("built with `distill_coef=0`, so it has no teacher")):
        trainer.distill_coef = 1.0
    trainer.distill_coef = 0.0  # no change
    assert trainer.distill_coef == 0.0 and trainer.teacher is None
