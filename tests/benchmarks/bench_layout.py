"""What the rollout's model-input layout costs PPO's scoring and update, measured in one run.

    python tests/benchmarks/bench_layout.py --sft out/demo/sft --data out/demo/data/prompts.jsonl

Samples --rollouts responses of the SFT model (with a fresh policy adapter) to the first training prompts once, as a
demo PPO iteration does, then times PPO's two model phases over that one batch under two layouts of the model inputs,
alternating, --repeats times each:
  - side by side: each row its left-padded prompt, then its right-padded response, (B, P + R), as
    `nanorlhf.rollout.join` laid it out until 2026-12-01;
  - packed: each row its prompt, then its response, then padding, (B, T) (`nanorlhf.rollout.join` now).
Scoring is the policy and reference passes of `train_ppo.score_tokens` over length-sorted micro-batches of
--batch-size; the update is a forward and backward of the policy over shuffled minibatches of --batch-size, as
one PPO epoch at the demo's minibatch 8. The table prints the positions each layout computes per real token, the
median seconds, the ratio to side by side, and the largest difference of the logprobs the two layouts give.
"""
import argparse
import contextlib
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from nanorlhf import model as M  # noqa: E402
from nanorlhf import rollout  # noqa: E402
from nanorlhf.data import load_prompts  # noqa: E402
from nanorlhf.lora import add_lora  # noqa: E402


def side_by_side(queries, query_mask, responses, mask):
    """The earlier layout: (B, P + R) inputs whose outputs[:, P - 1:-1] line up with the responses."""
    P = queries.shape[1]
    input_ids, attention_mask = torch.cat([queries, responses], 1), torch.cat([query_mask, mask], 1)
    targets = torch.full_like(input_ids, -100)
    targets[:, P - 1:-1] = responses.masked_fill(mask == 0, -100)
    return input_ids, attention_mask, targets


@contextlib.contextmanager
def layout(name):
    """rollout's join and response_slice swapped for the side-by-side pair, or left as they are ("packed")."""
    saved = rollout.join, rollout.response_slice
    if name == "side by side":
        rollout.join, rollout.response_slice = side_by_side, lambda x, batch: x[:, batch["queries"].shape[1] - 1:-1]
    try:
        yield
    finally:
        rollout.join, rollout.response_slice = saved


def chunks(data, size, shuffled):
    """(B', ...) chunks of the rollout batch: length-sorted micro-batches (scoring), or shuffled rows (update)."""
    if not shuffled:
        yield from (c for _, c in rollout.micro_batches(data, size))
        return
    order = torch.randperm(len(data["mask"]), generator=torch.Generator().manual_seed(0))
    for i in range(0, len(order), size):
        yield from (c for _, c in rollout.micro_batches({k: v[order[i:i + size]] for k, v in data.items()}, size))


def positions(data, size, shuffled):
    return sum(c["mask"].shape[0] * rollout.batch_inputs(c)[0].shape[1] for c in chunks(data, size, shuffled))


def score(model, data, size, temperature):
    with torch.no_grad():
        for c in chunks(data, size, False):
            rollout.response_logprobs(model, c, temperature, "policy", return_entropy=True)
            rollout.response_logprobs(model, c, temperature, None, return_hidden=True)


def update(model, data, size, temperature):
    for c in chunks(data, size, True):
        logprobs, entropy = rollout.response_logprobs(model, c, temperature, "policy", return_entropy=True)
        (logprobs.sum() + entropy.sum()).backward()
    model.zero_grad(set_to_none=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sft", required=True, help="The demo's SFT output (python -m nanorlhf.demo writes out/demo/sft).")
    p.add_argument("--data", required=True, help="Training prompts (the demo's out/demo/data/prompts.jsonl).")
    p.add_argument("--rollouts", type=int, default=32, help="Rollouts in the batch (the demo's per iteration).")
    p.add_argument("--batch-size", type=int, default=8, help="Rows per forward (the demo's).")
    p.add_argument("--max-new-tokens", type=int, default=48, help="Response length cap (the demo's).")
    p.add_argument("--temperature", type=float, default=0.7, help="Sampling temperature (PPO's default).")
    p.add_argument("--repeats", type=int, default=3, help="Timed repeats of each phase per layout.")
    p.add_argument("--dtype", default="bfloat16", help="Compute dtype (the demo's where the CPU has native bf16).")
    args = p.parse_args()

    model, tokenizer = M.load_model(args.sft, dtype=args.dtype)
    torch.manual_seed(0)
    add_lora(model, 16, 32.0, name="policy")
    prompts = load_prompts(args.data, tokenizer, 256, None, args.rollouts, flag="--data")
    data, _, _ = rollout.sample(model, tokenizer, [q.ids for q in prompts], args.max_new_tokens, args.temperature)
    real = int(data["query_mask"].sum() + data["mask"].sum())
    print(f"{len(prompts)} rollouts, {real} real tokens ({int(data['mask'].sum())} response); dtype {args.dtype}, "
          f"{torch.get_num_threads()} threads")

    names = ("side by side", "packed")
    logprobs = {}
    for name in names:
        with layout(name):
            logprobs[name] = rollout.batch_logprobs(model, data, args.temperature, "policy", args.batch_size)
            update(model, data, args.batch_size, args.temperature)  # compile the kernel's shapes before timing
    seconds = {(n, ph): [] for n in names for ph in ("score", "update")}
    for _ in range(args.repeats):
        for name in names:
            for phase, fn in (("score", score), ("update", update)):
                with layout(name):
                    t0 = time.perf_counter()
                    fn(model, data, args.batch_size, args.temperature)
                    seconds[name, phase].append(time.perf_counter() - t0)
    diff = float((logprobs[names[0]] - logprobs[names[1]]).abs().max())
    print("| layout | score: positions / real tokens | score s | update: positions / real tokens | update s |")
    print("|---|---|---|---|---|")
    base = {ph: statistics.median(seconds[names[0], ph]) for ph in ("score", "update")}
    for name in names:
        with layout(name):
            cells = []
            for phase, shuffled in (("score", False), ("update", True)):
                s = statistics.median(seconds[name, phase])
                cells += [f"{positions(data, args.batch_size, shuffled) / real:.2f}",
                          f"{s:.2f} ({s / base[phase]:.2f}x)"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"largest logprob difference between the layouts: {diff:.2e}")


if __name__ == "__main__":
    main()
