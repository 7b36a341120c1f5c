"""A real 2-process DDP run on CPU (gloo): both ranks end with identical, trained adapters."""

import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent


def test_two_process_ddp_keeps_ranks_identical(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(HERE / "ddp_train.py"), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["world"] == 2
    assert ranks[0]["state"].keys() == ranks[1]["state"].keys()
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name
    lora_b = [v for n, v in ranks[0]["state"].items() if "lora_B" in n]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # trained: B starts at zero
    logs = [log for log in ranks[0]["logs"] if "kl" in log]
    assert logs[0]["kl"] == 0.0 and logs[-1]["kl"] > 0
