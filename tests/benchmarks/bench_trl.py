"""Stages vs TRL: one SFT, reward-model and DPO optimizer step of ours next to TRL's SFTTrainer, RewardTrainer and
DPOTrainer, on the same tiny model, batch and sequence length, on the CPU.

    python tests/benchmarks/bench_trl.py                               # sft, rm, dpo; 3 repeats of 8 timed steps
    python tests/benchmarks/bench_trl.py --stages dpo --steps 4 --repeats 2 --seq-len 512

Needs the `bench` extra (pip install trl datasets). Not part of the default pytest run (no test_ prefix).

What runs. Every (framework, stage, repeat) is a fresh subprocess, and the two frameworks alternate (ours first on
even repeats, TRL first on odd ones) so background load hits both alike. A subprocess runs --warmup + --steps
optimizer steps; only the last --steps are timed (the warmup covers our kernel's torch.compile and both sides'
first-call allocations).
  ours: the stage's own `train(Args(...))` with --max-steps, exactly what `python train_<stage>.py` runs; step times
        and peak RSS are read from the metrics.jsonl the Loop writes (`step_time`: end of one step to the end of the
        next, so the collate of the next batch, forward, backward, clip, AdamW and logging are in it; `peak_mem_gb`:
        ru_maxrss at the end of the step). The final merge+save is patched out and SFT samples/eval are off.
  TRL:  SFTTrainer / RewardTrainer / DPOTrainer(...).train() with max_steps; a TrainerCallback takes the time between
        consecutive on_step_end calls (same span: next batch, forward, backward, clip, AdamW) and ru_maxrss at the
        last one.
Same conditions: one model folder (a random Llama of --hidden/--layers with SmolLM2's real tokenizer, V = 49152,
tied embeddings as SmolLM2); fp32; sdpa attention; LoRA r/alpha on q,k,v,o,gate,up,down with no dropout (TRL through
`peft_config=LoraConfig`; the RM's score head trained whole on both sides: ours does it itself, PEFT via
modules_to_save); AdamW (torch.optim.AdamW: TRL's optim="adamw_torch"), weight decay 0, clip at 1.0; no gradient
checkpointing; batch --batch-size (pairs for RM/DPO, both replies in one forward on both sides), grad accumulation 1;
the same --threads (OMP_NUM_THREADS and torch.set_num_threads in every subprocess). The data are tokenised once by
nanorlhf.data (chat template + truncation to --seq-len) and TRL gets exactly those token ids pre-tokenised, so every
sequence on both sides is exactly --seq-len tokens (half prompt, half completion) and no batch has padding.
TRL's logging, evaluation and saving are off.

Memory. Peak RSS of the subprocess (ru_maxrss) at the end of the last step, shown raw and as "Δ": minus the RSS right
after imports and model load (before LoRA/trainer setup), i.e. what training itself adds. Raw RSS also counts each
side's imports (TRL pulls in datasets/pyarrow/pandas; ours pulls in inductor at its first step, after the baseline, so
that is in our Δ). The targets are judged on Δ.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT]
MiB = 2**20
STAGES = ("sft", "rm", "dpo")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WORDS = ("the quick brown fox jumps over a lazy dog while seven tired wizards quietly mix strong potions near "
         "green hills and distant rivers under a pale autumn sky").split()


def rss_mib():
    """Current resident set size of this process."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def max_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def text(n_words, seed):
    return " ".join(WORDS[(i * 7 + seed) % len(WORDS)] + str((i * 3 + seed) % 10) for i in range(n_words))


# ---------------------------------------------------------------- setup (parent)


def model_config(vocab_size, hidden, layers, tok, seq_len):
    """A Llama shaped like SmolLM2: head_dim 64, half as many KV heads, MLP width 8/3 of hidden, tied embeddings."""
    from transformers import LlamaConfig
    heads = max(1, hidden // 64)
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=-(-hidden * 8 // 3 // 64) * 64,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                       max_position_embeddings=max(2048, seq_len), tie_word_embeddings=True,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


def write_data(work, tok, n, seq_len):
    """sft.jsonl and pairs.jsonl with n rows whose tokenised prompt + reply is exactly seq_len tokens: a rendered
    prompt between seq_len/2 and seq_len tokens, replies longer than seq_len/2, so nanorlhf.data's truncation keeps
    seq_len/2 prompt tokens and fills the rest with the reply (both replies of a pair alike)."""
    from nanorlhf.data import load_examples, render_prompt, tokenize
    paths = {"sft": os.path.join(work, "sft.jsonl"), "pairs": os.path.join(work, "pairs.jsonl")}
    sft, pairs = [], []
    for i in range(n):
        words = seq_len
        while True:  # a prompt that fits in seq_len but is longer than half of it
            prompt = f"Question {i}: " + text(words, i)
            k = len(render_prompt(tok, [{"role": "user", "content": prompt}]))
            if seq_len // 2 < k <= seq_len:
                break
            words = max(1, int(words * (0.75 * seq_len) / k))
        chosen, rejected = text(2 * seq_len, 100 + i), text(2 * seq_len, 200 + i)
        sft.append({"prompt": prompt, "completion": chosen})
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    for key, rows in (("sft", sft), ("pairs", pairs)):
        with open(paths[key], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        kind = "sft" if key == "sft" else "pairs"
        toks = tokenize(load_examples(paths[key], kind), tok, seq_len)[0]
        lengths = {len(r[0]) + len(c) for r in toks for c in r[1:1 + (1 if kind == "sft" else 2)]}
        assert lengths == {seq_len} and len(toks) == n, (key, lengths, len(toks))
    return paths


# ---------------------------------------------------------------- one run (child)


def child_ours(spec):
    import importlib

    import torch

    from nanorlhf import model as M
    torch.set_num_threads(spec["threads"])
    script = importlib.import_module(f"train_{spec['stage']}")
    M.save_model = lambda *a, **k: None  # the end-of-run merge + save is not a training step
    info = {}
    load_policy = script.load_policy

    def measured_load_policy(*a, **k):
        model, tok = load_policy(*a, **k)
        info["baseline_rss"] = rss_mib()  # imports + model (+ LoRA, a few hundred KiB) loaded
        info["attn"] = model.config._attn_implementation
        return model, tok

    class CountingLoop(script.Loop):  # what the optimizer updates (train_rm adds the score head after loading)
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            info["trainable"] = sum(p.numel() for p in self.params)

    script.load_policy, script.Loop = measured_load_policy, CountingLoop
    out = os.path.join(spec["work"], f"ours-{spec['stage']}-{os.getpid()}")
    args = dict(model=spec["model"], data=spec["data"], out=out, max_steps=spec["warmup"] + spec["steps"],
                batch_size=spec["batch_size"], grad_accum=1, max_length=spec["seq_len"], lora_r=spec["lora_r"],
                lora_alpha=spec["lora_alpha"], lora_dropout=0.0, eval_frac=0.0, device="cpu", dtype="float32",
                optim="adamw", weight_decay=0.0, max_grad_norm=1.0, gradient_checkpointing=False, log_every=10**6,
                seed=0)
    if spec["stage"] == "sft":
        args["samples"] = 0
    if spec["stage"] == "rm":
        args["norm_samples"] = 2  # the reward statistics pass after training: kept minimal (not timed)
    if spec["stage"] == "rm" or spec["stage"] == "dpo":
        args["loss"] = "sigmoid"
    script.train(script.Args(**args))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        steps = [m for m in map(json.loads, f) if "step_time" in m]
    assert len(steps) == spec["warmup"] + spec["steps"], len(steps)
    info["times"] = [m["step_time"] for m in steps]
    info["peak_rss"] = steps[-1]["peak_mem_gb"] * 1024  # ru_maxrss at the end of the last step, GiB -> MiB
    info["tokens_per_step"] = round(steps[-1]["tokens_per_s"] * steps[-1]["step_time"])  # attention-mask sum
    info["threads"] = torch.get_num_threads()
    return info


def child_trl(spec):
    import warnings

    import torch
    warnings.filterwarnings("ignore")
    torch.set_num_threads(spec["threads"])
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    from nanorlhf.data import load_examples, tokenize
    from nanorlhf.model import set_pad_token
    stage, seq_len, B = spec["stage"], spec["seq_len"], spec["batch_size"]
    tok = AutoTokenizer.from_pretrained(spec["model"])
    torch.manual_seed(0)
    if stage == "rm":
        model = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    set_pad_token(tok, model)  # the same pad token as ours (unk, not EOS); no batch here is padded anyway
    info = {"baseline_rss": rss_mib(), "attn": model.config._attn_implementation}

    # Exactly the token ids ours trains on (nanorlhf.data: chat template, EOS, truncation to seq_len), pre-tokenised.
    rows = tokenize(load_examples(spec["data"], "sft" if stage == "sft" else "pairs"), tok, seq_len)[0]
    if stage == "sft":  # labels -100 on the prompt: TRL's fused head shifts them, so the completion tokens are scored
        data = {"input_ids": [p + c for p, c in rows], "labels": [[-100] * len(p) + c for p, c in rows]}
    elif stage == "rm":
        data = {"chosen_ids": [p + c for p, c, r, m in rows], "rejected_ids": [p + r for p, c, r, m in rows]}
    else:
        data = {"prompt_ids": [p for p, c, r, m in rows], "chosen_ids": [c for p, c, r, m in rows],
                "rejected_ids": [r for p, c, r, m in rows]}
    dataset = Dataset.from_dict(data)

    lora = LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0, target_modules=list(TARGETS),
                      bias="none", task_type="SEQ_CLS" if stage == "rm" else "CAUSAL_LM",
                      modules_to_save=["score"] if stage == "rm" else None)
    common = dict(output_dir=os.path.join(spec["work"], f"trl-{stage}-{os.getpid()}"),
                  max_steps=spec["warmup"] + spec["steps"], per_device_train_batch_size=B,
                  gradient_accumulation_steps=1, learning_rate=1e-4, lr_scheduler_type="cosine", warmup_steps=0,
                  optim="adamw_torch", weight_decay=0.0, max_grad_norm=1.0, gradient_checkpointing=False,
                  bf16=False, fp16=False, use_cpu=True, seed=0, report_to="none", logging_strategy="no",
                  save_strategy="no", eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                  dataloader_pin_memory=False, max_length=seq_len)
    times, peak = [], {}

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            times.append(now - self.t)
            self.t = now
            peak["rss"] = max_rss_mib()
            peak["threads"] = torch.get_num_threads()

    if stage == "sft":
        trainer = trl.SFTTrainer(model=model, args=trl.SFTConfig(**common), train_dataset=dataset,
                                 processing_class=tok, peft_config=lora, callbacks=[StepTimer()])
    elif stage == "rm":
        trainer = trl.RewardTrainer(model=model, args=trl.RewardConfig(**common), train_dataset=dataset,
                                    processing_class=tok, peft_config=lora, callbacks=[StepTimer()])
    else:
        class PreTokenizedDPOTrainer(trl.DPOTrainer):
            """DPOTrainer always tokenises text; ours is already tokenised (data preparation is not timed)."""

            def _prepare_dataset(self, dataset, *a, **k):
                return dataset

        cfg = trl.DPOConfig(**common, beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=False)
        trainer = PreTokenizedDPOTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=tok,
                                         peft_config=lora, callbacks=[StepTimer()])
    info["trainable"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    assert len(times) == spec["warmup"] + spec["steps"], len(times)
    info |= {"times": times, "peak_rss": peak["rss"], "threads": peak["threads"],
             "tokens_per_step": round(trainer._total_train_tokens / len(times))}  # attention-mask sum
    return info


def child(spec):
    info = (child_ours if spec["framework"] == "ours" else child_trl)(spec)
    print("RESULT " + json.dumps(info), flush=True)


# ---------------------------------------------------------------- driver (parent)


def run(spec, threads):
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TQDM_DISABLE": "1",
                        "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                        "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    load0 = os.getloadavg()[0]
    t0 = time.time()
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)], cwd=ROOT,
                       capture_output=True, text=True, env=env)
    result = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    if r.returncode or not result:
        raise RuntimeError(f"{spec['framework']} {spec['stage']} failed (exit {r.returncode}):\n"
                           f"{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    info = json.loads(result[-1][7:])
    info["wall"], info["load"] = time.time() - t0, (load0, os.getloadavg()[0])
    return info


def fmt_ratio(x):
    return f"{x:.2f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per run (after the warmup)")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps per run (torch.compile, allocations)")
    p.add_argument("--repeats", type=int, default=3, help="runs per (framework, stage), interleaved")
    p.add_argument("--batch-size", type=int, default=4, help="examples (SFT) or pairs (RM, DPO) per step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens of every sequence (prompt + reply), no padding")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads on both sides (1: on a shared box, OpenMP threads spin against other "
                        "processes and the timings turn to noise; pass the core count on an idle machine)")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of sft,rm,dpo")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(json.loads(a.child))
    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        p.error(f"--stages: unknown {bad}; choose from {','.join(STAGES)}")
    if a.seq_len % 2 or a.seq_len < 16:
        p.error("--seq-len must be even and >= 16 (half prompt, half reply)")

    import peft
    import torch
    import transformers
    import trl
    from transformers import AutoTokenizer

    from nanorlhf import model as M
    tok_dir = M.resolve("smollm2")  # SmolLM2's tokenizer; converts the embedded GGUF once (~40 s)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    results = {(fw, s): [] for fw in ("ours", "trl") for s in stages}
    loads = [os.getloadavg()]
    with tempfile.TemporaryDirectory() as work:
        from transformers import LlamaForCausalLM
        torch.manual_seed(0)
        cfg = model_config(len(tok), a.hidden, a.layers, tok, a.seq_len)
        model_dir = os.path.join(work, "model")
        model = LlamaForCausalLM(cfg)
        n_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        del model
        n_rows = a.batch_size * (a.warmup + a.steps)  # one epoch: no epoch boundary inside the timed steps
        data = write_data(work, tok, n_rows, a.seq_len)

        print(f"model: random Llama, vocab {len(tok)} (SmolLM2 tokenizer), hidden {cfg.hidden_size}, "
              f"intermediate {cfg.intermediate_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads "
              f"({cfg.num_key_value_heads} kv), tied embeddings, {n_params / 1e6:.1f}M params, fp32")
        print(f"run: batch {a.batch_size} ({'pairs for rm/dpo' if set(stages) & {'rm', 'dpo'} else 'examples'}), "
              f"seq len {a.seq_len} (every sequence; no padding), LoRA r={a.lora_r} alpha={a.lora_alpha:g} on "
              f"{','.join(t[:-5] for t in TARGETS)}, AdamW, clip 1.0, no grad checkpointing, {a.threads} thread(s); "
              f"{a.warmup} warmup + {a.steps} timed steps x {a.repeats} repeats per (framework, stage)")
        print(f"versions: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
              f"peft {peft.__version__}, python {sys.version.split()[0]}; {os.cpu_count()} CPUs")
        print(f"load average at start: {' '.join(f'{x:.2f}' for x in loads[0])}", flush=True)

        for rep in range(a.repeats):
            for i, stage in enumerate(stages):
                order = ("ours", "trl") if (rep + i) % 2 == 0 else ("trl", "ours")
                for fw in order:
                    spec = dict(framework=fw, stage=stage, model=model_dir, data=data["sft" if stage == "sft" else "pairs"],
                                work=work, steps=a.steps, warmup=a.warmup, batch_size=a.batch_size, seq_len=a.seq_len,
                                lora_r=a.lora_r, lora_alpha=a.lora_alpha, threads=a.threads)
                    info = run(spec, a.threads)
                    results[(fw, stage)].append(info)
                    loads.append(os.getloadavg())
                    timed = info["times"][a.warmup:]
                    print(f"  repeat {rep + 1} {stage:<3} {fw:<4}: median step {statistics.median(timed):.3f} s "
                          f"(min {min(timed):.3f}, max {max(timed):.3f}; warmup {', '.join(f'{t:.2f}' for t in info['times'][:a.warmup])} s), "
                          f"peak RSS {info['peak_rss']:.0f} MiB (Δ {info['peak_rss'] - info['baseline_rss']:.0f}), "
                          f"load {info['load'][0]:.2f}->{info['load'][1]:.2f}, {info['wall']:.0f} s wall", flush=True)

    print()
    ok_all = True
    for stage in stages:
        ours, theirs = results[("ours", stage)], results[("trl", stage)]

        def summary(runs):
            timed = [t for r in runs for t in r["times"][a.warmup:]]
            per_rep = [statistics.median(r["times"][a.warmup:]) for r in runs]
            return dict(time=statistics.median(timed), spread=(min(per_rep), max(per_rep)),
                        delta=statistics.median(r["peak_rss"] - r["baseline_rss"] for r in runs),
                        raw=statistics.median(r["peak_rss"] for r in runs),
                        base=statistics.median(r["baseline_rss"] for r in runs),
                        trainable=runs[0]["trainable"], attn=runs[0]["attn"], threads=runs[0]["threads"],
                        tokens=runs[0]["tokens_per_step"])
        o, t = summary(ours), summary(theirs)
        rt, rm = o["time"] / t["time"], o["delta"] / t["delta"]
        ok = rt <= 1 / 1.3 and rm <= 0.6
        ok_all &= ok
        print(f"== {stage.upper()}  ({'ours: train_' + stage + '.py' } vs trl.{dict(sft='SFTTrainer', rm='RewardTrainer', dpo='DPOTrainer')[stage]})")
        w = 12
        print(f"  {'':<36}{'ours':>{w}}{'TRL':>{w}}{'ours/TRL':>{w}}")
        print(f"  {'step time, median (s)':<36}{o['time']:>{w}.3f}{t['time']:>{w}.3f}{rt:>{w}.2f}   "
              f"-> ours {1 / rt:.2f}x {'faster' if rt < 1 else 'slower' if rt > 1 else 'as fast'}")
        spread = lambda x: f"{x['spread'][0]:.2f}-{x['spread'][1]:.2f}"
        print(f"  {'  per-repeat medians, min-max (s)':<36}{spread(o):>{w}}{spread(t):>{w}}")
        print(f"  {'peak RSS, Δ over loaded model (MiB)':<36}{o['delta']:>{w}.0f}{t['delta']:>{w}.0f}{rm:>{w}.2f}")
        print(f"  {'peak RSS, raw (MiB)':<36}{o['raw']:>{w}.0f}{t['raw']:>{w}.0f}{o['raw'] / t['raw']:>{w}.2f}")
        print(f"  {'RSS after imports + load (MiB)':<36}{o['base']:>{w}.0f}{t['base']:>{w}.0f}")
        print(f"  {'trainable params':<36}{o['trainable']:>{w},}{t['trainable']:>{w},}")
        print(f"  {'tokens per step (no padding)':<36}{o['tokens']:>{w},}{t['tokens']:>{w},}")
        print(f"  {'attention / threads in the step':<36}{o['attn'] + ' / ' + str(o['threads']):>{w}}"
              f"{t['attn'] + ' / ' + str(t['threads']):>{w}}")
        print(f"  target (>= 1.3x faster, <= 0.6x memory Δ): {'met' if ok else 'NOT met'}"
              f" (speed {'ok' if rt <= 1 / 1.3 else 'no'}, memory {'ok' if rm <= 0.6 else 'no'})")
    ones = [l[0] for l in loads]
    print(f"\nload average (1 min) over the run: min {min(ones):.2f}, median {statistics.median(ones):.2f}, "
          f"max {max(ones):.2f} on {os.cpu_count()} CPUs; timings are medians of interleaved runs")
    print(f"all targets met: {'yes' if ok_all else 'no'}")


if __name__ == "__main__":
    main()
