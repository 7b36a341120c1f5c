"""The protocol's stage-2 methods: one entry each, in `METHODS`.

An entry says what a method is called, what its `name:value` parameter sets, which facts it trains on, the config
overrides it makes to the protocol's base config, and how its trainer is built. Adding a method is adding an entry;
`Protocol.trainer` reads nothing else.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .freezing import FreezeConfig

if TYPE_CHECKING:  # the protocol imports this module
    from .protocol import Protocol


@dataclass(frozen=True)
class Build:
    """What a method's trainer is built from: the protocol, the run's method, its data, S and its config."""

    protocol: "Protocol"
    method: "Method"
    dataset: object
    snapshot: str
    args: object  # the run's SelfDistillConfig: the protocol's base config with the method's overrides


def _sft_trainer(build: Build, **extra):
    from .trainer import SelfDistillSFTTrainer

    return SelfDistillSFTTrainer(model=build.snapshot, args=build.args, train_dataset=build.dataset, **extra)


def _matched_l2_trainer(build: Build):
    from .peers import MatchedL2SFTTrainer

    return MatchedL2SFTTrainer(model=build.snapshot, args=build.args, train_dataset=build.dataset)


def _lora_trainer(build: Build):
    from peft import LoraConfig

    rank = build.protocol.lora_rank
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear",
                        task_type="CAUSAL_LM")
    return _sft_trainer(build, peft_config=config)


def _frozen_trainer(build: Build):
    return _sft_trainer(build, freeze_config=FreezeConfig.attention_only())


def _mlp_trainer(build: Build):
    return _sft_trainer(build, freeze_config=FreezeConfig.mlp_only())


def _peer_trainer(build: Build):
    from transformers import AutoTokenizer

    from .peers import PEERS

    kind = build.method.kind
    options = dict(build.protocol.peer_options.get(kind, {}))
    if build.method.value is not None:
        options["l2init_coef"] = build.method.value
    tokenizer = AutoTokenizer.from_pretrained(build.snapshot)
    return PEERS[kind](build.snapshot, build.args, build.dataset, tokenizer, **options)


def _plain(method: "Method", protocol: "Protocol") -> dict:
    return {"distill_coef": 0.0}


def _distilled(method: "Method", protocol: "Protocol") -> dict:
    return {"distill_coef": protocol.args.distill_coef if method.value is None else method.value}


def _scoped(scope: str) -> Callable:
    def with_scope(method: "Method", protocol: "Protocol") -> dict:
        return {**_distilled(method, protocol), "distill_scope": scope}

    return with_scope


def _tempered(method: "Method", protocol: "Protocol") -> dict:
    temperature = protocol.args.distill_temperature if method.value is None else method.value
    return {"distill_coef": protocol.args.distill_coef, "distill_temperature": temperature}


def _asft(method: "Method", protocol: "Protocol") -> dict:
    """ASFT (arXiv 2509.23753): DFT's CE, p(y)·CE with p detached, plus λ·KL(p_start ‖ p_θ) at the answer tokens,
    τ = 1, the start being S (the frozen model at the start of stage 2), as in its reference code."""
    return {**_distilled(method, protocol), "loss_type": "dft", "distill_temperature": 1.0,
            "divergence": "forward_kl", "distill_scope": "completion"}


def _budgeted(method: "Method", protocol: "Protocol") -> dict:
    return {"distill_coef": protocol.args.distill_coef}  # the value is the budget, not λ


def _lora(overrides: Callable) -> Callable:
    def with_lora_lr(method: "Method", protocol: "Protocol") -> dict:
        return {**overrides(method, protocol), "learning_rate": protocol.args.learning_rate * protocol.lora_lr_scale}

    return with_lora_lr


@dataclass(frozen=True)
class MethodSpec:
    """One method: its title, its parameter, its facts, its config overrides and its trainer builder."""

    title: str
    parameter: str | None = None  # what `kind:value` sets (λ, budget, μ); None: it takes no value
    control: bool = False  # trains on the Known-only control instead of the mix
    overrides: Callable[["Method", "Protocol"], dict] = _plain
    build: Callable[[Build], object] = _sft_trainer
    budget_mode: str | None = None  # `ForgettingBudgetCallback` mode, for budget methods
    teacher_cache: bool = False  # the run keeps a teacher cache in its folder
    new_fact_weight: float | None = None  # the distillation term's weight on new-fact rows (Known rows: 1)


METHODS: dict[str, MethodSpec] = {
    "known_only": MethodSpec("Known only", control=True),
    "sft": MethodSpec("SFT"),
    "selfdistill": MethodSpec("self-distillation", "λ", overrides=_distilled),
    # The KL's reach, whatever the protocol's `distill_scope`: the answer tokens, every position, the prompt only
    "selfdistill_completion": MethodSpec("self-distillation, KL on the answer", "λ", overrides=_scoped("completion")),
    "selfdistill_all": MethodSpec("self-distillation, KL everywhere", "λ", overrides=_scoped("all")),
    "selfdistill_prompt": MethodSpec("self-distillation, KL on the prompt", "λ", overrides=_scoped("prompt")),
    "selfdistill_tau": MethodSpec("self-distillation", "τ", overrides=_tempered),
    # λ on Known rows only: the teacher does not know the new facts, and its distribution there is its default answer
    "selfdistill_known": MethodSpec(
        "self-distillation, Known rows only", "λ", overrides=_distilled, new_fact_weight=0.0
    ),
    "selfdistill_cache": MethodSpec("self-distillation, teacher cache", "λ", overrides=_distilled, teacher_cache=True),
    "freeze": MethodSpec("attention only", build=_frozen_trainer),
    "freeze_mlp": MethodSpec("MLP only (attention frozen)", build=_mlp_trainer),
    "asft": MethodSpec("ASFT (DFT + KL anchor on the answer)", "λ", overrides=_asft),
    "lora_sft": MethodSpec("LoRA SFT", overrides=_lora(_plain), build=_lora_trainer),
    "lora_selfdistill": MethodSpec("LoRA self-distillation", "λ", overrides=_lora(_distilled), build=_lora_trainer),
    "budget": MethodSpec("self-distillation, forgetting budget", "budget", overrides=_budgeted, budget_mode="adapt"),
    "budget_stop": MethodSpec(
        "self-distillation, forgetting budget or stop", "budget", overrides=_budgeted, budget_mode="adapt_or_stop"
    ),
    "stop_at_budget": MethodSpec(
        "self-distillation, stopped at the budget", "budget", overrides=_budgeted, budget_mode="stop"
    ),
    "l2init": MethodSpec("SFT + L2 to S", "μ", build=_peer_trainer),
    # The paper's control: the L2 pull's gradient norm set to the distillation term's (λ) at every step
    "l2match": MethodSpec("SFT + L2 to S, gradient-matched to the KL", "λ", overrides=_distilled,
                          build=_matched_l2_trainer),
    "gkd": MethodSpec("GKD (off-policy, teacher copy)", build=_peer_trainer),
    "sdft": MethodSpec("SDFT (on-policy)", build=_peer_trainer),
}


@dataclass(frozen=True)
class Method:
    """One stage-2 run: a `kind` of `METHODS` and its parameter (λ, budget or μ; None: the kind's default)."""

    kind: str
    value: float | None = None

    @property
    def spec(self) -> MethodSpec:
        return METHODS[self.kind]

    @property
    def name(self) -> str:
        return self.kind if self.value is None else f"{self.kind}:{self.value:g}"

    @property
    def title(self) -> str:
        suffix = "" if self.value is None else f" ({self.spec.parameter}={self.value:g})"
        return self.spec.title + suffix


def parse_methods(spec: str | Sequence[str]) -> list[Method]:
    """`"sft,selfdistill:0.5,freeze"` → methods; refuses unknown kinds and parameters of kinds without."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not items:
        raise ValueError("No methods given: pass e.g. `sft,selfdistill`.")
    methods = []
    for item in items:
        kind, _, value = item.partition(":")
        if kind not in METHODS:
            raise ValueError(f"Unknown method {kind!r} in {item!r}: choose among {', '.join(METHODS)}.")
        if value and METHODS[kind].parameter is None:
            parameters = ", ".join(f"{k}:{s.parameter}" for k, s in METHODS.items() if s.parameter)
            raise ValueError(f"Method {kind!r} takes no parameter ({item!r}); parameters: {parameters}")
        try:
            number = float(value) if value else None
        except ValueError as err:
            raise ValueError(f"{item!r}: the parameter after ':' must be a number, e.g. {kind}:0.5.") from err
        methods.append(Method(kind, number))
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"Methods repeat: {names}. Give each once.")
    return methods
