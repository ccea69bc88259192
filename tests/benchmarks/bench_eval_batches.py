"""What a forward's rows cost the evaluation: its RM and KL passes at several rows per forward, measured in one run.

    python tests/benchmarks/bench_eval_batches.py --baseline out/demo/sft --model out/demo/ppo_gold \
        --rm out/demo/rm --data out/demo/data/heldout.jsonl --rows 64,16

Samples the model's responses to the held-out prompts once, as the evaluation does (--batch-size rows per generation
batch), then for each --rows value times the passes that `python -m nanorlhf.evaluate` makes over those samples:
the RM's judgement (`Rewarder`) and the summed logprobs of the model and of the baseline (the KL). Each pass sorts
its rows by length, so what a larger batch adds is padding up to its longest row: the table prints the padded
tokens per real token beside the seconds, and each setting's time as a ratio to the first.
"""
import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from nanorlhf import model as M  # noqa: E402
from nanorlhf.data import load_prompts  # noqa: E402
from nanorlhf.engine import generate_all  # noqa: E402
from nanorlhf.preference import summed_logprobs  # noqa: E402
from nanorlhf.rewards import Rewarder  # noqa: E402


def padded(lengths, rows):
    """Tokens a pass computes over `lengths` sorted into batches of `rows`, padding included."""
    lengths = sorted(lengths)
    return sum(max(lengths[i:i + rows]) * len(lengths[i:i + rows]) for i in range(0, len(lengths), rows))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", required=True, help="The baseline model (the demo's out/demo/sft).")
    p.add_argument("--model", required=True, help="The model whose samples are judged (e.g. out/demo/ppo_gold).")
    p.add_argument("--rm", required=True, help="The reward model that judges (the demo's out/demo/rm).")
    p.add_argument("--data", required=True, help="Held-out prompts (the demo's out/demo/data/heldout.jsonl).")
    p.add_argument("--limit", type=int, default=128, help="Prompts used (the demo's --heldout).")
    p.add_argument("--rows", default="64,16", help="Rows per forward to compare, comma-separated.")
    p.add_argument("--batch-size", type=int, default=64, help="Rows per generation batch (the demo's).")
    p.add_argument("--dtype", default="bfloat16", help="Compute dtype (the demo's where the CPU has native bf16).")
    args = p.parse_args()

    base, tokenizer = M.load_model(args.baseline, dtype=args.dtype)
    model, _ = M.load_model(args.model, dtype=args.dtype)
    rewarder = Rewarder(tokenizer, [args.rm], dtype=args.dtype)
    prompts = load_prompts(args.data, tokenizer, 256, None, args.limit, flag="--data")
    queries = [q.ids for q in prompts]
    torch.manual_seed(0)
    responses, ended = generate_all(model, tokenizer, queries, 48, 0.7, args.batch_size)
    rows = list(zip(queries, responses))
    lengths = [len(q) + len(r) for q, r in rows]
    summed_logprobs(base, rows[:2], 0, 0.7)  # compile the logprob kernel before any timing

    print(f"{len(rows)} samples, {sum(lengths)} real tokens; dtype {args.dtype}, {torch.get_num_threads()} threads")
    print("| rows per forward | padded / real tokens | RM s | KL s (model + baseline) | total s | time vs first |")
    print("|---|---|---|---|---|---|")
    first = None
    for n in [int(x) for x in args.rows.split(",")]:
        t0 = time.perf_counter()
        rewarder(prompts, queries, responses, ended, n)
        t1 = time.perf_counter()
        with torch.no_grad():
            summed_logprobs(model, rows, 0, 0.7, n)
            summed_logprobs(base, rows, 0, 0.7, n)
        t2 = time.perf_counter()
        first = first or t2 - t0
        print(f"| {n} | {padded(lengths, n) / sum(lengths):.2f} | {t1 - t0:.1f} | {t2 - t1:.1f} | {t2 - t0:.1f} | "
              f"{(t2 - t0) / first:.2f} |", flush=True)


if __name__ == "__main__":
    main()
