"""Train only the parameter groups you choose (arXiv 2604.15574, fix 2: attention only keeps held-out knowledge).

Groups are found from the model's structure, so any decoder-only architecture works:

- decoder layers: the largest `nn.ModuleList` of same-class blocks; `layers` picks among them;
- `attention` / `mlp`: the block's child holding the q/k/v (or fused qkv) projections, resp. the feed-forward child;
- `embeddings`: `get_input_embeddings()` and any other `nn.Embedding` outside the layers (e.g. GPT-2's positions);
- `lm_head`: `get_output_embeddings()`; when it is tied to the input embeddings (same tensor), the tensor is counted
  once, under `embeddings`, and trains if either group is selected;
- `norms`: LayerNorm/RMSNorm-like modules anywhere (class name contains "Norm", or a leaf with 1-D weight/bias only);
- anything else is `other` (trains only with `groups=None` or through `include`).

Full fine-tuning: `apply_freeze(model, cfg)` sets `requires_grad` before the optimizer is built. With PEFT the
FreezeConfig only chooses where adapters go and every base weight stays frozen: `restrict_peft_config` before
wrapping, `freeze_for_peft` after (see `docs/freezing.md`).
"""

import copy
import difflib
import re
from dataclasses import asdict, dataclass, field

from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from torch import nn
from transformers.pytorch_utils import Conv1D

GROUPS = ("attention", "mlp", "embeddings", "lm_head", "norms")
OTHER = "other"
# Groups whose weights cannot carry an adapter: under PEFT they could only train by unfreezing base weights
BASE_ONLY_GROUPS = ("embeddings", "lm_head", "norms")
OUTSIDE = "outside"

_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)
_MLP = re.compile(r"mlp|feed_?forward|ffn|moe|experts?", re.IGNORECASE)
_QKV = {"q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "c_attn", "Wqkv", "qkv", "query", "key", "value"}
_FRACTION = re.compile(r"(first|last)(?:_half|:(\d*\.?\d+))")
_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


@dataclass
class FreezeConfig:
    r"""
    Which parameters train; everything else is frozen. A parameter trains when it is in one of `groups` or matched by
    `include`, lies in one of `layers` (parameters outside the decoder layers ignore `layers`), and is not matched by
    `exclude`. `include`/`exclude` use PEFT's `target_modules` vocabulary and match a module or any module above it.

    The paper's settings: `FreezeConfig.attention_only()` (MLPs frozen: the task is learned, held-out knowledge kept)
    and `FreezeConfig.mlp_only()`.
    """

    groups: list[str] | None = field(
        default=None,
        metadata={
            "help": f"Parameter groups that train, among {', '.join(GROUPS)}. None: every parameter, unless "
            "`include` is set, in which case only what `include` matches."
        },
    )
    layers: list[int] | str | None = field(
        default=None,
        metadata={
            "help": "Decoder layers whose parameters may train. None: all. A list of indices (`[0, 1, -1]`, negative "
            "from the end), a string of indices and inclusive ranges (`'0-5'`, `'0-5,8'`), or a fraction: "
            "`'first_half'`, `'last_half'`, `'first:0.25'`, `'last:0.25'` (round(fraction·num_layers), at least 1)."
        },
    )
    include: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Modules that also train, as in PEFT's `target_modules`: a list of module names or name "
            "suffixes (`['q_proj', 'layers.0.mlp']`), or one string, a regex that must match a full module name "
            r"(`r'.*\.(q|v)_proj'`). Everything inside a matched module matches."
        },
    )
    exclude: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Modules that stay frozen whatever `groups` or an enclosing `include` say; same vocabulary as "
            "`include`. A module matched by both `include` and `exclude` is an error."
        },
    )

    def __post_init__(self):
        if isinstance(self.groups, str):
            self.groups = [self.groups]
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, list(value) or None)
        if self.groups is not None:
            self.groups = list(dict.fromkeys(self.groups))
            for group in self.groups:
                if group not in GROUPS:
                    close = difflib.get_close_matches(str(group), GROUPS, n=1)
                    hint = f"Did you mean {close[0]!r}? " if close else ""
                    raise ValueError(f"Unknown group {group!r} in `groups`. {hint}Choose among {', '.join(GROUPS)}.")
            if not self.groups and self.include is None:
                raise ValueError(
                    "`groups=[]` without `include` trains nothing. Name at least one group, set `include`, or leave "
                    "`groups=None` to train every parameter."
                )
        _parse_layers(self.layers)
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as err:
                    raise ValueError(
                        f"`{name}={value!r}` is not a valid regex ({err}). A single string is a regex matched against "
                        "full module names; pass a list for plain names or suffixes."
                    ) from None
            elif value is not None and not all(isinstance(v, str) and v for v in value):
                raise ValueError(
                    f"`{name}` must be a regex string or a list of non-empty module names, got {value!r}."
                )
        if isinstance(self.include, list) and isinstance(self.exclude, list):
            both = sorted(set(self.include) & set(self.exclude))
            if both:
                raise ValueError(
                    f"{both} appear in both `include` and `exclude`. A module cannot both train and stay frozen: "
                    "remove it from one of them."
                )

    @classmethod
    def attention_only(cls, **kwargs) -> "FreezeConfig":
        """The paper's knowledge-preserving setting: attention trains; MLPs, embeddings, norms and head are frozen."""
        return cls(groups=["attention"], **kwargs)

    @classmethod
    def mlp_only(cls, **kwargs) -> "FreezeConfig":
        """The paper's contrast setting: MLPs train; attention, embeddings, norms and head are frozen."""
        return cls(groups=["mlp"], **kwargs)


@dataclass
class FreezeReport:
    """What trains and what is frozen after `apply_freeze` / `freeze_for_peft`. Tied tensors are counted once."""

    total: int
    trainable: int
    by_group: dict[str, dict[str, int]]
    by_layer: dict[str, dict[str, int]]
    trainable_names: list[str]
    description: str
    tied_embeddings: str | None = None
    adapters_only: bool = False
    config: dict = field(default_factory=dict)

    @property
    def frozen(self) -> int:
        return self.total - self.trainable

    def summary(self) -> str:
        return f"trainable {self._share()}"

    def _share(self) -> str:
        share = 100 * self.trainable / self.total if self.total else 0.0
        return f"{self.trainable:,} / {self.total:,} ({share:.2f}%) — {self.description}"

    def to_dict(self) -> dict:
        return asdict(self)

    def to_markdown(self) -> str:
        rows = [f"| {g} | {c['trainable']:,} | {c['frozen']:,} |" for g, c in self.by_group.items()]
        lines = [
            f"**Trainable parameters:** {self._share()}",
            "",
            "| group | trainable | frozen |",
            "|---|---:|---:|",
            *rows,
            f"| **total** | {self.trainable:,} | {self.frozen:,} |",
        ]
        if self.adapters_only:
            lines += ["", "PEFT: base weights are all frozen; the trainable parameters are adapter weights."]
        if self.tied_embeddings:
            lines += ["", self.tied_embeddings]
        return "\n".join(lines)


def apply_freeze(model: nn.Module, cfg: FreezeConfig) -> FreezeReport:
    """Full fine-tuning: set `requires_grad` on every parameter (before the optimizer is built) and report."""
    if isinstance(model, PeftModel) or any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError(
            "The model has PEFT adapters: unfreezing base weights would also move the adapter-disabled teacher. With "
            "PEFT, FreezeConfig only chooses where adapters go: call `freeze_for_peft(peft_model, cfg)`, or wrap with "
            "`get_peft_model(model, restrict_peft_config(peft_config, model, cfg))`."
        )
    entries, num_layers = _plan(model, cfg)
    for entry in entries:
        entry.param.requires_grad_(entry.selected)
    return _report(entries, num_layers, cfg)


def check_freeze_with_adapter_teacher(cfg: FreezeConfig) -> None:
    """Refuse, under PEFT, a FreezeConfig that could only be honoured by unfreezing base weights."""
    base_only = [g for g in cfg.groups or () if g in BASE_ONLY_GROUPS]
    if base_only:
        raise ValueError(
            f"`groups` contains {base_only}, which hold no Linear layer for an adapter: training them would unfreeze "
            "base weights, and the teacher (the same base with the adapter off) would drift with the student. With "
            f"PEFT, FreezeConfig only chooses where adapters go: keep `groups` within ['attention', 'mlp'] (drop "
            f"{base_only}), or train fully (no `peft_config`) so the teacher is a frozen copy."
        )


def peft_target_modules(model: nn.Module, cfg: FreezeConfig) -> list[str]:
    """Full names of the Linear/Conv1D layers inside the selection (output layer excluded, as PEFT's `all-linear`)."""
    return _adapter_targets(model, cfg)[0]


def restrict_peft_config(peft_config, model: nn.Module, cfg: FreezeConfig):
    """
    A copy of `peft_config` whose adapters go only inside the FreezeConfig selection: `target_modules` left as None or
    `"all-linear"` becomes `peft_target_modules(model, cfg)`; explicit `target_modules` (and `modules_to_save`) are
    kept if they lie inside the selection and refused otherwise. Call it on the model before `get_peft_model`.
    """
    check_freeze_with_adapter_teacher(cfg)
    if not hasattr(peft_config, "target_modules"):
        raise ValueError(
            f"{type(peft_config).__name__} has no `target_modules`, so a FreezeConfig cannot choose where it goes. "
            "Use an adapter method such as LoRA, or drop the FreezeConfig."
        )
    targets, selected = _adapter_targets(model, cfg)
    config = copy.deepcopy(peft_config)
    chosen = config.target_modules
    fill = chosen is None or (isinstance(chosen, str) and chosen.lower() == "all-linear")
    saved = getattr(config, "modules_to_save", None) or []
    outside = []
    for name, module in model.named_modules():
        if not name:
            continue
        in_saved = any(name == m or name.endswith(f".{m}") for m in saved)
        if (in_saved or (not fill and check_target_module_exists(config, name))) and any(
            id(p) not in selected for p in module.parameters()
        ):
            outside.append(name)
    if outside:
        shown = ", ".join(outside[:4]) + (", ..." if len(outside) > 4 else "")
        raise ValueError(
            f"The peft_config targets modules outside the FreezeConfig selection ({shown}). Leave `target_modules` "
            "as None or 'all-linear' to place adapters on the selection, narrow `target_modules` / "
            "`modules_to_save`, or widen the FreezeConfig."
        )
    if fill:
        config.target_modules = set(targets)  # PEFT stores a list of names as a set
    return config


def freeze_for_peft(model: PeftModel, cfg: FreezeConfig) -> FreezeReport:
    """
    Narrow a PeftModel to the selection: a parameter stays trainable only if it was (adapter weights; base weights are
    frozen by PEFT) and lies inside the selection. Nothing is ever unfrozen, so the adapter-disabled teacher stays
    the initial model. Call it after `get_peft_model` (or on a given PeftModel), before the optimizer is built.
    """
    check_freeze_with_adapter_teacher(cfg)
    if not isinstance(model, PeftModel):
        raise ValueError(
            "`freeze_for_peft` expects a PeftModel. For full fine-tuning call `apply_freeze(model, cfg)`; to add "
            "adapters, wrap with `get_peft_model(model, restrict_peft_config(peft_config, model, cfg))` first."
        )
    entries, num_layers = _plan(model.get_base_model(), cfg)
    for entry in entries:
        if entry.param.requires_grad and not entry.selected:
            entry.param.requires_grad_(False)
    if not any(e.param.requires_grad for e in entries):
        hosts = sorted({n for n, m in model.get_base_model().named_modules() if isinstance(m, BaseTunerLayer)})
        raise ValueError(
            f"No trainable adapter weight lies inside the FreezeConfig selection (adapters sit on {hosts[:3]}...). "
            "Build the adapter with `restrict_peft_config(peft_config, model, cfg)` so it goes where the selection is."
        )
    return _report(entries, num_layers, cfg, adapters_only=True)


# ---------------------------------------------------------------------------------------------------------------------
# Structure: which group and layer each parameter belongs to


@dataclass(eq=False)
class _Entry:
    name: str
    param: nn.Parameter
    owners: list[str] = field(default_factory=list)  # names of the modules holding the tensor (2 when tied)
    groups: set[str] = field(default_factory=set)
    layer: int | None = None
    selected: bool = False

    @property
    def group(self) -> str:
        """The group it is counted under: a tied embedding/head tensor counts as `embeddings`."""
        return next((g for g in GROUPS if g in self.groups), OTHER)

    @property
    def tied(self) -> bool:
        return {"embeddings", "lm_head"} <= self.groups


def _is_norm(module: nn.Module) -> bool:
    if "norm" in type(module).__name__.lower():
        return True
    own = dict(module.named_parameters(recurse=False))
    return (
        next(module.children(), None) is None
        and "weight" in own
        and set(own) <= {"weight", "bias"}
        and all(p.dim() == 1 for p in own.values())
    )


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The largest `nn.ModuleList` of same-class blocks, by parameter count."""
    best, best_size = None, 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(b) for b in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = module, size
    if best is None:
        raise ValueError(
            f"Could not find the decoder layers of {type(model).__name__}: FreezeConfig looks for the nn.ModuleList "
            "of transformer blocks (e.g. `model.layers`) and this model has none. Set `requires_grad` by hand for "
            "this architecture."
        )
    return best


def _block_roles(block: nn.Module) -> dict[str, str]:
    """Group of each direct child of a decoder block: norms, attention (holds q/k/v), mlp (the feed-forward).

    Children matching none of these are `other` (e.g. extra per-layer modules next to a named `mlp`).
    """
    roles = {}
    for name, child in block.named_children():
        if not _has_params(child):
            continue
        label = f"{name} {type(child).__name__}"
        leaves = {n.rsplit(".", 1)[-1] for n, _ in child.named_modules()}
        if _is_norm(child):
            roles[name] = "norms"
        elif _ATTENTION.search(label) or leaves & _QKV:
            roles[name] = "attention"
        elif _MLP.search(label):
            roles[name] = "mlp"
    if "mlp" not in roles.values():  # no child named like a feed-forward: it is what is left (OPT's fc1/fc2)
        roles.update({n: "mlp" for n, c in block.named_children() if n not in roles and _has_params(c)})
    return roles


def _classify(model: nn.Module) -> tuple[list[_Entry], int]:
    """One entry per distinct tensor (named as in `named_parameters`), with its owners, groups and layer."""
    entries = {id(p): _Entry(name, p) for name, p in model.named_parameters()}
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    layers = _decoder_layers(model)

    def visit(name, module, group, layer, in_tuner, block=False):
        if module is inputs:
            group = "embeddings"
        elif module is outputs:
            group = "lm_head"
        elif not in_tuner and _is_norm(module):
            group = "norms"
        elif group is None and layer is None and isinstance(module, nn.Embedding):
            group = "embeddings"
        in_tuner = in_tuner or isinstance(module, BaseTunerLayer)
        for param in module.parameters(recurse=False):
            entry = entries[id(param)]
            entry.owners.append(name)
            entry.groups.add(group or OTHER)
            entry.layer = layer if entry.layer is None else entry.layer
        roles = _block_roles(module) if block else {}
        for index, (child_name, child) in enumerate(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if module is layers:
                visit(full, child, group, index, in_tuner, block=True)
            else:
                visit(full, child, roles.get(child_name, group), layer, in_tuner)

    visit("", model, None, None, False)
    return list(entries.values()), len(layers)


# ---------------------------------------------------------------------------------------------------------------------
# Selection


def _parse_layers(spec) -> tuple[str, object] | None:
    """Syntax check of `layers`: ('indices', [ints]) or ('fraction', (side, fraction)); None for every layer."""
    if spec is None:
        return None
    if isinstance(spec, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in spec) and spec:
        return "indices", list(spec)
    if isinstance(spec, str):
        text = spec.replace(" ", "").lower()
        fraction = _FRACTION.fullmatch(text)
        if fraction:
            value = float(fraction.group(2)) if fraction.group(2) else 0.5
            if 0 < value <= 1:
                return "fraction", (fraction.group(1), value)
        else:
            indices = []
            for part in text.split(","):
                match = _RANGE.fullmatch(part)
                if not match:
                    break
                start, stop = int(match.group(1)), int(match.group(2) or match.group(1))
                if stop < start:
                    break
                indices.extend(range(start, stop + 1))
            else:
                return "indices", indices
    raise ValueError(
        f"Cannot read `layers={spec!r}`. Use a list of indices ([0, 1, -1]), a string of indices and inclusive ranges "
        "('0-5' or '0-5,8'), or a fraction: 'first_half', 'last_half', 'first:0.25', 'last:0.25' (fraction in (0, 1])."
    )


def _resolve_layers(spec, num_layers: int) -> list[int]:
    parsed = _parse_layers(spec)
    if parsed is None:
        return list(range(num_layers))
    kind, value = parsed
    if kind == "fraction":
        side, fraction = value
        count = max(1, int(fraction * num_layers + 0.5))
        return list(range(count)) if side == "first" else list(range(num_layers - count, num_layers))
    bad = [i for i in value if not -num_layers <= i < num_layers]
    if bad:
        raise ValueError(
            f"Layer indices {bad} are out of range: the model has {num_layers} decoder layers (0 to {num_layers - 1}, "
            f"or -{num_layers} to -1 from the end). Fix `layers`."
        )
    return sorted({i % num_layers for i in value})


def _matcher(spec):
    """PEFT's `target_modules` rule: a string is a full-match regex, a list holds names or `.`-suffixes."""
    if spec is None:
        return lambda name: False
    if isinstance(spec, str):
        pattern = re.compile(spec)
        return lambda name: pattern.fullmatch(name) is not None
    return lambda name: any(name == s or name.endswith(f".{s}") for s in spec)


def _ancestors(name: str) -> list[str]:
    """`a.b.c` → [`a`, `a.b`, `a.b.c`]: a module matches when it or an enclosing module does."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _plan(model: nn.Module, cfg: FreezeConfig) -> tuple[list[_Entry], int]:
    """Classify every tensor and mark the selected ones; raise on a selection that cannot be meant."""
    entries, num_layers = _classify(model)
    chosen = set(_resolve_layers(cfg.layers, num_layers))
    kind = type(model).__name__
    present = {g for e in entries for g in e.groups}
    missing = [g for g in cfg.groups or () if g not in present]
    if missing:
        raise ValueError(
            f"{kind} has no {missing} parameters (found: {', '.join(g for g in GROUPS + (OTHER,) if g in present)}). "
            f"Remove {missing} from `groups`."
        )
    module_names = [name for name, _ in model.named_modules() if name]
    for field_name in ("include", "exclude"):
        spec = getattr(cfg, field_name)
        for item in [spec] if isinstance(spec, str) else spec or []:
            match = _matcher(item if isinstance(spec, str) else [item])
            if not any(match(name) for name in module_names):
                raise ValueError(
                    f"`{field_name}` entry {item!r} matches no module of {kind} (names look like "
                    f"{module_names[len(module_names) // 2]!r}). A list holds module names or suffixes as in PEFT's "
                    r"`target_modules` ('q_proj', 'layers.0.mlp'); one string is a full-match regex (r'.*\.q_proj')."
                )
    include, exclude = _matcher(cfg.include), _matcher(cfg.exclude)
    both = [name for name in module_names if include(name) and exclude(name)]
    if both:
        raise ValueError(
            f"{both[0]!r} is matched by both `include` and `exclude`: a module cannot both train and stay frozen. "
            "Narrow one of them so that no module is in both."
        )
    everything = cfg.groups is None and cfg.include is None
    groups = set(cfg.groups or ())
    for entry in entries:
        included = any(include(a) for owner in entry.owners for a in _ancestors(owner))
        wanted = everything or bool(entry.groups & groups) or included
        if not wanted or (entry.layer is not None and entry.layer not in chosen):
            continue
        excluded = [o for o in entry.owners if any(exclude(a) for a in _ancestors(o))]
        if excluded and len(excluded) < len(entry.owners):
            kept = [o for o in entry.owners if o not in excluded]
            raise ValueError(
                f"`{entry.name}` is one tensor shared by {entry.owners} (tied input/output embeddings): `exclude` "
                f"freezes it as {excluded} while the selection trains it as {kept}. Exclude both names or neither, "
                "or untie the embeddings (`tie_word_embeddings=False`) before loading."
            )
        entry.selected = not excluded
    if not any(e.selected for e in entries):
        raise ValueError(
            f"The FreezeConfig selects no parameter of {kind} (groups={cfg.groups}, layers={cfg.layers!r} → "
            f"{sorted(chosen)}, include={cfg.include!r}, exclude={cfg.exclude!r}). Widen `groups`, `layers` or "
            "`include`, or narrow `exclude`."
        )
    return entries, num_layers


def _adapter_targets(model: nn.Module, cfg: FreezeConfig) -> tuple[list[str], set[int]]:
    """Names of the adapter-able layers inside the selection, and the `id`s of the selected tensors."""
    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError(
            "The model already has adapters. Pass the model before `get_peft_model`, or narrow an existing "
            "PeftModel with `freeze_for_peft(peft_model, cfg)`."
        )
    entries, _ = _plan(model, cfg)
    selected = {id(e.param) for e in entries if e.selected}
    out = model.get_output_embeddings()
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and module is not out and id(module.weight) in selected
    ]
    if not names:
        raise ValueError(
            f"The FreezeConfig selection holds no Linear/Conv1D layer of {type(model).__name__} to put an adapter on "
            "(norms, embeddings and the output layer never get one). Select 'attention' and/or 'mlp'."
        )
    return names, selected


# ---------------------------------------------------------------------------------------------------------------------
# Report


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] → '0-2, 5'."""
    spans, start = [], None
    for i, index in enumerate(indices):
        start = index if start is None else start
        if i + 1 == len(indices) or indices[i + 1] != index + 1:
            spans.append(f"{start}-{index}" if index != start else f"{index}")
            start = None
    return ", ".join(spans)


def _describe(entries: list[_Entry], num_layers: int) -> str:
    trained = [e for e in entries if e.param.requires_grad]
    if len(trained) == len(entries):
        return "all parameters"
    order = GROUPS + (OTHER,)

    def names(selection):
        found = {("embeddings (tied lm_head)" if e.tied else e.group) for e in selection}
        return ", ".join(sorted(found, key=lambda g: order.index(g.split(" ")[0])))

    inside = [e for e in trained if e.layer is not None]
    outside = [e for e in trained if e.layer is None]
    parts = []
    if inside:
        parts.append(f"{names(inside)} in layers {_ranges(sorted({e.layer for e in inside}))} (of {num_layers})")
    if outside:
        parts.append(f"{names(outside)} outside the layers")
    return "; ".join(parts)


def _report(entries: list[_Entry], num_layers: int, cfg: FreezeConfig, adapters_only: bool = False) -> FreezeReport:
    def counts():
        return {"trainable": 0, "frozen": 0}

    by_group = {g: counts() for g in GROUPS + (OTHER,) if any(e.group == g for e in entries)}
    by_layer = {str(i): counts() for i in range(num_layers)}
    by_layer[OUTSIDE] = counts()
    for entry in entries:
        key = "trainable" if entry.param.requires_grad else "frozen"
        by_group[entry.group][key] += entry.param.numel()
        by_layer[OUTSIDE if entry.layer is None else str(entry.layer)][key] += entry.param.numel()
    tied = next((e for e in entries if e.tied), None)
    note = None
    if tied is not None:
        state = "trains" if tied.param.requires_grad else "is frozen"
        note = (
            f"Input and output embeddings are tied: `{tied.name}` is also the output layer (`lm_head`), counted once "
            f"under `embeddings`; selecting either group trains the shared tensor. Here it {state}."
        )
    trainable = [e for e in entries if e.param.requires_grad]
    description = _describe(entries, num_layers)
    return FreezeReport(
        total=sum(e.param.numel() for e in entries),
        trainable=sum(e.param.numel() for e in trainable),
        by_group=by_group,
        by_layer=by_layer,
        trainable_names=[e.name for e in trainable],
        description=f"adapters on {description}" if adapters_only else description,
        tied_embeddings=note,
        adapters_only=adapters_only,
        config=asdict(cfg),
    )
