"""`ForgettingCallback`: task / new-fact / held-out Known accuracy, forgetting and drift, during any Trainer's run."""

import json
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import Sequence

from datasets import Dataset
from transformers import TrainerCallback

from ..teacher import eval_mode
from ..validation import check_facts
from .drift import DriftMeter, RepresentationDrift
from .facts import load_facts
from .formats import AnswerFormat
from .generation import Generator
from .metrics import (
    accuracy_by,
    answers_for_prompts,
    collapse,
    default_answers_of,
    default_share,
    forgetting_summary,
    knowledge_metrics,
    last_k_per_fact,
    score,
)
from .probe import SLICK_CATEGORIES, ProbeConfig, few_shot_prompts, model_name, probe, reusable_categories
from .results import Evaluation, Final, ForgettingResults
from .splits import GENUINE_ONLY, KnowledgeSplits, monitor_splits

logger = logging.getLogger(__name__)

RESULTS_FILE = "forgetting_results.json"
LOG_PREFIX = "knowledge/"
MONITOR_SHOTS = 4  # same-relation exemplars before each question when the callback has an exemplar pool
MONITOR_HELDOUT_SIZE = 200  # Known facts monitored when the callback probes a fact set


def log_between_steps(trainer, model, control, logs: dict) -> None:
    """
    `trainer.log(logs)` from a callback, between optimizer steps, without disturbing the step's regular training log.

    TRL's `log` folds in (and clears) the metrics of the mode the model is in: in eval mode those are empty here, so
    the training metrics stay with the regular training log. `on_log` clears `should_log`, which would skip the
    step's regular training log: it is kept.
    """
    should_log = control.should_log
    with eval_mode(model):
        trainer.log(logs)
    control.should_log = should_log


class ForgettingCallback(TrainerCallback):
    """
    Evaluates the model (greedy) on `splits` at the start of training, every `eval_steps` optimizer steps, and at the
    end; keeps `.history`, `.peak` and `.final`; and writes `<output_dir>/forgetting_results.json` when training ends.
    Works with any Trainer, with or without an `eval_dataset`. Metrics reach `report_to` through `trainer.log` once
    the callback is attached (a `SelfDistillSFTTrainer` attaches those in its `callbacks=[...]`; another trainer's
    only reach `trainer.state.log_history`):

        trainer = SelfDistillSFTTrainer(model=model, args=args, train_dataset=fmt.training_dataset(splits.train()))
        ForgettingCallback(splits, fmt=fmt, eval_steps=20, teacher=trainer.teacher).attach(trainer)

    `splits` is `KnowledgeSplits`, or a fact set to monitor (a `Dataset` or a name `load_facts` reads): when training
    begins the model is then probed (`probe_config`, shared by the ranks) unless the facts carry categories that this
    model probed (`knowledge.probe.reusable_categories`; `reprobe` forces it), and up to `heldout_size` of its Known
    facts with a heuristic label in `heuristics` are monitored; `results()["probe"]` says how.

    `fmt=None` asks in the format of the attached trainer's data (`AnswerFormat.for_data`: chat for conversational
    data, else plain `Q:/A:`). With `num_shots`, each fact is asked after `num_shots` same-relation exemplars from
    `exemplars` (fixed per fact, drawn with `seed`, never the fact itself), as the SliCK probe asks it: a model whose
    training data does not teach the answer format (a chat model, the user's own data) is then still measured on what
    it knows rather than on how it phrases it. `num_shots=None`: `MONITOR_SHOTS` when there is an exemplar pool (a
    monitored fact set is its own), else zero-shot. `.prompts` holds the evaluation prompts of the train Known, train
    Unknown and held-out facts. `facts_source` names the fact set in the results.

    `drift_kl` is the mean KL(reference ‖ model) of the first-answer-token distribution on up to `drift_size`
    held-out prompts; the reference is `teacher` when given, else the model as it was when training began
    (`drift_size=0` disables it). `representation_drift` is the paper's mechanism signal on the same prompts: mean
    1 − cos of the middle layer's hidden state at the subject's last token, against the model when training began
    (None when no held-out fact names its subject).

    `answered_known_accuracy` is the held-out accuracy on the facts the model answered correctly at the first
    evaluation (step 0): SliCK's few-shot "Known" does not imply a correct zero-shot answer in the evaluation format,
    and a fact never answered in that format cannot be forgotten in it. `results()["answered_known"]` counts them.

    Each evaluation also records `default_answer_share`, the share of held-out answers that are a default answer
    (`metrics.default_answers_of`: the training mix's most common answers, the probe's defaults of the fact's
    relation), and `heldout_by_heuristic` when the held-out facts carry heuristic labels. `results()["collapse"]`
    counts the held-out facts lost since the start and how many of them now get a default answer: forgetting by
    collapse onto the mix's common answers, not by interference between facts.

    Every `Trainer.evaluate()` also returns the latest metrics as `eval_knowledge/<name>` (evaluating first when the
    last evaluation is from an earlier step), so `metric_for_best_model="knowledge/heldout_known_accuracy"`,
    `load_best_model_at_end` and `EarlyStoppingCallback` can use them. `attach` puts the callback first so that
    callbacks that read the metrics in `on_evaluate` see them. In a multi-process run every rank calls the callback
    and takes its share of the generation and drift batches (`sharding`); every rank gets every result, and the main
    process writes them.
    """

    report = True  # the run's results: the results file, the card (`attach(trainer, report=False)`: steering only)

    def __init__(
        self,
        splits: "KnowledgeSplits | Dataset | str",
        *,
        fmt: AnswerFormat | None = None,
        eval_steps: int | None = None,
        tokenizer=None,
        teacher=None,
        drift_size: int = 64,
        batch_size: int = 32,
        max_new_tokens: int = 16,
        baseline: dict | None = None,
        progress: bool = False,
        num_shots: int | None = None,
        exemplars=None,
        seed: int = 0,
        facts_source: str | None = None,
        probe_config: ProbeConfig | None = None,
        heldout_size: int | None = MONITOR_HELDOUT_SIZE,
        heuristics: "Sequence[str] | None" = GENUINE_ONLY,
        reprobe: bool = False,
    ):
        if eval_steps is not None and eval_steps < 1:
            raise ValueError(f"eval_steps={eval_steps} must be a positive number of steps (or None: start and end).")
        self.fmt, self.seed, self.reprobe = fmt, seed, reprobe
        self.tokenizer, self.teacher, self.drift_size = tokenizer, teacher, drift_size
        self.batch_size, self.max_new_tokens, self.progress = batch_size, max_new_tokens, progress
        self.baseline = baseline
        self.facts: Dataset | None = None  # facts to probe when training begins (monitor mode)
        self.probe_info: dict | None = None  # how the monitored facts were categorised (monitor mode)
        if not isinstance(splits, KnowledgeSplits):
            if isinstance(splits, str):
                facts_source = facts_source or splits
                splits = load_facts(splits)
            check_facts(splits, "fact set to monitor", categories=False)
            self.facts = splits
            exemplars = splits if exemplars is None else exemplars
            self.probe_config = probe_config or ProbeConfig.cheap(seed=seed, batch_size=batch_size,
                                                                  max_new_tokens=max_new_tokens)
            self.heldout_size, self.heuristics = heldout_size, heuristics
        self.num_shots = (MONITOR_SHOTS if exemplars is not None else 0) if num_shots is None else num_shots
        self.exemplars, self.facts_source = exemplars, facts_source
        if exemplars is not None:
            check_facts(exemplars, "exemplar pool", categories=False)
        if self.num_shots and exemplars is None:
            raise ValueError(f"num_shots={self.num_shots} needs `exemplars`, the pool the shots are drawn from.")
        self.splits: KnowledgeSplits | None = None
        self._prompts = None
        if self.facts is None:
            self._use(splits)
        self.trainer = None
        self.history: list[Evaluation] = []
        self.per_category: dict[str, float] = {}
        self.answered: list[bool] | None = None  # held-out facts answered correctly at the first evaluation
        self.correct: list[list[bool]] | None = None
        self.heldout_answers: list[str] | None = None  # the latest held-out answers
        self.heldout_history: list[list[bool]] = []  # per evaluation, each held-out fact's correctness
        self.eval_seconds = 0.0  # time spent evaluating (inside the trainer's run time)
        self.run_id: str | None = None  # a new id each time training begins, written with the results
        self._logs: dict[str, float] = {}
        self._generator = self._drift = self._representation = None
        self._every = eval_steps  # resolved against the trainer's `eval_steps` when training begins

    def _use(self, splits: KnowledgeSplits) -> None:
        """Monitor `splits` (checked): their prompts are built with the format once it is known."""
        sets = [splits.train_known, splits.train_unknown, splits.heldout]
        for label, facts in zip(("train Known facts", "train Unknown facts", "held-out facts"), sets, strict=True):
            if len(facts):
                check_facts(facts, label)
        self.splits, self._prompts = splits, None
        self.defaults = default_answers_of(splits)

    @property
    def answer_format(self) -> AnswerFormat:
        """`fmt`, else the format of the attached trainer's data (`AnswerFormat.for_data`), else plain `Q:/A:`."""
        if self.fmt is None:
            return AnswerFormat.for_data(bool(getattr(self.trainer, "conversational", False)))
        return self.fmt

    @property
    def prompts(self) -> list[list]:
        """The evaluation prompts of the train Known, train Unknown and held-out facts, in `answer_format`."""
        if self.splits is None:
            raise ValueError("The facts are probed when training begins: the prompts exist from then on.")
        if self._prompts is None:
            fmt = self.answer_format
            sets = [self.splits.train_known, self.splits.train_unknown, self.splits.heldout]
            if self.num_shots:
                self._prompts = [[p[0] for p in few_shot_prompts(facts, self.exemplars, fmt, 1, self.num_shots,
                                                                 self.seed)]
                                 if len(facts) else [] for facts in sets]
            else:
                self._prompts = [[fmt.prompt_for(q) for q in facts["question"]] for facts in sets]
        return self._prompts

    def attach(self, trainer, report: bool = True) -> "ForgettingCallback":
        """
        Register with `trainer`, first among its callbacks, and log through `trainer.log`, so every `report_to`
        integration sees the metrics and every later callback's `on_evaluate` sees `eval_knowledge/...`.
        With `report` (the default) this is the trainer's `knowledge_monitor`: its results are the run's
        `forgetting_results.json`, model card and Hub eval results. A monitor that only steers (a forgetting budget's
        own facts) attaches with `report=False`.
        """
        self.trainer, self.report = trainer, report
        if report:
            trainer.knowledge_monitor = self
        callbacks = trainer.callback_handler.callbacks
        if self not in callbacks:
            trainer.add_callback(self)
        callbacks.insert(0, callbacks.pop(callbacks.index(self)))
        return self

    @property
    def eval_steps(self) -> int | None:
        """Optimizer steps between evaluations (None: at the start, the end and each `Trainer.evaluate` only); when
        not given, the trainer's `eval_steps` under `eval_strategy="steps"`, known once training has begun."""
        return self._every

    @property
    def peak(self) -> Evaluation | None:
        """The history entry with the best held-out Known accuracy."""
        scored = [entry for entry in self.history if entry["heldout_known_accuracy"] is not None]
        return max(scored, key=lambda entry: entry["heldout_known_accuracy"]) if scored else None

    @property
    def final(self) -> Final | None:
        """The `final` block of the results (last evaluation, peak, start, forgetting)."""
        return forgetting_summary(self.history, self.per_category) if self.history else None

    def results(self) -> ForgettingResults:
        """Everything `forgetting_results.json` holds."""
        return {
            "final": self.final,
            "history": self.history,
            "baseline": self.baseline,
            "sizes": self.splits.sizes,
            "answered_known": None if self.answered is None else sum(self.answered),
            "facts": self.facts_source,
            "format": {"prompt": self.answer_format.prompt, "chat": self.answer_format.chat,
                       "num_shots": self.num_shots},
            "run": self.run_id,
            "eval_seconds": self.eval_seconds,
            "probe": self.probe_info,
            "collapse": None
            if self.correct is None
            else {
                **collapse(self.answered, self.correct[2], self.heldout_answers, self.defaults),
                "default_answer_share_start": self.history[0]["default_answer_share"],
                "default_answer_share_end": self.history[-1]["default_answer_share"],
            },
            # Per-fact correctness (0/1, in the order of the splits): held-out at the first and last evaluation, new
            # facts at the last; what paired statistics over facts need (`knowledge.stats`)
            "per_fact": None
            if self.correct is None
            else {
                "heldout_ids": list(self.splits.heldout["id"]),
                "heldout_start": [int(ok) for ok in self.answered],
                "heldout_end": [int(ok) for ok in self.correct[2]],
                "new_end": [int(ok) for ok in self.correct[1]],
                "heldout_answers_end": self.heldout_answers,
                # mean correctness over the last `LAST_K` evaluations after the first
                "heldout_last_k": last_k_per_fact(self.heldout_history),
            },
        }

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        tokenizer = self.tokenizer or processing_class
        if tokenizer is None:
            raise ValueError("ForgettingCallback needs a tokenizer: pass `tokenizer=` or give the trainer one.")
        self.run_id = uuid.uuid4().hex
        self.history, self.answered, self.correct, self.eval_seconds = [], None, None, 0.0
        self.heldout_history = []
        if self._every is None and args.eval_steps and args.eval_strategy == "steps":
            self._every = state.eval_steps
        progress = self.progress and state.is_world_process_zero
        if self.facts is not None and self.splits is None:
            self._use(self._probe(model, tokenizer, state))
        # Every rank takes its share of the prompts (`sharding`); all of them get every result
        self._generator = Generator(model, tokenizer, self.answer_format, max_new_tokens=self.max_new_tokens,
                                    batch_size=self.batch_size, progress=progress, shard=True)
        self._representation = None
        if self.drift_size:
            self._drift = DriftMeter(self.prompts[2][: self.drift_size], tokenizer, self.batch_size, shard=True)
            self._drift.snapshot(model, self.teacher)
            heldout = self.splits.heldout
            subjects = heldout["subject"][: self.drift_size] if "subject" in heldout.column_names else []
            if any(subjects):
                self._representation = RepresentationDrift(self.prompts[2][: self.drift_size], subjects, tokenizer,
                                                           self.batch_size, shard=True)
                self._representation.snapshot(model)
        if self.trainer is None:
            logger.warning(
                "ForgettingCallback is not attached to the trainer: its metrics go to `trainer.state.log_history` "
                "only. Use `ForgettingCallback(...).attach(trainer)` to send them to `report_to` as well."
            )
        self._evaluate(state, control, model)

    def _probe(self, model, tokenizer, state) -> KnowledgeSplits:
        """The monitored splits of `facts`: their categories as given when the model that probed them is this one (or
        unrecorded), else a SliCK probe of this model shared by the ranks; the Known ones, `heldout_size` of them."""
        fmt, config = self.answer_format, self.probe_config
        name = model_name(model)
        reuse, why = reusable_categories(self.facts, name, self.reprobe)
        start = time.perf_counter()
        if reuse:
            categorised = self.facts
        else:
            categorised = probe(self.facts, model, tokenizer, exemplars=self.exemplars, fmt=fmt, config=config,
                                progress=self.progress and state.is_world_process_zero, shard=True)
        splits = monitor_splits(categorised, heldout_size=self.heldout_size, heuristics=self.heuristics,
                                seed=self.seed)
        counts = Counter(categorised["category"])
        self.probe_info = {"model": name, "reused": reuse, "why": why, "seconds": time.perf_counter() - start,
                           "categories": {c: counts[c] for c in SLICK_CATEGORIES if counts[c]},
                           "heuristics": dict(Counter(categorised["heuristic"]))
                           if "heuristic" in categorised.column_names else None}
        if state.is_world_process_zero:
            how = why if reuse else (f"{why}: {len(categorised)} facts probed ({config.num_prompts} "
                                     f"{config.num_shots}-shot prompts, greedy; chat={fmt.chat})")
            print(f"[trl_selfdistill] knowledge: {how}: "
                  f"{', '.join(f'{c} {counts[c]}' for c in SLICK_CATEGORIES if counts[c])}; monitoring "
                  f"{len(splits.heldout)} Known facts")
        return splits

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._every and state.global_step % self._every == 0:
            self._evaluate(state, control, model)

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        if metrics is None or self._generator is None:  # evaluate() outside training: no reference to compare with
            return
        if not self.history or self.history[-1]["step"] != state.global_step:
            self._evaluate(state, control, model)
        metrics.update({f"eval_{key}": value for key, value in self._logs.items()})

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self.history or self.history[-1]["step"] != state.global_step:
            self._evaluate(state, control, model)
        results = self.results()
        if state.is_world_process_zero and self.report:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, RESULTS_FILE), "w") as f:
                json.dump(results, f, indent=2)
            c = results["collapse"]
            if c and c["fired"]:
                logger.warning(
                    f"Collapse onto default answers: {c['lost_to_default']} of the {c['lost']} held-out Known facts "
                    "lost in this run are now answered with a default answer (the training mix's most common "
                    "answers, or the model's answer about any entity of the relation). Mix Known facts with varied "
                    "answers, lower the learning rate or stop earlier (docs/evaluation.md, 'Collapse')."
                )

    def _evaluate(self, state, control, model) -> None:
        splits = self.splits
        sets = [splits.train_known, splits.train_unknown, splits.heldout]
        start = time.perf_counter()
        answers = answers_for_prompts(self._generator, self.prompts)
        correct = self.correct = [score(a, facts) for a, facts in zip(answers, sets, strict=True)]
        self.heldout_answers = answers[2]
        self.heldout_history.append(list(correct[2]))
        if self.answered is None:
            self.answered = list(correct[2])
            if not any(self.answered):
                logger.warning(
                    f"The model answers none of the {len(self.answered)} held-out Known facts correctly in the "
                    f"evaluation format ({self.answer_format.prompt!r}, chat={self.answer_format.chat}, "
                    f"{self.num_shots} shots), so "
                    "`answered_known_accuracy` is undefined. Check the format (docs/evaluation.md, 'The answer "
                    "format'): ask with shots (`num_shots`), or use a snapshot that has learned the format."
                )
        metrics = knowledge_metrics(splits, correct, self.answered)
        self.per_category = metrics.pop("per_category")
        metrics["default_answer_share"] = default_share(answers[2], self.defaults)
        if "heuristic" in splits.heldout.column_names:
            metrics["heldout_by_heuristic"] = accuracy_by(splits.heldout["heuristic"], correct[2])
        entry: Evaluation = {
            "step": state.global_step, **metrics, "drift_kl": self._drift(model) if self._drift else None,
            "representation_drift": self._representation(model) if self._representation else None,
        }
        self.eval_seconds += time.perf_counter() - start
        self.history.append(entry)
        by_heuristic = metrics.pop("heldout_by_heuristic", {})
        logs = {**metrics, "drift_kl": entry["drift_kl"], "representation_drift": entry["representation_drift"]}
        logs.update({f"heldout_accuracy_{label}": value for label, value in by_heuristic.items()})
        final = self.final
        forgetting = ("forgetting_from_peak", "forgetting_from_start", "answered_known_forgetting")
        logs.update({key: final[key] for key in forgetting})
        logs.update({f"accuracy_{category}": value for category, value in self.per_category.items()})
        logs = {LOG_PREFIX + key: value for key, value in logs.items() if value is not None}
        self._logs = logs
        if self.trainer is None:
            state.log_history.append({**logs, "step": state.global_step})
            return
        log_between_steps(self.trainer, model, control, logs)
