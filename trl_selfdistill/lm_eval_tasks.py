"""lm-evaluation-harness tasks for the package's fact sets, and running lm-eval tasks on a loaded model.

The task YAMLs in `data/lm_eval/` (`LM_EVAL_DIR`) build their documents with the package itself (`utils.py` there):
each document's prompt is the package's prompt for the fact, and the metric is the package's exact match
(`knowledge.is_correct`), so `lm_eval --include_path <LM_EVAL_DIR> --tasks selfdistill_curated_known` reproduces
`trl-selfdistill eval` on the same facts in the same format. lm-eval is the optional extra `trl-selfdistill[lm-eval]`.
"""

from pathlib import Path

LM_EVAL_DIR = Path(__file__).resolve().parent / "data" / "lm_eval"
INSTALL_HINT = "pip install 'trl-selfdistill[lm-eval]'"


def shipped_tasks() -> list[str]:
    """The names of the task YAMLs shipped in `LM_EVAL_DIR`."""
    return sorted(path.stem for path in LM_EVAL_DIR.glob("*.yaml"))


def task_manager(include_defaults: bool = True):
    """lm-eval's `TaskManager` with the shipped tasks added (only them without `include_defaults`, which skips
    indexing lm-eval's thousands of task files); a clear error when lm-eval is not installed."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError(f"`--lm_eval_tasks` needs lm-evaluation-harness: `{INSTALL_HINT}`.") from error
    return TaskManager(include_path=str(LM_EVAL_DIR), include_defaults=include_defaults)


def check_tasks(names: list[str]):
    """The `TaskManager`, once every name is a known task (shipped or registered); raised before any model loads."""
    manager = task_manager(include_defaults=not set(names) <= set(shipped_tasks()))
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise ValueError(f"Unknown lm-eval tasks {unknown}. The package ships {shipped_tasks()}; `lm_eval ls tasks` "
                         "lists the others.")
    return manager


def run_tasks(model, tokenizer, names: list[str], *, limit: int | None = None, batch_size: int = 32,
              manager=None) -> tuple[dict[str, dict[str, float]], dict[str, str | None]]:
    """
    lm-eval's `simple_evaluate` on an already loaded `model` (a PEFT model included, where it is), greedy as each
    task says. Returns task → {metric: value} (lm-eval's `metric,filter` keys, standard errors left out) and task →
    the dataset it reads (`dataset_path` of its config: a Hub id for the standard benchmarks, None for the shipped
    tasks, which build their documents from the package's facts).
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    output = simple_evaluate(model=lm, tasks=names, limit=limit, task_manager=manager or check_tasks(names),
                             log_samples=False)
    metrics = {
        task: {key: value for key, value in values.items()
               if "," in key and "_stderr" not in key and isinstance(value, (int, float))}  # `metric,filter` keys
        for task, values in output["results"].items()
    }
    datasets = {task: (output["configs"].get(task) or {}).get("dataset_path") for task in metrics}
    return metrics, datasets
