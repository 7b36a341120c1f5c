"""Live `[rows, V]` fp32 buffers of the fused loss at its peak, per loss path, counted from the allocator.

The count is exact: `torch.profiler` with `profile_memory=True` records every allocation and free of torch's CPU
allocator, and the peak of their running sum is the most bytes the loss held at once. That is what the chunk budget
(`FUSED_BUFFERS`) must cover. A process's RSS peak is higher: glibc keeps freed large blocks in its heap (its mmap
threshold grows to the largest block freed, up to 32 MiB, so later `[rows, V]` blocks come from the heap and are not
returned to the system); `MALLOC_MMAP_THRESHOLD_=<bytes>` in the environment fixes the threshold and turns that off.

    python benchmarks/fused_live_buffers.py                       # every path, small shapes (seconds)
    python benchmarks/fused_live_buffers.py --vocab 151936 --hidden 1536 --seq 128   # the docs' scaling cell
"""

import argparse
import contextlib

import torch
from torch.profiler import ProfilerActivity, profile

from trl_selfdistill.losses import LMHead, TeacherTarget, fused_chunk_rows, fused_token_losses

# The loss paths of `fused_token_losses` (β, soft-capping, teacher kind, DFT, top-k outputs for the cache)
PATHS = {
    "closed-form forward KL": dict(beta=0.0),
    "closed-form, DFT + top-k outputs (cache fill)": dict(beta=0.0, dft=True, topk=8),
    "autograd, beta=0.5 (JSD)": dict(beta=0.5),
    "autograd, beta=1 (reverse KL)": dict(beta=1.0),
    "autograd, soft-capped head": dict(beta=0.0, softcap=30.0),
    "autograd, JSD + top-k outputs (cache fill)": dict(beta=0.5, topk=8),
    "cached top-k teacher": dict(beta=0.0, cached=True),
}


def peak_bytes(fn) -> int:
    """Most bytes torch's CPU allocator held at once while `fn()` ran, beyond what it held before."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events()
    events = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def live_buffers(n: int, vocab: int, hidden: int, rows: int, beta: float = 0.0, softcap: float | None = None,
                 dft: bool = False, topk: int | None = None, cached: bool = False, train_head: bool = False,
                 autocast: bool = False, seed: int = 0) -> float:
    """Peak bytes of one `fused_token_losses` forward + backward, less its `[N, H]` (and `[V, H]`) gradient
    accumulators and, under bf16 `autocast`, the head's bf16 copy, in units of one fp32 `[rows, V]` buffer."""
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(vocab, hidden, generator=generator) * 0.3).requires_grad_(train_head)
    head = LMHead(weight, softcap=softcap)
    hidden_states = torch.randn(n, hidden, generator=generator, requires_grad=True)
    targets = torch.randint(0, vocab, (n,), generator=generator)
    weights = torch.full((n,), 1.0 / n)
    if cached:
        k = 8
        top = torch.randn(n, vocab, generator=generator).log_softmax(-1).topk(k, dim=-1)
        teacher = TeacherTarget(topk_ids=top.indices.to(torch.int32), topk_logps=top.values)
    else:
        teacher = TeacherTarget(torch.randn(n, hidden, generator=generator), LMHead(weight.detach(), softcap=softcap))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = fused_token_losses(hidden_states, head, targets, teacher, weights, weights, beta=beta,
                                      temperature=0.5, dft=dft, topk=topk, rows=rows).loss
        loss.backward()

    step()  # warm-up: lazily built kernels and thread pools allocate once
    hidden_states.grad = weight.grad = None
    persistent = n * hidden * 4 + (vocab * hidden * 4 if train_head else 0)  # the accumulators, held by every chunk
    if autocast:
        persistent += vocab * hidden * 2 + n * hidden * 2  # the bf16 head (shared with the teacher) and hidden states
        persistent += vocab * hidden * 2 if train_head else 0  # a chunk's bf16 weight-gradient product
    return (peak_bytes(step) - persistent) / (rows * vocab * 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seq", type=int, default=40, help="rows N (several chunks, the last one partial)")
    parser.add_argument("--rows", type=int, default=None, help="chunk rows (default: the automatic size, at most 16)")
    parser.add_argument("--train-head", action="store_true", help="the head gets a gradient (full fine-tuning)")
    parser.add_argument("--autocast", action="store_true", help="under bf16 autocast (mixed-precision training)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = args.rows or min(16, fused_chunk_rows(args.vocab))
    print(f"V={args.vocab} H={args.hidden} N={args.seq} rows={rows}: peak live bytes / (rows·V·4)")
    for name, path in PATHS.items():
        with contextlib.redirect_stderr(None):
            count = live_buffers(args.seq, args.vocab, args.hidden, rows, train_head=args.train_head,
                                 autocast=args.autocast, **path)
        print(f"  {name:48s} {count:5.2f}")


if __name__ == "__main__":
    main()
