"""`benchmarks/method_cost.py` times every protocol method through `Protocol.trainer`, at toy size. No timing
assertions."""

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "method_cost.py"


@pytest.fixture(scope="module")
def cost():
    spec = importlib.util.spec_from_file_location("sd_method_cost", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_every_method_is_built_by_the_protocol_and_timed(cost, capsys):
    rows = cost.main(["--smoke", "--methods", "selfdistill:2,freeze,lora_selfdistill,l2init:0.1,gkd,sdft"])
    assert [r["method"] for r in rows] == ["sft", "selfdistill:2", "freeze", "lora_selfdistill", "l2init:0.1", "gkd",
                                           "sdft"]  # SFT first: the reference
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    for r in rows:
        assert len(r["runs"][0]["step_times_s"]) == 3 and r["median_step_s"] > 0 and r["train_mem_mb"] is not None
    params = {r["method"]: r["trainable_parameters"] for r in rows}
    assert params["sft"] == params["gkd"] == params["l2init:0.1"] == params["sdft"]  # full fine-tuning
    assert params["freeze"] < params["sft"] and params["lora_selfdistill"] < params["sft"]  # attention, adapters
    table = capsys.readouterr().out
    assert "| sft | " in table and "| 1.00× |" in table and "| sdft | " in table


def test_budget_methods_are_refused_with_what_to_time_instead(cost):
    with pytest.raises(SystemExit, match="time `selfdistill`"):
        cost.main(["--smoke", "--methods", "sft,budget_stop"])


def test_a_method_run_in_its_own_process_reports_its_error(cost):
    spec = {"method": "nope", "steps": 3, "warmup": 1, "batch": 2, "seed": 0, "threads": 1, "smoke": True}
    failed = cost.dispatch(spec, inprocess=False)
    assert failed["status"] == "failed" and failed["method"] == "nope" and "Unknown method 'nope'" in failed["error"]
