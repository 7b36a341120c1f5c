"""The Hub push: it uploads the files this run's save wrote (its upload manifest), the card and this run's results.

`push_to_hub` saves the model and writes the card before uploading, so a failed upload leaves everything on disk.
Every save through `save_with_manifest` (each `SelfDistillSFTTrainer.save_model`, checkpoints included) records the
files it created or rewrote in its folder: that list is what a push uploads, so files left by an earlier run (a LoRA
adapter beside a full fine-tune's weights, a shard index pointing at deleted shards) never go up. The manifest is
further cut to an allowlist (`UPLOAD_PATTERNS`: weights or adapter, configs, tokenizer files, the card), copied into
a staging folder with the local paths inside the JSON configs cut to their last component and secrets redacted:
never `training_args.bin`, checkpoints, or any other file that happens to lie in `output_dir` (a `.env`, logs). What
goes up is printed (`[trl_selfdistill] uploading ...`). Checkpoint pushes during training (`hub_strategy`) go through
the same manifest and allowlist, and are refused for a checkpoint without weights.
"""

import fnmatch
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import httpx2
from huggingface_hub import HfApi
from transformers.utils.hub import PushInProgress

from .config import HF_TOKEN
from .knowledge.callback import RESULTS_FILE
from .model_card import REDACTED, _sanitize_tree, display_name, run_results, sanitize, write_model_card
from .validation import WEIGHT_PATTERNS, check_json_file

logger = logging.getLogger(__name__)

# What a model repo needs, matched against file names at the top of the folder; nothing else is uploaded
UPLOAD_PATTERNS = (
    "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model*.bin.index.json",
    "adapter_model.bin", "config.json", "generation_config.json", "adapter_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "tokenizer.model", "*.tiktoken", "spiece.model", "chat_template.jinja",
    "chat_template.json", "processor_config.json", "preprocessor_config.json", "README.md", ".eval_results/*.yaml",
)
# What resuming from a pushed checkpoint needs besides the model (`hub_strategy="checkpoint"`/`"all_checkpoints"`)
RESUME_PATTERNS = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth", "trainer_state.json")
# JSON files whose listed keys hold the local path a model was loaded from: cut to its last component on upload
PATH_KEYS = {
    "config.json": ("_name_or_path",),
    "adapter_config.json": ("base_model_name_or_path",),
    "tokenizer_config.json": ("name_or_path",),
    "trainer_state.json": ("best_model_checkpoint",),
}

def _stamps(folder: Path) -> dict[str, tuple]:
    """Identity and times of the files of `folder`, at its top and one folder down (not in `checkpoint-*`), by path
    relative to it: any write changes them."""
    if not folder.is_dir():
        return {}
    files = []
    for path in folder.iterdir():
        if path.is_dir() and not path.name.startswith("checkpoint-"):
            files += [sub for sub in path.iterdir() if sub.is_file()]
        elif path.is_file():
            files.append(path)
    stamps = {}
    for path in files:
        stat = path.stat()
        stamps[path.relative_to(folder).as_posix()] = (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    return stamps


def _written(action, folder: Path):
    """Run `action()`; return its result, the files of `folder` it created or rewrote, and those there before."""
    before = _stamps(folder)
    result = action()
    return result, sorted(name for name, stamp in _stamps(folder).items() if before.get(name) != stamp), before


def save_with_manifest(trainer, save, folder):
    """
    Run `save()` (a save into `folder`) and record in `trainer._upload_manifests` the files it created or rewrote
    there, and the folder's files before; returns what `save()` returns.
    """
    folder = Path(folder)
    result, written, before = _written(save, folder)
    trainer.__dict__.setdefault("_upload_manifests", {})[str(folder.resolve())] = (written, before)
    return result


def _manifest(trainer, folder: Path, resume: bool) -> list[str] | None:
    """The files of `folder` a push may upload: those this run's last save there wrote (with `resume`, also the resume
    files written since that save began: Trainer writes them after the model). None when no save of this run recorded
    that folder."""
    record = getattr(trainer, "_upload_manifests", {}).get(str(folder.resolve()))
    if record is None:
        return None
    written, before = record
    if not resume:
        return written
    fresh = [name for name, stamp in _stamps(folder).items()
             if any(fnmatch.fnmatch(name, p) for p in RESUME_PATTERNS) and before.get(name) != stamp]
    return sorted({*written, *fresh})


def _display_path(value):
    return display_name(value) if isinstance(value, str) and value else value


def _copy_for_upload(source: Path, target: Path) -> None:
    """Copy `source` to `target`; JSON configs with local paths cut to their last component, secrets redacted."""
    if source.name in PATH_KEYS:
        check_json_file(source, "It is not what this run saved: delete it (or the whole folder) and push again.")
        data = json.loads(source.read_text(encoding="utf-8"))
        for key in PATH_KEYS[source.name]:
            if key in data:
                data[key] = _display_path(data[key])
        if source.name != "tokenizer_config.json":  # tokenizer strings are vocabulary: leave them byte-exact
            data = _sanitize_tree(data)
        target.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    elif source.name == "README.md" or source.suffix == ".yaml":  # the card and the Hub's eval results
        target.write_text(sanitize(source.read_text(encoding="utf-8")), encoding="utf-8")
    else:
        try:
            os.link(source, target)  # weights can be large: no copy where the file system allows
        except OSError:
            shutil.copy2(source, target)


def _check_consistent(folder: Path, names: list[str]) -> None:
    """Refuse an upload whose files contradict each other: a shard index naming shards it does not upload, or an
    adapter beside full weights (`from_pretrained` would attach the adapter to them)."""
    for index in [name for name in names if name.endswith(".index.json")]:
        check_json_file(folder / index, "It is not what this run saved: delete it and push again.")
        shards = set(json.loads((folder / index).read_text(encoding="utf-8")).get("weight_map", {}).values())
        missing = sorted(shards - set(names))
        if missing:
            raise ValueError(
                f"{folder / index} names shards that would not be uploaded ({', '.join(missing[:3])}): it is an "
                "earlier save's. Delete it, save the model again, and push."
            )
    adapter = [name for name in names if name.startswith("adapter_model.")]
    full = [name for name in names if name.startswith(("model", "pytorch_model")) and not name.endswith(".json")]
    if adapter and full:
        raise ValueError(
            f"{folder} holds both an adapter ({', '.join(adapter)}) and full weights ({', '.join(full)}): one is an "
            "earlier run's, and `from_pretrained` on the repo would load a different model from the one trained. "
            "Delete the earlier run's files (or save into a fresh `output_dir`) and push again."
        )


def stage_upload(folder: str | os.PathLike, patterns=UPLOAD_PATTERNS, results: dict | None = None,
                 names: list[str] | None = None) -> Path:
    """
    A temporary folder holding what may leave the machine from `folder`: its files among `names` (a save's manifest;
    None: all of them) that match `patterns`, and `results` as the results file (see the module docstring).
    """
    folder, staging = Path(folder), Path(tempfile.mkdtemp(prefix="trl_selfdistill_upload_"))
    # Files at the top are matched by the patterns without a "/", files in a subfolder by those with one
    chosen = [
        name for name in sorted(_stamps(folder))
        if name != RESULTS_FILE  # only this run's results go up, written from memory
        and (names is None or name in names)
        and any(fnmatch.fnmatch(name, pattern) for pattern in patterns if ("/" in pattern) == ("/" in name))
    ]
    try:
        _check_consistent(folder, chosen)
        for name in chosen:
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            _copy_for_upload(folder / name, staging / name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if results is not None:
        (staging / RESULTS_FILE).write_text(json.dumps(_sanitize_tree(results), indent=2), encoding="utf-8")
    return staging


def _log_upload(staging: Path, repo_id: str, path_in_repo: str | None = None) -> list[str]:
    files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
    where = f"{repo_id}/{path_in_repo}" if path_in_repo else repo_id
    print(f"[trl_selfdistill] uploading to {where}: {', '.join(files)}")
    return files


def upload_staged(api: HfApi, staging: Path, blocking: bool, **upload_kwargs):
    """Upload a staging folder and delete it once the upload is done (at once, or when the future completes)."""
    _log_upload(staging, upload_kwargs.get("repo_id"), upload_kwargs.get("path_in_repo"))
    if blocking:
        try:
            return api.upload_folder(folder_path=str(staging), **upload_kwargs)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    try:
        future = api.upload_folder(folder_path=str(staging), run_as_future=True, **upload_kwargs)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    future.add_done_callback(lambda _future: shutil.rmtree(staging, ignore_errors=True))
    return future


def _wait_for_checkpoint_pushes(trainer) -> None:
    pending = getattr(trainer, "push_in_progress", None)
    if pending is not None and not pending.is_done():
        pending.wait_until_done()


def push_to_hub(
    trainer,
    commit_message: str | None = "End of training",
    blocking: bool = True,
    token: str | None = None,
    revision: str | None = None,
    private: bool | None = None,
    **kwargs,
):
    """
    Save the model and write the card into `output_dir`, then upload what that save wrote, the card and this run's
    results (see the module docstring) to `hub_model_id` (created if needed).

    Saving comes first, so a failed upload (no network, no token, no permission, unknown repo) loses nothing: the
    `RuntimeError` it raises says how to upload the folder later. With `blocking=False`, the returned future carries
    the upload (and its errors). `kwargs` (`model_name`, `dataset_name`, `tags`) go to the card.
    """
    args = trainer.args
    trainer.callback_handler.on_push_begin(args, trainer.state, trainer.control)
    save_with_manifest(trainer, lambda: trainer.save_model(_internal_call=True), args.output_dir)
    if not trainer.is_world_process_zero():
        return None
    folder = Path(args.output_dir)
    _, card_files, _ = _written(
        lambda: write_model_card(trainer, kwargs.get("model_name"), kwargs.get("dataset_name"), kwargs.get("tags")),
        folder,
    )
    token = token if token is not None else args.hub_token
    names = [*_manifest(trainer, folder, resume=False), *card_files, "README.md"]
    staging = stage_upload(folder, results=run_results(trainer), names=names)
    _check_weights(folder, staging, checkpoint=False)
    try:
        api = HfApi(token=token)
        if trainer.hub_model_id is None:
            name = args.hub_model_id or Path(args.output_dir).absolute().name
            private = private if private is not None else args.hub_private_repo
            trainer.hub_model_id = api.create_repo(name, private=private, exist_ok=True).repo_id
        _wait_for_checkpoint_pushes(trainer)
        return upload_staged(
            api, staging, blocking, repo_id=trainer.hub_model_id, commit_message=commit_message,
            revision=revision if revision is not None else args.hub_revision,
        )
    except (OSError, httpx2.HTTPError) as err:  # huggingface_hub's HTTP and token errors, and connection errors
        shutil.rmtree(staging, ignore_errors=True)  # (already gone when the upload itself failed)
        output_dir = HF_TOKEN.sub(REDACTED, str(args.output_dir))  # as configured, so the hint works
        repo_id = trainer.hub_model_id or args.hub_model_id or Path(output_dir).name
        raise RuntimeError(
            f"Uploading to the Hub repo {repo_id!r} failed ({type(err).__name__}). Nothing is lost: the model, the "
            f"model card (README.md) and the evaluation results are saved in {output_dir!r}. To fix: log in with "
            "`hf auth login` or set the `HF_TOKEN` environment variable to a token with write access, and check that "
            f"`hub_model_id` names a repo you may write to ({repo_id!r}). Then call `trainer.push_to_hub()` again: it "
            "uploads this run's files only, sanitised (uploading the whole folder by hand would also send what an "
            "earlier run left there)."
        ) from err


def _check_weights(folder: Path, staging: Path, checkpoint: bool) -> None:
    """Refuse a push without model weights: configs and tokenizer alone are no usable model."""
    if any(next(staging.glob(pattern), None) is not None for pattern in WEIGHT_PATTERNS):
        return
    shutil.rmtree(staging, ignore_errors=True)
    raise ValueError(
        f"{'The checkpoint ' if checkpoint else ''}{folder} has no model weights to push (the save wrote no "
        "*.safetensors, pytorch_model*.bin or adapter_model.*): the push would upload configs and tokenizer only. "
        "Under DeepSpeed ZeRO-3 set `stage3_gather_16bit_weights_on_model_save: true`, under FSDP "
        "`fsdp_state_dict_type: FULL_STATE_DICT`, so that saves hold the weights"
        + ("; or push at the end of training only (`hub_strategy='end'`)." if checkpoint else ".")
    )


def push_checkpoint(trainer, checkpoint_folder: str) -> None:
    """
    The checkpoint push of `hub_strategy` (`every_save`, `checkpoint`, `all_checkpoints`), through the manifest of
    the checkpoint's save and the allowlist: the checkpoint's model files and the current card at the repo root; with
    `checkpoint`/`all_checkpoints`, also what resuming needs (`RESUME_PATTERNS`) under `last-checkpoint/` or the
    checkpoint's name. Refused for a checkpoint without weights. Asynchronous, like Trainer's own; `push_to_hub()`
    waits for it.
    """
    args = trainer.args
    if not trainer.is_world_process_zero() or args.hub_strategy == "end":
        return
    pending = getattr(trainer, "push_in_progress", None)
    if not args.hub_always_push and pending is not None and not pending.is_done():
        return
    folder = Path(checkpoint_folder)
    staging = stage_upload(folder, results=run_results(trainer), names=_manifest(trainer, folder, resume=False))
    _check_weights(folder, staging, checkpoint=True)
    trainer.callback_handler.on_push_begin(args, trainer.state, trainer.control)
    api = HfApi(token=args.hub_token)
    state = trainer.state
    step = f"step {state.global_step}" if args.save_strategy == "steps" else f"epoch {int(state.epoch)}"
    card = Path(args.output_dir) / "README.md"
    if card.is_file():
        _copy_for_upload(card, staging / "README.md")
    upload = dict(repo_id=trainer.hub_model_id, revision=args.hub_revision)
    jobs = [upload_staged(api, staging, False, commit_message=f"Training in progress, {step}", **upload)]
    if args.hub_strategy in ("checkpoint", "all_checkpoints"):
        resume = stage_upload(folder, patterns=UPLOAD_PATTERNS + RESUME_PATTERNS,
                              names=_manifest(trainer, folder, resume=True))
        path_in_repo = "last-checkpoint" if args.hub_strategy == "checkpoint" else folder.name
        jobs.append(upload_staged(api, resume, False, path_in_repo=path_in_repo,
                                  commit_message=f"Training in progress, {step}, checkpoint", **upload))
    if pending is None or pending.is_done():
        trainer.push_in_progress = PushInProgress(jobs)
    else:
        pending.jobs.extend(jobs)
