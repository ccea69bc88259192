"""Where a demo RL iteration's time goes, per phase and per compute dtype, measured in one run.

    python tests/benchmarks/bench_phases.py --sft out/demo/sft --data out/demo/data/prompts.jsonl --stage ppo_gold \
        --iterations 2 --dtypes float32,bfloat16

Runs the demo's own stage command (nanorlhf.demo.stages, so the flags are the demo's) for --iterations
iterations in each dtype, one after the other from the same SFT model and seed, each in its own process, and
prints for every iteration: the seconds, tokens, tokens/s and MFU of generation, scoring and update, as the stage
logged them (perf/* in metrics.jsonl; FLOPs counted as nanorlhf/perf.py says), then each dtype's mean iteration
time and the ratio to the first dtype. The first iteration includes torch.compile's warm-up of the logprob kernel.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from nanorlhf.demo import stages  # noqa: E402

PHASES = ("generate", "score", "update")


def run(stage, sft, data, iterations, dtype, out, extra):
    argv = dict(stages(out, {"sft": "", "prompts": data, "heldout": ""}, 1.0, "smollm2"))[stage]
    argv = [a.replace(os.path.join(out, "sft"), sft) for a in argv]
    i = argv.index("--max-steps")
    argv[i + 1] = str(iterations)
    cmd = [sys.executable, *argv, "--dtype", dtype, "--overwrite", "--sample-every", "0", *extra]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(out, stage, "metrics.jsonl")) as f:
        return [row for row in map(json.loads, f) if "time/generate" in row]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sft", required=True, help="The demo's SFT output (python -m nanorlhf.demo writes out/demo/sft).")
    p.add_argument("--data", required=True, help="Training prompts (the demo's out/demo/data/prompts.jsonl).")
    p.add_argument("--stage", default="ppo_gold", choices=["ppo_gold", "ppo_rm"],
                   help="Which demo stage (ppo_rm needs out/demo/rm beside the SFT folder).")
    p.add_argument("--iterations", type=int, default=2, help="Iterations per dtype.")
    p.add_argument("--dtypes", default="float32,bfloat16", help="Comma-separated compute dtypes, the first the base.")
    p.add_argument("--extra", default="", help="More flags for the stage, e.g. '--batch-size 16'.")
    args = p.parse_args()
    means = {}
    with tempfile.TemporaryDirectory() as out:
        if args.stage == "ppo_rm":
            os.symlink(os.path.join(os.path.dirname(os.path.abspath(args.sft)), "rm"), os.path.join(out, "rm"))
        for dtype in args.dtypes.split(","):
            rows = run(args.stage, os.path.abspath(args.sft), os.path.abspath(args.data), args.iterations, dtype,
                       out, args.extra.split())
            print(f"\n{args.stage}, {dtype}")
            print("| iteration | " + " | ".join(f"{ph} s | {ph} tokens/s | {ph} MFU" for ph in PHASES) + " | total s |")
            print("|---" * (3 * len(PHASES) + 2) + "|")
            for row in rows:
                cells = [f"{row[f'time/{ph}']:.1f} | {row[f'perf/{ph}_tokens_per_s']:.0f} | "
                         f"{row[f'perf/{ph}_mfu']:.1%}" for ph in PHASES]
                print(f"| {row['step']} | " + " | ".join(cells) + f" | {row['step_time']:.1f} |")
            later = rows[1:] or rows  # past the compile warm-up
            means[dtype] = sum(r["step_time"] for r in later) / len(later)
    base = next(iter(means))
    print("\nmean iteration time past the first: " + ", ".join(
        f"{d} {s:.1f} s ({means[base] / s:.2f}x {base})" for d, s in means.items()))


if __name__ == "__main__":
    main()
