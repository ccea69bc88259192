"""The main job: a gold-reward experiment that shows each method aligning a real model, on one CPU.

A known "gold" reward stands in for human judgement (Ziegler et al. 2019 §4; Rafailov et al. 2023 §6.1;
Gao et al. 2023): here how positive a response reads (VADER, `nanorlhf.gold:sentiment`). On the embedded
SmolLM2-135M-Instruct and the alpaca instructions in data/, split once into training and held-out prompts:

    1. sft       SFT on concise alpaca answers (each cut to its first sentences, <= 40 words)
    2. label     k samples per training prompt from the SFT model, judged by the gold reward: preference
                 pairs (best against worst) and KTO labels (above / below the prompt's mean)
    3. rm        a reward model on those pairs
    4. ppo_rm    PPO on the reward model, with the gold reward logged beside it (never optimised)
    5. ppo_gold  PPO straight on the gold reward: what PPO reaches when the reward is right
    6. dpo, kto  DPO on the pairs, KTO on the labels
    7. eval      every model against SFT on held-out prompts no stage saw: gold reward, win rate, KL, ...
    8. results   results.md (the table) and frontier.png (gold reward against KL to SFT)

    python -m nanorlhf.demo --out out/demo            # 39.4 min measured on 2 CPU cores (bf16, 2026-12-01)
    python -m nanorlhf.demo --out out/demo --scale 4  # 4x every budget, each method at 3 β values (5.2 h, 2 cores)

Each stage is its script run as a subprocess with the command printed first and logged, so every number can
be reproduced by hand. A stage whose output exists is skipped (--overwrite redoes everything), and the results
keep the time it took from the last line of its log, so a long run can be stopped and resumed (a stage cut short
starts again).
"""
import json
import os
import random
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass

from .cli import UserError, arg, main
from .model import native_bf16, pick_device

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLD = "nanorlhf.gold:sentiment"
GOLD_PART = GOLD.rpartition(":")[2]  # its judge in the evaluation: a reward function's part is its name
COMMAND = "$ python "  # starts the first line of a stage's log: the command that made the stage
DONE = "# nanorlhf.demo:"  # starts the last line of a stage's log: its exit code and seconds
# The β each method runs at, and the sweep that draws its frontier when --scale > 1 (PPO: the KL coefficient).
# PPO on gold at 0.02: on dev prompts it won 0.74 and 0.77 against SFT where 0.05 won 0.62 and 0.60 (two seeds),
# at a larger KL (8.0, 10.3 against 3.3, 2.4; docs/gold-demo.md, "2026-12-01: β for PPO on gold")
BETAS = {"ppo_rm": (0.05, [0.02, 0.05, 0.2]), "ppo_gold": (0.02, [0.02, 0.05, 0.2]),
         "dpo": (0.1, [0.05, 0.1, 0.5]), "kto": (0.1, [0.05, 0.1, 0.5])}


@dataclass
class Args:
    out: str = arg("out/demo", "Folder for every stage's output, its log, and the results.")
    data: str = arg(os.path.join(ROOT, "data"), "Folder holding alpaca_en_demo.json.")
    model: str = arg("smollm2", "Base model for SFT (default: the embedded SmolLM2-135M-Instruct).")
    scale: float = arg(1.0, "Multiply every stage's budget by this; above 1 each method also runs at 3 β values.",
                       gt=0)
    heldout: int = arg(128, "Held-out prompts for the final evaluation (set aside before any stage). 128 resolve a "
                       "gold gain of about 0.06 at 2 standard errors.", ge=16)
    dtype: str | None = arg(None, "Compute dtype of every stage and the evaluation; default bfloat16 where it is "
                            "native (a GPU, or a CPU with AVX512-BF16 or AMX: a PPO iteration 1.40x faster on the "
                            "2-core CPU), else float32. LoRA weights and Adam's states stay fp32 either way.",
                            choices=["float32", "bfloat16"])
    seed: int = arg(0, "Seed of every stage and of the evaluation's sampling (the split into training and held-out "
                    "prompts stays the same), so a second seed repeats the whole experiment on the same prompts.")
    overwrite: bool = arg(False, "Redo stages whose output exists.")


def concise(text, max_words=40):
    """The first sentences of `text` that fit max_words (at least the first sentence's words)."""
    out = ""
    for sentence in re.split(r"(?<=[.!?])\s+", text.strip()):
        if len((out + " " + sentence).split()) > max_words:
            break
        out = (out + " " + sentence).strip()
    return out or " ".join(text.split()[:max_words])


def prepare(data, out, heldout):
    """Split the alpaca instructions once (seeded): held-out prompts, training prompts, concise SFT rows."""
    src = os.path.join(data, "alpaca_en_demo.json")
    if not os.path.isfile(src):
        raise UserError(f"--data {data}: no alpaca_en_demo.json there (the repository ships it in data/)")
    with open(src) as f:
        rows = json.load(f)
    prompt = lambda r: r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")  # noqa: E731
    prompts = sorted({prompt(r) for r in rows})  # some instructions repeat: split the distinct ones
    random.Random(0).shuffle(prompts)
    held_out = set(prompts[:heldout])
    held = [next(r for r in rows if prompt(r) == p) for p in prompts[:heldout]]
    train = [r for r in rows if prompt(r) not in held_out]
    folder = os.path.join(out, "data")
    os.makedirs(folder, exist_ok=True)
    paths = {k: os.path.join(folder, f) for k, f in (("sft", "sft.json"), ("prompts", "prompts.jsonl"),
                                                     ("heldout", "heldout.jsonl"))}
    with open(paths["sft"], "w") as f:
        json.dump([dict(r, output=concise(r["output"])) for r in train], f, indent=1)
    for key, part in (("prompts", train), ("heldout", held)):
        with open(paths[key], "w") as f:
            f.writelines(json.dumps({"prompt": prompt(r)}) + "\n" for r in part)
    return paths


def stages(out, paths, scale, model, dtype="float32", seed=0):
    """(name, argv) of every training stage, in order, each in `dtype` from `seed`. Names of swept runs carry
    their β."""
    s = lambda n: str(max(1, round(n * scale)))  # noqa: E731
    sft, rm, labels = (os.path.join(out, n) for n in ("sft", "rm", "labels"))
    pairs, kto = os.path.join(labels, "pairs.jsonl"), os.path.join(labels, "kto.jsonl")
    short = ["--max-length", "128", "--log-every", "4"]
    runs = [
        ("sft", ["train_sft.py", "--model", model, "--data", paths["sft"], "--out", sft, "--max-steps", s(24),
                 "--batch-size", "8", "--grad-accum", "1", "--lr", "1e-3", "--eval-frac", "0.05", "--max-length",
                 "160", "--log-every", "4"]),
        # 512 labelled prompts and 64 RM steps at lr 1e-3: on the dev pairs the demo's RM ranked 0.80 and 0.74 (two
        # seeds) against 0.71 and 0.70 with 384 prompts and 48 steps (docs/gold-demo.md, "2026-11-30: the time the
        # kernel freed, spent on the RM's data")
        ("labels", ["-m", "nanorlhf.label", "--model", sft, "--data", paths["prompts"], "--limit", s(512), "--k", "4",
                    "--reward-fn", GOLD, "--max-new-tokens", "48", "--batch-size", "64", "--out", labels]),
        ("rm", ["train_rm.py", "--model", sft, "--data", pairs, "--out", rm, "--max-steps", s(64), "--batch-size", "8",
                "--grad-accum", "1", "--lr", "1e-3", "--eval-frac", "0.15", *short]),
    ]
    # --critic head: a value head on the reference pass's features, so an iteration runs no critic passes
    # (docs/ppo-details.md §7); 15 of its iterations take the time of 10 with an adapter critic (docs/gold-demo.md).
    # Scoring 8 length-sorted rows per forward, the update 4 of a shuffled minibatch of 8: less padding, same
    # gradient (docs/benchmarks.md)
    ppo = ["--actor", sft, "--data", paths["prompts"], "--max-steps", s(15), "--rollout-batch-size", "32",
           "--minibatch-size", "8", "--batch-size", "4", "--score-batch-size", "8", "--ppo-epochs", "1",
           "--max-new-tokens", "48", "--lr", "1e-3", "--lam", "1.0", "--critic", "head", "--sample-every", "3",
           "--log-every", "1"]
    for name in ("ppo_rm", "ppo_gold", "dpo", "kto"):
        default, sweep = BETAS[name]
        for beta in (sweep if scale > 1 else [default]):
            run = name if beta == default else f"{name}_b{beta}"
            dst = ["--out", os.path.join(out, run)]
            if name == "ppo_rm":
                argv = ["train_ppo.py", *ppo, "--rm", rm, "--gold-reward-fn", GOLD, "--kl-coef", str(beta)]
            elif name == "ppo_gold":
                argv = ["train_ppo.py", *ppo, "--reward-fn", GOLD, "--kl-coef", str(beta)]
            else:
                argv = [f"train_{name}.py", "--model", sft, "--data", pairs if name == "dpo" else kto, "--max-steps",
                        s(24), "--batch-size", "8", "--grad-accum", "1", "--lr", "5e-4", "--beta", str(beta),
                        "--eval-frac", "0.1", *short]
            runs.append((run, argv + dst))
    return [(name, argv + ["--dtype", dtype, "--seed", str(seed)]) for name, argv in runs]


def run(argv, log):
    """Run one stage's script, its output to `log`, which ends with the stage's seconds (`logged_seconds`)."""
    print("\n" + COMMAND + shlex.join(argv), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(COMMAND + shlex.join(argv) + "\n")
        f.flush()
        code = subprocess.call([sys.executable] + argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        seconds = round(time.perf_counter() - t0, 1)  # as logged, so a resumed demo reports the same
        f.write(f"\n{DONE} exit {code} in {seconds} s\n")  # on a line of its own, whatever the script left
    print(f"  exit {code} in {seconds:.0f} s (log: {log})", flush=True)
    if code:
        with open(log) as f:
            print("".join(f.readlines()[-15:]))
        sys.exit(code)
    return seconds


def logged_seconds(log):
    """The seconds a finished stage took, from the last line `run` wrote to its log; None if it has none (a log
    from before this line was written, or none at all)."""
    if not os.path.isfile(log):
        return None
    with open(log) as f:
        last = (f.readlines() or [""])[-1]
    match = re.fullmatch(rf"{re.escape(DONE)} exit 0 in ([0-9.]+) s\n?", last)
    return float(match.group(1)) if match else None


def check_same_command(argv, log):
    """A finished stage is skipped only if its log's command is this one: a folder made with another seed or β (or a
    demo whose defaults changed since) must not stand in for this run. Paths may differ (a copied or moved folder)."""
    if not os.path.isfile(log):
        return
    with open(log) as f:
        first = f.readline().removeprefix(COMMAND).strip()
    setting = lambda words: [w for w in words if w != "--overwrite" and os.sep not in w]  # noqa: E731
    made, wanted = setting(shlex.split(first)), setting(argv)
    if made != wanted:
        i = next((i for i, (a, b) in enumerate(zip(made, wanted)) if a != b), min(len(made), len(wanted)))
        word = lambda words: words[i] if i < len(words) else "(nothing)"  # noqa: E731
        raise UserError(f"{log.removesuffix('.log')} was made by another command: {word(made)} where this demo runs "
                        f"{word(wanted)} (after {wanted[i - 1] if i else 'nothing'}; its command is the first line "
                        f"of {log}); use another --out, or --overwrite to redo every stage")


def last_metric(folder, key):
    """The last value of `key` in a run's metrics.jsonl, or None."""
    value = None
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        for line in f:
            value = json.loads(line).get(key, value)
    return value


def shown_seconds(s):
    return "–" if s is None else f"{s:.0f}"


def results_table(out, evaluation, names, times):
    """Markdown: per model the gold reward, its win rate and gain against SFT, the RM's view (its win rate, and how
    often it orders the model's and SFT's responses as gold does: its held-out pairwise accuracy), KL, length, EOS."""
    head = ("| model | gold reward ± se | win rate vs SFT (gold) ± se | gold gain ± se | RM win rate ± se | "
            "RM agrees with gold ± se (pairs) | KL to SFT ± se | length | EOS rate | train s |")
    lines = [head, "|" + "---|" * 10]
    for name in names:
        r = evaluation[os.path.join(out, name)]
        g, rm = r["judges"][GOLD_PART], r["judges"].get("rm")
        lines.append(f"| {name} | {g['mean']:.3f} ± {g['se']:.3f} | {g['win_rate']:.2f} ± {g['win_se']:.2f} | "
                     f"{g['gain']:+.3f} ± {g['gain_se']:.3f} | {rm['win_rate']:.2f} ± {rm['win_se']:.2f} | "
                     f"{rm['agreement']:.2f} ± {rm['agreement_se']:.2f} ({rm['agreement_n']}) | "
                     f"{r['kl']:.2f} ± {r['kl_se']:.2f} | "
                     f"{r['length']:.1f} | {r['eos_rate']:.2f} | {shown_seconds(times.get(name))} |")
    return "\n".join(lines)


def demo(args):
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    paths = prepare(os.path.abspath(args.data), out, args.heldout)
    times, skipped = {}, False
    dtype = args.dtype or ("bfloat16" if native_bf16(pick_device()) else "float32")
    runs = stages(out, paths, args.scale, args.model, dtype, args.seed)
    for name, argv in runs:
        done = os.path.join(out, name, "label.json" if name == "labels" else "config.json")
        log = os.path.join(out, f"{name}.log")
        if os.path.exists(done) and not args.overwrite:
            check_same_command(argv, log)
            print(f"\n{name}: {out}/{name} is finished; skipping (--overwrite redoes it)")
            times[name], skipped = logged_seconds(log), True  # from the run that made it
            continue
        redo = args.overwrite or os.path.isdir(os.path.join(out, name))
        times[name] = run(argv + (["--overwrite"] if redo else []), log)
    models = [name for name, _ in runs if name not in ("sft", "labels", "rm")]
    eval_json = os.path.join(out, "eval.json")
    times["eval"] = run(["-m", "nanorlhf.evaluate", "--baseline", os.path.join(out, "sft"),
                         *[a for m in models for a in ("--model", os.path.join(out, m))],
                         "--reward-fn", GOLD, "--rm", os.path.join(out, "rm"), "--data", paths["heldout"],
                         "--limit", str(args.heldout), "--max-new-tokens", "48", "--batch-size", "64",
                         "--dtype", dtype, "--seed", str(args.seed), "--out", eval_json], os.path.join(out, "eval.log"))
    with open(eval_json) as f:
        evaluation = json.load(f)
    from .plot import frontier, plot
    base = evaluation[os.path.join(out, "sft")]["judges"][GOLD_PART]
    points = [{"method": "SFT", "label": "", "kl": 0.0, "mean": base["mean"], "se": base["se"]}]
    for name in models:
        r = evaluation[os.path.join(out, name)]
        method, _, beta = name.partition("_b")
        points.append({"method": method, "label": f"β={beta}" if beta else "", "kl": r["kl"],
                       "mean": r["judges"][GOLD_PART]["mean"], "se": r["judges"][GOLD_PART]["se"]})
    frontier(points, os.path.join(out, "frontier.png"))
    for name in ("sft", "rm", *models):
        plot(os.path.join(out, name))
    minutes = (time.perf_counter() - t0) / 60
    rm_accuracy = last_metric(os.path.join(out, "rm"), "final_eval_accuracy")
    label = json.load(open(os.path.join(out, "labels", "label.json")))["summary"]
    resumed = ""
    if skipped:  # this run's minutes are not the demo's: earlier runs made some stages, and their logs hold the times
        known = [v for v in times.values() if v is not None]
        resumed = f", resuming finished stages; the stages' logged times sum to {sum(known) / 60:.1f} min" + (
            f" ({len(times) - len(known)} without one)" if len(known) < len(times) else "")
    report = (f"# nanorlhf demo: {args.heldout} held-out prompts, gold = {GOLD}\n\n"
              f"{results_table(out, evaluation, models, times)}\n\n"
              f"SFT: gold {base['mean']:.3f} ± {base['se']:.3f}, EOS rate "
              f"{evaluation[os.path.join(out, 'sft')]['eos_rate']:.2f}. Labels: {label['pairs']} pairs (mean gold "
              f"margin {label['mean_margin']:.2f}), {label['desirable']} desirable / {label['undesirable']} "
              f"undesirable KTO examples from {label['responses']} samples. Reward model: pairwise accuracy "
              f"{'n/a' if rm_accuracy is None else f'{rm_accuracy:.2f}'} on its eval split of the labelled pairs.\n\n"
              f"Whole demo: {minutes:.1f} min (scale {args.scale}){resumed}; stage seconds: "
              + ", ".join(f"{k} {shown_seconds(v)}" for k, v in times.items()) + "\n")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(report)
    print("\n" + report + f"\nresults in {out}: results.md, frontier.png, eval.json, <stage>/metrics.png")


if __name__ == "__main__":
    main(demo, Args)
