"""Check nanorlhf.memory against real runs: the planner's estimate next to the measured peak, per stage.

    python tests/benchmarks/validate_memory.py                       # tiny and smollm2, every stage, ckpt off and on
    python tests/benchmarks/validate_memory.py --models tiny --stages sft dpo --ckpt off

Not part of the default pytest run (no test_ prefix; ~15 min on 2 CPU cores).

What is measured. Each run is a stage's own `train(Args(...))` for 2 steps, in fp32 on the CPU, in a fresh
subprocess (so peaks don't mix), under torch.profiler with profile_memory=True: every allocation and free by
torch's CPU allocator is an event, and the peak of their running sum is the peak of live tensor bytes, the
CPU twin of torch.cuda.max_memory_allocated. That is what the planner models: tensors. Peak RSS would add the
Python heap, shared libraries, inductor's compiler and glibc's caching, which no formula of the model covers
(and which dwarf the tiny model's 12 MiB of weights). So the planner runs with --device cpu, whose overhead line
is 0; on CUDA that line is the CUDA context + caching-allocator slack, which max_memory_allocated does not see
either and nvidia-smi does.

Same things counted on both sides: the data makes every batch exactly --max-length tokens long with padding in
it (one shorter row per batch: the batch is the whole dataset), and the recorded (B, T) of every forward is
printed and fed to the planner. The end-of-run save is patched out: merging is not a training step.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
MiB = 2**20
WORDS = ("the quick brown fox jumps over a lazy dog while seven tired wizards quietly mix strong potions near "
         "green hills and distant rivers").split()


def text(n_words, seed=0):
    return " ".join(WORDS[(i * 7 + seed) % len(WORDS)] + str((i + seed) % 10) for i in range(n_words))


def write_data(d, stage, n, length):
    """n rows (the whole dataset = one batch): all cut to `length` tokens but one short row, so every batch
    is exactly `length` long and padded."""
    long, short = (lambda i: text(3 * length, i)), (lambda i: text(length // 4, i))
    last = lambda i, f: short(i) if i == n - 1 else f(i)
    if stage == "sft":
        rows = [{"instruction": f"Write note {i}.", "input": "", "output": last(i, long)} for i in range(n)]
    elif stage in ("rm", "dpo"):
        rows = [{"prompt": f"Write note {i}.", "chosen": long(i), "rejected": last(i, long)} for i in range(n)]
    elif stage == "kto":
        rows = [{"prompt": f"Write note {i}.", "completion": last(i, long), "label": i % 2 == 0} for i in range(n)]
    else:  # PPO and GRPO prompts of different lengths: left padding
        rows = [{"prompt": f"Write a very long story about {text(2 + 3 * i, i)}."} for i in range(n)]
    path = os.path.join(d, f"{stage}.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def child(spec):
    """Run one stage under the profiler; print RESULT {peak, weights, shapes} as JSON."""
    import importlib

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from nanorlhf import model as M
    from nanorlhf import prefix, rollout
    script = importlib.import_module(f"train_{spec['stage']}")
    M.save_model = lambda *a, **k: None  # the final merge + save is not a training step
    shapes, gen = set(), []
    hidden_states, generate, load_policy = M.hidden_states, rollout.generate, script.load_policy

    def recording_hidden_states(model, input_ids, attention_mask):
        if torch.is_grad_enabled():
            shapes.add(tuple(input_ids.shape))
        return hidden_states(model, input_ids, attention_mask)

    reply_hidden_states = prefix.reply_hidden_states

    def recording_reply_hidden_states(model, rows, *a, **k):  # the RM: each prompt once, then 2 rows of replies
        if torch.is_grad_enabled():  # as the rows [prompt, reply] it stands for: 2B of the longest prompt + reply
            shapes.add((2 * len(rows), max(len(r.prompt) for r in rows)
                        + max(max(len(r.chosen), len(r.rejected)) for r in rows)))
        return reply_hidden_states(model, rows, *a, **k)

    def recording_generate(model, tokenizer, prompts, *a, **k):
        out = generate(model, tokenizer, prompts, *a, **k)
        gen.append((len(prompts), max(map(len, prompts)), out["responses"].shape[1]))
        return out

    def marked_load_policy(*a, **k):
        out = load_policy(*a, **k)
        with record_function("MARK:loaded"):  # weights (+ adapters) in memory, nothing else yet
            pass
        return out

    M.hidden_states, rollout.generate, script.load_policy = recording_hidden_states, recording_generate, marked_load_policy
    prefix.reply_hidden_states = recording_reply_hidden_states
    args = script.Args(**spec["args"])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        script.train(args)
    live = peak = 0
    loaded = None
    for e in sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns()):
        if e.name() == "[memory]":
            live += e.nbytes()
            peak = max(peak, live)
        elif e.name() == "MARK:loaded" and loaded is None:
            loaded = live
    print("RESULT " + json.dumps({"peak": peak, "loaded": loaded, "shapes": sorted(shapes), "gen": gen}))


def prepare(work, models):
    """Model folders (tiny random Llama, SmolLM2-135M) with SmolLM2's tokenizer, and a tiny reward model each."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from conftest import tiny_llama
    from nanorlhf import model as M
    smollm2 = M.resolve("smollm2")  # converts the GGUF once into ~/.cache/nanorlhf (~40 s)
    tok = AutoTokenizer.from_pretrained(smollm2)
    dirs = {}
    for name in models:
        path, rm = os.path.join(work, name), os.path.join(work, name + "-rm")
        if name == "tiny":
            tiny_llama(len(tok)).save_pretrained(path)
            tok.save_pretrained(path)
        else:
            path = smollm2
        torch.manual_seed(0)  # a reward model of the same size: the base with a random score head
        reward = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
        reward.config.pad_token_id = tok.unk_token_id
        reward.save_pretrained(rm)
        tok.save_pretrained(rm)
        dirs[name] = (path, rm)
    return dirs


SETTINGS = {"tiny": dict(batch_size=4, max_length=256), "smollm2": dict(batch_size=2, max_length=256)}


def stage_args(path, rm, name, stage, ckpt, work):
    """The stage's Args keywords for one measured run, and the number of examples its data needs
    (tests/test_benchmarks.py checks each stage still takes them)."""
    n = SETTINGS[name]["batch_size"]
    args = dict(model=path, out=os.path.join(work, f"out-{name}-{stage}"), overwrite=True, max_steps=2, grad_accum=1,
                eval_frac=0.0, device="cpu", dtype="float32", lora_r=16, gradient_checkpointing=ckpt, log_every=100,
                **SETTINGS[name])
    if stage in ("ppo", "grpo"):  # they sample their own data: no accumulation, no eval split, a prompt limit
        for flag in ("grad_accum", "eval_frac", "max_length"):
            del args[flag]
    if stage == "ppo":  # rollouts of 4 prompts; prompts are at most 64 tokens; 64 new tokens
        args.update(rm=[rm], rollout_batch_size=4, minibatch_size=4, batch_size=2, ppo_epochs=1,
                    max_prompt_length=64, max_new_tokens=64, sample_every=0)
        n = 4
    if stage == "grpo":  # 2 prompts × 2 generations = 4 sequences as PPO; β > 0 runs the reference pass too
        args.update(rm=[rm], rollout_batch_size=2, num_generations=2, minibatch_size=4, batch_size=2, ppo_epochs=1,
                    max_prompt_length=64, max_new_tokens=64, beta=0.04, sample_every=0)
        n = 2
    if stage == "sft":
        args["samples"] = 0
    return args, n


def run_one(work, dirs, name, stage, ckpt):
    path, rm = dirs[name]
    args, n = stage_args(path, rm, name, stage, ckpt, work)
    args["data"] = write_data(work, stage, n, SETTINGS[name]["max_length"])
    spec = json.dumps({"stage": stage, "args": args})
    r = subprocess.run([sys.executable, __file__, "--child", spec], cwd=ROOT, capture_output=True, text=True,
                       env=os.environ | {"TQDM_DISABLE": "1"})
    result = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    if r.returncode or not result:
        raise RuntimeError(f"{name} {stage} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return args, json.loads(result[0][7:])


def planned(name, stage, ckpt, args, res):
    """The planner's estimate for exactly what ran: fp32, CPU (no overhead line), the recorded shapes."""
    from nanorlhf import memory
    cfg = memory.load_config(os.path.join(args["model"], "config.json"))
    B, T = max(res["shapes"], key=lambda s: s[0] * s[1])
    kw = dict(dtype="fp32", device="cpu", lora_r=16, gradient_checkpointing=ckpt, padded=True)
    if stage in ("ppo", "grpo"):  # n rows generated at once: GRPO's prompts, each repeated k times
        n, P, R = res["gen"][0]
        k = args.get("num_generations", 1)
        kw.update(batch_size=B, max_length=P, max_new_tokens=R, rollout_batch_size=n // k, num_generations=k)
    else:
        kw.update(batch_size=B // 2 if stage in ("rm", "dpo") else B, max_length=T)
    return memory.estimate(cfg, stage, **kw), f"{B}×{T}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    p.add_argument("--stages", nargs="+", default=["sft", "rm", "dpo", "kto", "ppo", "grpo"])
    p.add_argument("--ckpt", choices=["off", "on", "both"], default="both", help="gradient checkpointing")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(json.loads(a.child))
    ckpts = {"off": [False], "on": [True], "both": [False, True]}[a.ckpt]
    from nanorlhf import memory
    rows, worst = [], 0.0
    with tempfile.TemporaryDirectory() as work:
        dirs = prepare(work, a.models)
        print(f"{'model':<8} {'stage':<4} {'ckpt':<4} {'B×T':>7} {'weights est/meas MiB':>21} "
              f"{'peak est MiB':>12} {'measured MiB':>12} {'ratio':>6}  peak moment (planner)")
        for name in a.models:
            for stage in a.stages:
                for ckpt in ckpts:
                    args, res = run_one(work, dirs, name, stage, ckpt)
                    est, shape = planned(name, stage, ckpt, args, res)
                    ratio = est["total"] / res["peak"]
                    worst = max(worst, abs(ratio - 1))
                    # at load: the base's weights + one adapter's fp32 params (no grads or Adam state yet)
                    w = est["weights"] + 4 * memory.lora_params(memory.load_config(args["model"]), 16)
                    line = (f"{name:<8} {stage:<4} {'on' if ckpt else 'off':<4} {shape:>7} "
                            f"{w / MiB:>10.1f}/{res['loaded'] / MiB:<10.1f} {est['total'] / MiB:>12.1f} "
                            f"{res['peak'] / MiB:>12.1f} {ratio:>6.2f}  {est.peak}")
                    print(line, flush=True)
                    rows.append(line)
    print(f"largest deviation: {100 * worst:.1f}% (goal: within ±25%)")


if __name__ == "__main__":
    main()
