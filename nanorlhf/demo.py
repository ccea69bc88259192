"""The whole pipeline in one command, on the embedded SmolLM2-135M-Instruct and ../shared/data:

    SFT (alpaca) -> RM (hh) -> PPO (hh prompts); DPO (hh) and KTO (kto demo) from the SFT model;
    then evaluation of PPO, DPO and KTO against SFT on held-out hh prompts, and plots.

    python -m nanorlhf.demo --out out/demo            # budgets sized for ~30 min on a 2-core CPU
    python -m nanorlhf.demo --out out/demo --scale 4  # 4x the steps (a GPU, or patience)

Each stage is its script run as a subprocess with the arguments printed first, so every number can be
reproduced by hand. A stage whose output already exists is skipped (re-run with --overwrite to redo it).
"""
import argparse
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stages(out, data, scale, model):
    """(name, argv) of each stage. hh_harmless.jsonl is split by the scripts' seeded --eval-frac; its last
    rows (after --limit) serve as held-out prompts for the evaluation."""
    s = lambda n: str(max(1, int(n * scale)))  # noqa: E731
    hh, common = os.path.join(data, "hh_harmless.jsonl"), ["--max-length", "192", "--log-every", "2"]
    sft, rm = os.path.join(out, "sft"), os.path.join(out, "rm")
    return [
        ("sft", ["train_sft.py", "--model", model, "--data", os.path.join(data, "alpaca_en_demo.json"), "--out", sft,
                 "--max-steps", s(16), "--batch-size", "4", "--grad-accum", "2", "--lr", "2e-4", "--eval-frac",
                 "0.03", *common]),
        ("rm", ["train_rm.py", "--model", sft, "--data", hh, "--limit", "400", "--out", rm, "--max-steps", s(16),
                "--batch-size", "4", "--grad-accum", "1", "--lr", "1e-4", "--eval-frac", "0.1", "--norm-samples",
                "64", *common]),
        ("ppo", ["train_ppo.py", "--actor", sft, "--rm", rm, "--data", hh, "--limit", "400", "--out",
                 os.path.join(out, "ppo"), "--max-steps", s(6), "--rollout-batch-size", "8", "--minibatch-size", "4",
                 "--batch-size", "4", "--ppo-epochs", "2", "--max-new-tokens", "32", "--lr", "1e-4",
                 "--sample-every", "3", "--max-length", "128", "--log-every", "1"]),  # --max-length: the prompt
        ("dpo", ["train_dpo.py", "--model", sft, "--data", hh, "--limit", "400", "--out", os.path.join(out, "dpo"),
                 "--max-steps", s(12), "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-4", "--eval-frac",
                 "0.1", *common]),
        ("kto", ["train_kto.py", "--model", sft, "--data", os.path.join(data, "kto_en_demo.json"), "--out",
                 os.path.join(out, "kto"), "--max-steps", s(12), "--batch-size", "4", "--grad-accum", "1", "--lr",
                 "1e-4", "--eval-frac", "0.1", *common]),
    ]


def run(argv, log):
    print("\n$ python " + shlex.join(argv), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.call([sys.executable] + argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    print(f"  exit {code} in {time.perf_counter() - t0:.0f} s (log: {log})", flush=True)
    if code:
        with open(log) as f:
            print("".join(f.readlines()[-15:]))
        sys.exit(code)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/demo", help="Folder for every stage's output, logs and the results.")
    p.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data"), help="The shared data folder.")
    p.add_argument("--model", default="smollm2", help="Base model for SFT (default: the embedded SmolLM2-135M).")
    p.add_argument("--scale", type=float, default=1.0, help="Multiply every stage's steps by this.")
    p.add_argument("--eval-prompts", type=int, default=32, help="Held-out hh prompts for the final evaluation.")
    p.add_argument("--overwrite", action="store_true", help="Redo stages whose output exists.")
    args = p.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    for name, stage in stages(out, os.path.abspath(args.data), args.scale, args.model):
        if os.path.exists(os.path.join(out, name, "config.json")) and not args.overwrite:
            print(f"\n{name}: {out}/{name} is finished; skipping (--overwrite redoes it)")
            continue
        run(stage + (["--overwrite"] if args.overwrite or os.path.isdir(os.path.join(out, name)) else []),
            os.path.join(out, f"{name}.log"))
    # held-out prompts: the tail of hh_harmless.jsonl, beyond the --limit 400 rows the stages trained on
    with open(os.path.join(os.path.abspath(args.data), "hh_harmless.jsonl")) as f:
        rows = f.readlines()[-args.eval_prompts:]
    prompts = os.path.join(out, "heldout_prompts.jsonl")
    with open(prompts, "w") as f:
        f.writelines(rows)
    run(["-m", "nanorlhf.evaluate", "--baseline", os.path.join(out, "sft"), "--rm", os.path.join(out, "rm"),
         "--model", os.path.join(out, "ppo"), "--model", os.path.join(out, "dpo"), "--model", os.path.join(out, "kto"),
         "--data", prompts, "--limit", str(args.eval_prompts), "--max-new-tokens", "48",
         "--out", os.path.join(out, "eval.json")], os.path.join(out, "eval.log"))
    with open(os.path.join(out, "eval.log")) as f:
        print("".join(line for line in f if line.startswith("|")))
    run(["-m", "nanorlhf.plot"] + [os.path.join(out, n) for n in ("sft", "rm", "ppo", "dpo", "kto")],
        os.path.join(out, "plot.log"))
    print(f"demo finished in {(time.perf_counter() - t0) / 60:.1f} min; results in {out}")


if __name__ == "__main__":
    main()
