"""Peak memory and time of the fused logprob kernel vs eager log_softmax -> gather vs TRL.

    python tests/benchmarks/bench_kernels.py                 # SmolLM2 and Llama-3 shapes
    python tests/benchmarks/bench_kernels.py --shapes 8192,576,49152 --repeats 5

Forward + backward of loss = -logprobs.mean(), fp32, side by side in one run, at the SmolLM2 shape
(H=576, V=49152) and a Llama-3-8B shape (H=4096, V=128256; only 256 tokens, so that a CPU finishes
it in minutes). TRL's `selective_log_softmax` (trl.trainer.utils) joins when trl is installed
(`pip install -e .[bench]`): it takes full logits, so its row starts from the same `hidden @ weight.T`
as eager.
Peak memory is the allocation peak of one step above what was allocated before it:
- CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats.
- CPU: torch.profiler(profile_memory=True) records every allocation and free made through the
  CPU allocator (inductor's buffers included) with its size; the peak is the largest running sum.
  Profiling slows the step, so times come from separate, unprofiled repeats (median).
Not collected by pytest (no test_ prefix).
"""
import argparse
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # silence the profiler's allocator notes
import torch  # noqa: E402
from torch._C._profiler import _EventType  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # runs from anywhere
from nanorlhf.kernels import chunk_rows, token_logprobs  # noqa: E402


def peak_bytes(fn):
    """Allocation peak (bytes) of fn() above the memory allocated before it started."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:  # flatten the event tree, keep allocation events
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation:
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
    peak = running = 0
    for _, size in sorted(events):
        running += size
        peak = max(peak, running)
    return peak


def seconds(fn):
    """Wall time of one call of fn()."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def eager_logprobs(hidden, weight, targets):
    return torch.log_softmax(hidden @ weight.t(), -1).gather(-1, targets[:, None]).squeeze(-1)


def trl_logprobs():
    """TRL's selective_log_softmax over full logits, or None when trl is not installed."""
    try:
        from trl.trainer.utils import selective_log_softmax
    except ImportError:
        return None
    return lambda h, w, y: selective_log_softmax(h @ w.t(), y)


def bench(n_tokens, n_hidden, vocab, args, dev):
    """Print one table: frozen and trainable lm_head, every method, ratios to eager."""
    load0 = os.getloadavg()[0]  # 1-minute load: other jobs on the machine make times noisy
    torch.manual_seed(0)
    hidden = torch.randn(n_tokens, n_hidden, device=dev)
    weight = torch.randn(vocab, n_hidden, device=dev) / n_hidden**0.5
    targets = torch.randint(0, vocab, (n_tokens,), device=dev)

    def step(fn, train_head):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_(train_head)

        def run():
            h.grad = w.grad = None
            (-fn(h, w, targets).mean()).backward()
        return run

    fused = lambda h, w, y: token_logprobs(h, w, y, chunk_size=args.chunk)  # noqa: E731
    rows = []
    for head in ("frozen", "trainable"):
        methods = {"eager": eager_logprobs, "trl": trl_logprobs(), "fused": fused}
        runs = {k: step(fn, head == "trainable") for k, fn in methods.items() if fn is not None}
        for run in runs.values():
            run()  # warmup: compiles the chunk functions
        times = {k: [] for k in runs}
        for _ in range(args.repeats):  # interleaved, so background load hits both alike
            for k, run in runs.items():
                times[k].append(seconds(run))
        for k, run in runs.items():
            rows.append((head, k, peak_bytes(run), statistics.median(times[k])))

    chunk = chunk_rows(n_tokens, vocab, args.chunk)
    print(f"\ndevice={dev} threads={torch.get_num_threads()} N={n_tokens} H={n_hidden} "
          f"V={vocab} chunk={chunk} fp32, fwd+bwd of -logprobs.mean(), "
          f"median of {args.repeats}, load avg {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    fmt = "{:<10}{:<8}{:>10}{:>9}{:>11}{:>12}"
    print(fmt.format("lm_head", "method", "peak MiB", "time s", "mem ratio", "time ratio"))
    for head, k, mem, t in rows:
        mem0, t0 = next((m, s) for hd, kk, m, s in rows if hd == head and kk == "eager")
        print(fmt.format(head, k, f"{mem / 2**20:.1f}", f"{t:.3f}", f"{mem / mem0:.3f}", f"{t / t0:.3f}"), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["8192,576,49152", "256,4096,128256"],
                    help="tokens,hidden,vocab per table (default: SmolLM2, then Llama-3-8B)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=None, help="chunk size (default: from vocab)")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for shape in args.shapes:
        bench(*map(int, shape.split(",")), args, dev)


if __name__ == "__main__":
    main()
