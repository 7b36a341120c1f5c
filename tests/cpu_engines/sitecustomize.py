"""Put on PYTHONPATH by the multi-process tests: every Python process they launch imports it at start-up.

accelerate 1.15 runs FSDP and DeepSpeed only on accelerator devices: on a CPU-only machine it silently falls back to
DDP (FSDP) or to one process per rank (DeepSpeed). In a process that `accelerate launch` started for an engine, this
turns the engine on for the CPU (gloo process group, CPU device), so the launched command itself runs unchanged; the
tests assert that the engine was active.
"""

import os

if os.environ.get("ACCELERATE_USE_FSDP") == "true" or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    PartialState._prepare_backend = lambda self, *args, **kwargs: ("gloo", DistributedType.MULTI_GPU)
