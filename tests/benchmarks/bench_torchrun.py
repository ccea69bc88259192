"""The same SFT run as 1 process and as 2 torchrun processes (gloo on the CPU), on the embedded SmolLM2-135M.

    python tests/benchmarks/bench_torchrun.py                  # 8 steps of 8 examples, 2 threads in total each way
    python tests/benchmarks/bench_torchrun.py --steps 16 --batch 16

1 process takes `--batch` examples per step; 2 processes take `--batch / 2` each, over the same examples in the
same order, so the runs must agree step for step. Each way gets the machine's `--threads` cores in total (1
process × threads, or 2 × threads/2), so the ratio is what torchrun buys on this machine, not more cores.
Prints the largest per-step loss difference, the largest adapter difference, and the median step time of each
way with their ratio (step 1 is left out: it holds the first allocation).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(cmd, threads, out):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TQDM_DISABLE="1", PYTHONPATH=ROOT)
    r = subprocess.run(cmd + ["--out", out], cwd=ROOT, capture_output=True, text=True, env=env)
    if r.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if "loss" in r]
    return rows, load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))


def sft_command(model, steps):
    """train_sft.py and its flags, without --batch-size and --out (tests/test_benchmarks.py parses them)."""
    return ["train_sft.py", "--model", model, "--data", "data/alpaca_en_demo.json", "--max-steps", str(steps),
            "--grad-accum", "1", "--lr", "1e-3", "--eval-frac", "0", "--max-length", "160", "--samples", "0",
            "--log-every", "1"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8, help="Optimizer steps per run.")
    p.add_argument("--batch", type=int, default=8, help="Global batch (examples per optimizer step).")
    p.add_argument("--threads", type=int, default=2, help="Cores each way gets in total.")
    p.add_argument("--model", default="smollm2", help="Model to fine-tune.")
    a = p.parse_args()
    sft = sft_command(a.model, a.steps)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    with tempfile.TemporaryDirectory() as tmp:
        one, w1 = run([sys.executable] + sft + ["--batch-size", str(a.batch)], a.threads, f"{tmp}/one")
        two, w2 = run(torchrun + sft + ["--batch-size", str(a.batch // 2)], max(1, a.threads // 2), f"{tmp}/two")
    dloss = max(abs(x["loss"] - y["loss"]) for x, y in zip(one, two))
    dadapter = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    t1, t2 = (statistics.median(r["step_time"] for r in rows[1:]) for rows in (one, two))
    print(f"SFT on {a.model}, {a.steps} steps × {a.batch} examples, {a.threads} cores each way")
    print(f"  losses step 1..{a.steps}: 1 process {one[0]['loss']:.4f} .. {one[-1]['loss']:.4f}, "
          f"largest per-step |Δ| {dloss:.1e}; largest adapter |Δ| {dadapter:.1e}")
    print(f"  median step time: 1 process {t1:.2f} s, 2 processes {t2:.2f} s, ratio 2/1 = {t2 / t1:.2f}")


if __name__ == "__main__":
    main()
