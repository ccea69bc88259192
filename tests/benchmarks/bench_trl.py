"""Stages vs TRL: one SFT, reward-model, DPO and GRPO optimizer step of ours next to TRL's SFTTrainer, RewardTrainer,
DPOTrainer and GRPOTrainer, on the same tiny model, batch and sequence length, on the CPU; and whole PPO runs next to
trl 1.12.0's PPOTrainer on the demo's models.

    python tests/benchmarks/bench_trl.py                               # sft, rm, dpo, grpo; 3 repeats
    python tests/benchmarks/bench_trl.py --stages dpo --steps 4 --repeats 2 --seq-len 512
    python tests/benchmarks/bench_trl.py --stages grpo --grpo-steps 16 --repeats 5
    python tests/benchmarks/bench_trl.py --stages ppo --sft out/demo/sft --rm out/demo/rm \
        --prompts out/demo/data/prompts.jsonl                          # 15 iterations of 32 rollouts a side

sft, rm, dpo and grpo need the `bench` extra (pip install trl datasets) in the running environment. ppo needs no trl
there (the `demo` extra, for the gold reward): TRL deleted PPOTrainer after trl 1.12.0 (trl#7020), so its side runs
in a virtual environment of its own, --trl-venv (default .cache/trl-1.12.0 in the repository, git-ignored). When
that folder does not exist the benchmark builds it, once:

    python -m venv .cache/trl-1.12.0 && .cache/trl-1.12.0/bin/pip install torch==T transformers==X peft==P trl==1.12.0

with T, X and P the versions of the running environment (so pip takes the local CPU torch wheel, not a CUDA build,
and only the trainer differs between the sides). Where it cannot be built (no network, no such release) or holds
another trl, the ppo stage prints one line saying what is missing and that command, the other stages run, and the
exit status is 1. Not part of the default pytest run (no test_ prefix).

What runs. Every (framework, stage, repeat) is a fresh subprocess, and the two frameworks alternate (ours first on
even repeats, TRL first on odd ones) so background load hits both alike. A subprocess runs --warmup + --steps
optimizer steps; only the last --steps are timed (the warmup covers our kernel's torch.compile and both sides'
first-call allocations).
  ours: the stage's own `train(Args(...))` with --max-steps, exactly what `python train_<stage>.py` runs; step times
        and peak RSS are read from the metrics.jsonl the Loop writes (`step_time`: end of one step to the end of the
        next, so the collate of the next batch, forward, backward, clip, AdamW and logging are in it; `peak_mem_gb`:
        VmHWM at the end of the step). The final merge+save is patched out and SFT samples/eval are off.
  TRL:  SFTTrainer / RewardTrainer / DPOTrainer(...).train() with max_steps; a TrainerCallback takes the time between
        consecutive on_step_end calls (same span: next batch, forward, backward, clip, AdamW) and VmHWM at the
        last one.
Same conditions: one model folder (a random Llama of --hidden/--layers with SmolLM2's real tokenizer, V = 49152,
tied embeddings as SmolLM2); fp32; sdpa attention; LoRA r/alpha on q,k,v,o,gate,up,down with no dropout (TRL through
`peft_config=LoraConfig`; the RM's score head trained whole on both sides: ours does it itself, PEFT via
modules_to_save); AdamW (torch.optim.AdamW: TRL's optim="adamw_torch"), weight decay 0, clip at 1.0; no gradient
checkpointing; batch --batch-size (pairs for RM/DPO, both replies in one forward on both sides; ours' RM runs each
prompt once and both replies from its KV cache, nanorlhf/prefix.py), grad accumulation 1;
the same --threads (OMP_NUM_THREADS and torch.set_num_threads in every subprocess). The data are tokenised once by
nanorlhf.data (chat template + truncation to --seq-len) and TRL gets exactly those token ids pre-tokenised, so every
sequence on both sides is exactly --seq-len tokens (half prompt, half completion) and no batch has padding.
TRL's logging, evaluation and saving are off.

Memory. Peak RSS of the subprocess (VmHWM) at the end of the last step, shown raw and as "Δ": minus the RSS right
after imports and model load (before LoRA/trainer setup), i.e. what training itself adds. Raw RSS also counts each
side's imports (TRL pulls in datasets/pyarrow/pandas; ours pulls in inductor at its first step, after the baseline, so
that is in our Δ). The targets are judged on Δ (PPO's on the peak, see below).

GRPO (--stages grpo): ours is train_grpo.py, TRL's GRPOTrainer. There an optimizer step is a whole iteration, so its
time includes generation, scoring and the update on both sides (ours: `step_time`; TRL: between on_step_end calls).
  Per step: --grpo-prompts prompts x --num-generations (k) completions, sampled once by transformers' generate on the
        CPU (TRL: use_vllm=False), then one optimizer step on all of them (ours: one minibatch, --ppo-epochs 1; TRL:
        num_iterations 1, per_device_train_batch_size --grpo-micro-batch and gradient_accumulation_steps =
        steps_per_generation = completions / micro-batch, so one generation feeds exactly one optimizer step). Forward
        micro-batches of --grpo-micro-batch completions on both sides.
  Same on both sides, besides the conditions above (model, fp32, LoRA, AdamW, clip): k, --max-new-tokens, temperature,
        top_p 1, top_k off, β = 0 (TRL's default: neither side runs a reference model), ε = 0.2, loss_type "grpo",
        scale_rewards "group", --grpo-lr with cosine decay and no warmup, dropout off, seed = repeat index. Prompts are
        short chat messages ("Question i: ...") and both sides render them with the chat template to the same ids
        (checked in TRL's subprocess). Each run is --grpo-steps steps: the first --warmup are not timed (compile,
        first allocations), all of them make the reward curve.
  The reward. A random model cannot move a usual text reward: its tied embeddings (std 0.02) under the final RMSNorm
        keep every logit within ~±1.4 of the mean, so at temperature 0.3-1 each of the 49152 tokens has probability
        ~1/49152 and nothing correlates with the random geometry (a count of its 32 likeliest words stayed flat over
        16 steps even at lr 1e-2; a length reward could gain ~0.1 character per token at most). But its last hidden
        state is nearly the same at every position, so it has a favourite token, and at temperature 0.1
        (--grpo-temperature) that token is ~10% of the samples (default model: 'ross', ~3 per 32-token response; the
        two sides' generate paths give the same count on the initial model). The reward is the count of that token's
        text in the response ("count of a frequent token"); the bench picks the token from the initial model (the most
        likely one at the prompts' ends with >= 2 non-space characters) and writes bench_reward.py to its temp folder:
        ours gets --reward-fn bench_reward:reward (f(prompts, responses) on strings), TRL
        reward_funcs=[bench_reward.trl_reward] (the same count on the chat completions' text). With --grpo-lr 3e-5 the
        mean reward climbs from ~3 to ~15-25 of 32 in 16 steps on both sides, unsaturated, so a slower learner shows.
  Reward comparison: each side logs the mean reward of every step (ours metrics.jsonl "reward", TRL log_history
        "reward" with logging_steps=1). Per repeat the mean of the last --grpo-last steps; over repeats their mean and
        standard error (with one repeat, the standard error of those steps). Ours passes when ours - TRL >= -2 x the
        standard error of that difference. Completion tokens per step are shown: the work per step is the same only
        if both sides sample equally long completions (no EOS: always --max-new-tokens).

PPO (--stages ppo): ours is train_ppo.py, TRL's trl.experimental.ppo.PPOTrainer of trl 1.12.0, each side a fresh
process --ppo-repeats times, interleaved, seed = repeat. Both start from one SFT model (--sft; PEFT LoRA on TRL's,
whose reference is that adapter disabled, as ours), one reward model (--rm) and a critic started from it with a LoRA
adapter of its own (ours --critic-from-rm; TRL's value_model; --ppo-critic head runs ours' --critic head instead).
  Same on both sides: the prompts of --prompts, tokenised once by nanorlhf.data and drawn in ours' seeded order (TRL's
        shuffling DataLoader is replaced by one in that order; every iteration's prompts are compared); rollouts per
        iteration, minibatches (gradient_accumulation_steps 1, the only way TRL steps once per minibatch: see
        trl_ppo_config), epochs, response length (cut after EOS), temperature, KL coefficient, GAE, clip ranges,
        value coefficient, learning rate, LoRA, fp32, no gradient checkpointing, one pad token (unk, not EOS),
        --threads. Every setting that cannot be shared is printed with why (ppo_unmatched), e.g. TRL never clips
        gradients, so ours runs without.
  Per side: seconds per iteration (median over the iterations after the first, which holds our kernel's
        torch.compile; ours `step_time`, TRL between on_step_end calls) and of it the sampling (ours `time/generate`,
        TRL its batch_generation call), peak RSS (VmHWM read inside the child at
        the end of each iteration), and the gold reward (nanorlhf.gold:sentiment, computed here) of the rollouts of
        the first and the last iteration: each child returns every iteration's decoded responses as its reward model
        scored them. Memory is the peak alone: a Δ over the RSS after loading would count the weights that
        safetensors maps lazily and the first iteration pages in. The gold target: ours - TRL at the last iteration
        >= -2 x the standard error of that difference (over the rollouts).
"""
import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT]
MiB = 2**20
STAGES = ("sft", "rm", "dpo", "grpo", "ppo")
DEFAULT_STAGES = ("sft", "rm", "dpo", "grpo")  # ppo needs trained models and its own TRL: asked for by name
# (x faster, x memory): memory Δ for the single-step stages, the peak for PPO
GOALS = {"sft": (1.3, 0.6), "rm": (1.3, 1.0), "dpo": (1.3, 0.6), "grpo": (1.5, 0.7), "ppo": (1.5, 0.7)}
TRL_CLASS = {"sft": "SFTTrainer", "rm": "RewardTrainer", "dpo": "DPOTrainer", "grpo": "GRPOTrainer"}
TRL_PPO = "1.12.0"  # the last trl release with PPOTrainer (trl.experimental.ppo); trl#7020 deleted it
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
    """This process's own peak (VmHWM): ru_maxrss would start at the parent's high-water mark (nanorlhf/perf.py)."""
    import torch

    from nanorlhf.perf import peak_memory_gb
    return peak_memory_gb(torch.device("cpu")) * 1024


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


def write_prompts(work, n):
    """prompts.jsonl for GRPO: n short, distinct user prompts (one epoch of the run; the reward ignores them)."""
    path = os.path.join(work, "prompts.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps({"prompt": f"Question {i}: " + text(6, i)}) + "\n" for i in range(n))
    return path


def frequent_token(model, tok, prompts_path, temperature, n_prompts=8):
    """(text, probability) of the initial model's favourite token: the most likely one, averaged over the ends of the
    first prompts at `temperature`, whose text has >= 2 non-space characters (so counting it in text means it).
    A random model's last hidden state barely depends on the context, so this token is likely everywhere."""
    import torch

    from nanorlhf.data import render_prompt
    with open(prompts_path) as f:
        prompts = [json.loads(line)["prompt"] for line in f][:n_prompts]
    with torch.no_grad():
        probs = sum(torch.softmax(model(torch.tensor([render_prompt(tok, [{"role": "user", "content": p}])]))
                                  .logits[0, -1] / temperature, -1) for p in prompts) / len(prompts)
    special = set(tok.all_special_ids)
    for i in probs.argsort(descending=True).tolist():
        word = tok.decode([i])
        if i not in special and len(word.strip()) >= 2:
            return word, float(probs[i])
    raise RuntimeError("no token with a countable text")


def write_reward(work, word):
    """bench_reward.py in the temp folder: the count of `word` in each response, for ours (f(prompts, responses) on
    strings) and TRL (reward_funcs get keyword lists; completions of chat prompts are message lists)."""
    with open(os.path.join(work, "bench_reward.py"), "w") as f:
        f.write(f'''"""GRPO benchmark reward: occurrences of the initial model's favourite token, {word!r}."""
WORD = {word!r}


def reward(prompts, responses):
    return [float(r.count(WORD)) for r in responses]


def trl_reward(prompts, completions, **kwargs):
    return reward(prompts, [c[-1]["content"] if isinstance(c, list) else c for c in completions])
''')


# ---------------------------------------------------------------- one run (child)


def ours_args(spec, out):
    """The keyword arguments of the stage's Args for one benchmark run (tests/test_benchmarks.py checks each
    stage still takes them)."""
    if spec["stage"] == "ppo":  # TRL's settings (trl_ppo_config); its minibatch is one forward and one step
        R, minibatch = spec["rollouts"], spec["rollouts"] // spec["minibatches"]
        return dict(model=spec["sft"], rm=[spec["rm"]], data=spec["data"], out=out, max_steps=spec["iterations"],
                    rollout_batch_size=R, minibatch_size=minibatch, batch_size=minibatch,
                    score_batch_size=spec["forward_batch"], ppo_epochs=spec["epochs"], lr=spec["lr"], warmup=0,
                    weight_decay=0.0, max_grad_norm=0.0, max_prompt_length=spec["max_prompt_length"],
                    max_new_tokens=spec["max_new_tokens"], temperature=spec["temperature"], top_p=1.0,
                    kl_coef=spec["kl_coef"], kl_estimator="k1", gamma=1.0, lam=0.95, whiten_rewards=False,
                    cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, missing_eos="none", critic=spec["critic"],
                    critic_from_rm=spec["critic"] == "adapter", lora_r=spec["lora_r"], lora_alpha=spec["lora_alpha"],
                    device="cpu", dtype="float32", optim="adamw", gradient_checkpointing=False, sample_every=0,
                    log_every=10**6, seed=spec["seed"])
    args = dict(model=spec["model"], data=spec["data"], out=out, max_steps=spec["warmup"] + spec["steps"],
                batch_size=spec["batch_size"], grad_accum=1, max_length=spec["seq_len"], lora_r=spec["lora_r"],
                lora_alpha=spec["lora_alpha"], lora_dropout=0.0, eval_frac=0.0, device="cpu", dtype="float32",
                optim="adamw", weight_decay=0.0, max_grad_norm=1.0, gradient_checkpointing=False, log_every=10**6,
                seed=spec.get("seed", 0))
    if spec["stage"] == "sft":
        args["samples"] = 0
    if spec["stage"] == "rm":
        args["norm_samples"] = 2  # the reward statistics pass after training: kept minimal (not timed)
    if spec["stage"] == "rm" or spec["stage"] == "dpo":
        args["loss"] = "sigmoid"
    if spec["stage"] == "grpo":  # batch_size: the forward micro-batch; the minibatch is every completion of a step
        for flag in ("grad_accum", "max_length", "lora_dropout", "eval_frac"):  # flags GRPO does not take
            del args[flag]
        args |= dict(max_prompt_length=spec["seq_len"], reward_fn="bench_reward:reward",
                     rollout_batch_size=spec["grpo_prompts"], num_generations=spec["num_generations"], ppo_epochs=1,
                     max_new_tokens=spec["max_new_tokens"], temperature=spec["temperature"], top_p=1.0, beta=0.0,
                     advantage="grpo", scale_rewards="group", loss_type="grpo", cliprange=0.2, lr=spec["lr"], warmup=0,
                     sample_every=0)
    return args


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
            info["trainable"] = sum(p.numel() for p in self.optimizer_step.params)

    script.load_policy, script.Loop = measured_load_policy, CountingLoop
    if spec["stage"] == "ppo":  # each iteration's prompts and decoded responses, as the reward model scores them
        rollouts = info["rollouts"] = []

        class RecordingRewarder(script.Rewarder):
            def __call__(self, prompts, queries, responses, *a, **k):
                scores, parts, texts = super().__call__(prompts, queries, responses, *a, **k)
                rollouts.append({"prompts": prompt_digest(queries), "texts": texts,
                                 "tokens": sum(map(len, responses))})
                return scores, parts, texts

        script.Rewarder = RecordingRewarder
    out = os.path.join(spec["work"], f"ours-{spec['stage']}-{os.getpid()}")
    sys.path.insert(0, spec["work"])  # bench_reward.py, GRPO's reward
    args = ours_args(spec, out)
    script.train(script.Args(**args))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        steps = [m for m in map(json.loads, f) if "step_time" in m]
    info["times"] = [m["step_time"] for m in steps]
    info["peak_rss"] = steps[-1]["peak_mem_gb"] * 1024  # VmHWM at the end of the last step, GiB -> MiB
    info["threads"] = torch.get_num_threads()
    if spec["stage"] == "ppo":
        assert len(steps) == len(info["rollouts"]) == spec["iterations"], (len(steps), len(info["rollouts"]))
        info["sampling"] = [m["time/generate"] for m in steps]  # train_ppo's phase 1, rollout
        return info
    assert len(steps) == spec["warmup"] + spec["steps"], len(steps)
    # attention-mask sum (GRPO: completion tokens, the mean over the run as lengths may change)
    info["tokens_per_step"] = round(statistics.mean(m["tokens_per_s"] * m["step_time"] for m in steps))
    if spec["stage"] == "grpo":
        info["rewards"] = [m["reward"] for m in steps]
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

    # Exactly the token ids ours trains on (nanorlhf.data: chat template, EOS, truncation to seq_len), pre-tokenised;
    # GRPO prompts as chat messages (GRPOTrainer applies the template itself; checked to give ours' ids).
    if stage != "grpo":
        rows = tokenize(load_examples(spec["data"], "sft" if stage == "sft" else "pairs"), tok, seq_len)[0]
    if stage == "grpo":
        data = {"prompt": grpo_prompts(spec["data"], tok)}
    elif stage == "sft":  # labels -100 on the prompt: TRL's fused head shifts them, so the completion tokens are scored
        data = {"input_ids": [p + c for p, c in rows], "labels": [[-100] * len(p) + c for p, c in rows]}
    elif stage == "rm":
        data = {"chosen_ids": [p + c for p, c, r, m in rows], "rejected_ids": [p + r for p, c, r, m in rows]}
    else:  # dpo
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
    elif stage == "dpo":
        class PreTokenizedDPOTrainer(trl.DPOTrainer):
            """DPOTrainer always tokenises text; ours is already tokenised (data preparation is not timed)."""

            def _prepare_dataset(self, dataset, *a, **k):
                return dataset

        cfg = trl.DPOConfig(**common, beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=False)
        trainer = PreTokenizedDPOTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=tok,
                                         peft_config=lora, callbacks=[StepTimer()])
    else:  # GRPO: the reward module the parent wrote to the temp folder
        sys.path.insert(0, spec["work"])
        import bench_reward
        trainer = trl.GRPOTrainer(model=model, reward_funcs=[bench_reward.trl_reward], args=grpo_config(spec, common),
                                  train_dataset=dataset, processing_class=tok, peft_config=lora,
                                  callbacks=[StepTimer()])
    info["trainable"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    assert len(times) == spec["warmup"] + spec["steps"], len(times)
    info |= {"times": times, "peak_rss": peak["rss"], "threads": peak["threads"]}
    if stage == "grpo":  # one log per step (logging_steps=1)
        logs = [h for h in trainer.state.log_history if "reward" in h]
        assert len(logs) == len(times), (len(logs), len(times))
        info["rewards"] = [h["reward"] for h in logs]
        n = spec["grpo_prompts"] * spec["num_generations"]
        info["tokens_per_step"] = round(statistics.mean(h["completions/mean_length"] * n for h in logs))
    else:
        info["tokens_per_step"] = round(trainer._total_train_tokens / len(times))  # attention-mask sum
    return info


def grpo_prompts(path, tok):
    """The prompts of `path` as chat messages for GRPOTrainer, after checking that its chat-template call gives the
    same ids as ours (nanorlhf.data.render_prompt), so both sides sample from the same contexts."""
    from nanorlhf.data import render_prompt
    with open(path) as f:
        prompts = [[{"role": "user", "content": json.loads(line)["prompt"]}] for line in f]
    theirs = tok.apply_chat_template(conversation=prompts[:4], add_generation_prompt=True, tokenize=True,
                                     return_dict=True)["input_ids"]
    assert [list(t) for t in theirs] == [render_prompt(tok, p) for p in prompts[:4]], "chat template ids differ"
    return prompts


def grpo_config(spec, common):
    """GRPOConfig matching ours: one generation of every completion per optimizer step, split into micro-batches by
    gradient accumulation; TRL's GRPO defaults that differ from ours (bf16, gradient checkpointing, lr) overridden."""
    import trl
    n = spec["grpo_prompts"] * spec["num_generations"]
    micro = spec["batch_size"]
    args = {k: v for k, v in common.items() if k != "max_length"}  # GRPO's lengths: prompt as is, max_completion_length
    args |= dict(per_device_train_batch_size=micro, gradient_accumulation_steps=n // micro,
                 steps_per_generation=n // micro, num_iterations=1, num_generations=spec["num_generations"],
                 max_completion_length=spec["max_new_tokens"], temperature=spec["temperature"], top_p=1.0, top_k=0,
                 beta=0.0, epsilon=0.2, loss_type="grpo", scale_rewards="group", learning_rate=spec["lr"],
                 use_vllm=False, disable_dropout=True, log_completions=False, seed=spec["seed"],
                 logging_strategy="steps", logging_steps=1)  # the reward of every step, as ours logs it
    return trl.GRPOConfig(**args)


# ---------------------------------------------------------------- PPO: trl 1.12.0 in its own environment


def prompt_digest(queries):
    """One short string for an iteration's prompts (token-id lists) in order: the parent checks both sides drew the
    same ones."""
    return hashlib.sha1(json.dumps([list(map(int, q)) for q in queries]).encode()).hexdigest()[:16]


def lora_config(spec, task):
    from peft import LoraConfig
    return LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0, target_modules=list(TARGETS),
                      bias="none", task_type=task, modules_to_save=["score"] if task == "SEQ_CLS" else None)


def normalised_reward_model(path, pad_id):
    """The RM at `path` with ours' reward normalisation folded into its head: score' = (score - reward_mean) /
    reward_std, the statistics train_rm.py stored, which ours applies to every score (model.score_sequences). TRL uses
    raw scores, so without this the two would optimise rewards on different scales under the same KL coefficient."""
    import torch
    from torch import nn
    from transformers import AutoModelForSequenceClassification
    rm = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    rm.config.pad_token_id = pad_id
    mean, std = getattr(rm.config, "reward_mean", 0.0), getattr(rm.config, "reward_std", 1.0)
    head = nn.Linear(rm.score.in_features, 1)
    with torch.no_grad():
        head.weight.copy_(rm.score.weight / std)
        head.bias.fill_(((rm.score.bias.item() if rm.score.bias is not None else 0.0) - mean) / std)
    rm.score = head
    return rm


def trl_ppo_config(spec):
    """PPOConfig with ours' settings. gradient_accumulation_steps 1: with more, TRL's accelerate accumulation spans
    every minibatch of an epoch and it takes one optimizer step per epoch, not per minibatch; so each minibatch is
    one forward (ours: --batch-size = --minibatch-size). Its defaults that differ from ours (bf16, gradient
    checkpointing, lr 3e-6, linear decay) overridden; max_grad_norm is not set, as PPOTrainer never clips."""
    from trl.experimental.ppo import PPOConfig
    R = spec["rollouts"]
    return PPOConfig(output_dir=os.path.join(spec["work"], f"trl-ppo-{os.getpid()}"), per_device_train_batch_size=R,
                     gradient_accumulation_steps=1, num_mini_batches=spec["minibatches"],
                     num_ppo_epochs=spec["epochs"], total_episodes=R * spec["iterations"],
                     local_rollout_forward_batch_size=spec["forward_batch"], response_length=spec["max_new_tokens"],
                     stop_token="eos", temperature=spec["temperature"], kl_coef=spec["kl_coef"], kl_estimator="k1",
                     gamma=1.0, lam=0.95, whiten_rewards=False, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1,
                     missing_eos_penalty=None, learning_rate=spec["lr"], lr_scheduler_type="cosine", warmup_steps=0,
                     optim="adamw_torch", weight_decay=0.0, bf16=False, fp16=False, gradient_checkpointing=False,
                     use_cpu=True, seed=spec["seed"], report_to="none", save_strategy="no", disable_tqdm=True,
                     num_sample_generations=0, dataloader_num_workers=0, dataloader_pin_memory=False)


def child_trl_ppo(spec):
    """trl 1.12.0's PPOTrainer on ours' prompts in ours' order: the SFT model with a PEFT LoRA adapter (its reference:
    the adapter disabled), the normalised RM, and a critic started from that RM with LoRA of its own (ours
    --critic-from-rm)."""
    import warnings

    import numpy as np
    import torch
    warnings.filterwarnings("ignore")
    torch.set_num_threads(spec["threads"])
    import trl
    import trl.experimental.ppo.ppo_trainer as ppo_module
    from datasets import Dataset
    from peft import get_peft_model
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorWithPadding, TrainerCallback
    from trl.experimental.ppo import PPOTrainer

    from nanorlhf.data import load_prompts
    from nanorlhf.loop import Stream
    from nanorlhf.model import set_pad_token
    tok = AutoTokenizer.from_pretrained(spec["sft"])
    policy = AutoModelForCausalLM.from_pretrained(spec["sft"], dtype=torch.float32)
    set_pad_token(tok, policy)  # ours' pad (unk): TRL finds padding by the pad id, so pad = EOS would mask every EOS
    tok.padding_side = "left"  # TRL samples from left-padded queries
    reward = normalised_reward_model(spec["rm"], tok.pad_token_id)
    value = get_peft_model(normalised_reward_model(spec["rm"], tok.pad_token_id), lora_config(spec, "SEQ_CLS"))
    # The prompts ours' Loop draws, in its order: its Stream at the same seed, one iteration after another.
    prompts = load_prompts(spec["data"], tok, spec["max_prompt_length"])
    stream, R = Stream(len(prompts), spec["seed"]), spec["rollouts"]
    dataset = Dataset.from_dict({"input_ids": [prompts[i].ids for _ in range(spec["iterations"])
                                               for i in stream.take(R)]})
    times, peak = [], {}

    class IterationTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):  # once per PPO iteration
            now = time.perf_counter()
            times.append(now - self.t)
            self.t = now
            peak["rss"] = max_rss_mib()
            peak["threads"] = torch.get_num_threads()

    trainer = PPOTrainer(args=trl_ppo_config(spec), processing_class=tok, model=policy, ref_model=None,
                         reward_model=reward, train_dataset=dataset, value_model=value,
                         eval_dataset=dataset.select(range(1)), peft_config=lora_config(spec, "CAUSAL_LM"),
                         callbacks=[IterationTimer()])
    # PPOTrainer shuffles its prompts with a DataLoader of its own; this one keeps ours' order.
    trainer.dataloader = DataLoader(dataset, batch_size=R, shuffle=False, collate_fn=DataCollatorWithPadding(tok),
                                    drop_last=True)
    np.random.seed(spec["seed"])  # its minibatch shuffle draws from numpy's global generator, unseeded
    rollouts = []
    get_reward = ppo_module.get_reward

    def recording_get_reward(model, query_responses, pad_token_id, context_length):
        """Each iteration's prompts and decoded responses, as PPOTrainer hands them to the reward model (the
        response cut after EOS, padded)."""
        if model is trainer.reward_model:
            if len(rollouts) == trainer.state.global_step:  # the first forward batch of an iteration
                rollouts.append({"prompts": [], "texts": [], "tokens": 0})
            queries, responses = query_responses[:, :context_length], query_responses[:, context_length:]
            rollouts[-1]["prompts"] += [q[q.ne(pad_token_id).int().argmax():].tolist() for q in queries]  # left pad off
            rollouts[-1]["texts"] += tok.batch_decode(responses, skip_special_tokens=True)
            rollouts[-1]["tokens"] += int(responses.ne(pad_token_id).sum())
        return get_reward(model, query_responses, pad_token_id, context_length)

    sampling = []
    batch_generation = ppo_module.batch_generation

    def timed_batch_generation(*a, **k):  # each iteration's sampling, as ours' time/generate
        t = time.perf_counter()
        out = batch_generation(*a, **k)
        sampling.append(time.perf_counter() - t)
        return out

    ppo_module.get_reward, ppo_module.batch_generation = recording_get_reward, timed_batch_generation
    info = {"attn": policy.config._attn_implementation, "trl": trl.__version__,
            "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)}
    trainer.train()
    assert len(times) == len(rollouts) == spec["iterations"], (len(times), len(rollouts))
    for r in rollouts:
        r["prompts"] = prompt_digest(r["prompts"])
    return info | {"times": times, "sampling": sampling, "peak_rss": peak["rss"], "threads": peak["threads"],
                   "rollouts": rollouts}


class EnvError(Exception):
    """What the TRL environment lacks and how to make it, in one line."""


def trl_env(path):
    """The python of the virtual environment at `path` with trl==TRL_PPO, built there first when `path` does not
    exist: torch, transformers and peft pinned to this interpreter's versions (pip takes the local torch wheel, and
    only the trainer differs between the sides). Raises EnvError when it cannot be built or holds another trl."""
    from importlib.metadata import PackageNotFoundError, version
    pins = []
    for package in ("torch", "transformers", "peft"):
        try:
            pins.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(package)
    pins.append(f"trl=={TRL_PPO}")
    recipe = f"{sys.executable} -m venv {path} && {path}/bin/pip install {' '.join(pins)}"
    python = os.path.join(path, "bin", "python")
    if not os.path.exists(path):
        print(f"building the TRL environment (once): {recipe}", flush=True)
        tmp = f"{path}.tmp{os.getpid()}"  # built aside and renamed: a failed build leaves nothing behind
        r = subprocess.run([sys.executable, "-m", "venv", tmp], capture_output=True, text=True)
        if r.returncode == 0:
            r = subprocess.run([os.path.join(tmp, "bin", "pip"), "install", *pins], capture_output=True, text=True)
        if r.returncode:
            shutil.rmtree(tmp, ignore_errors=True)
            why = (r.stderr.strip() or r.stdout.strip() or "no output").splitlines()[-1]
            raise EnvError(f"--stages ppo needs trl=={TRL_PPO} in its own environment, which could not be built at "
                           f"{path} ({why}); with network access to PyPI, build it with: {recipe}")
        os.replace(tmp, path)
    r = subprocess.run([python, "-c", "import trl.experimental.ppo, trl; print(trl.__version__)"],
                       capture_output=True, text=True)
    found = r.stdout.strip() if r.returncode == 0 else None
    if found != TRL_PPO:
        has = f"trl {found}" if found else "no working trl.experimental.ppo"
        raise EnvError(f"--stages ppo needs trl=={TRL_PPO} (the last release with PPOTrainer), but {path} has {has}; "
                       f"remove that folder and rerun (it is built again), build it with: {recipe}, or pass "
                       "--trl-venv")
    return python


def child(spec):
    if spec["framework"] == "ours":
        info = child_ours(spec)
    else:
        info = (child_trl_ppo if spec["stage"] == "ppo" else child_trl)(spec)
    print("RESULT " + json.dumps(info), flush=True)


# ---------------------------------------------------------------- driver (parent)


def run(spec, threads, python=sys.executable):
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TQDM_DISABLE": "1",
                        "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                        "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    load0 = os.getloadavg()[0]
    t0 = time.time()
    r = subprocess.run([python, os.path.abspath(__file__), "--child", json.dumps(spec)], cwd=ROOT,
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


def reward_stats(runs, last):
    """Mean reward of the last `last` steps and its standard error: over repeats (each repeat's mean), or over those
    steps when there is one repeat; and the curve, each step's reward averaged over repeats."""
    per_run = [statistics.mean(r["rewards"][-last:]) for r in runs]
    values = per_run if len(runs) > 1 else runs[0]["rewards"][-last:]
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
    curve = [statistics.mean(step) for step in zip(*(r["rewards"] for r in runs))]
    return statistics.mean(values), se, curve


def print_rewards(ours, theirs, last, w):
    """The reward rows of the GRPO table; True when ours is within 2 standard errors of TRL's or better."""
    (mo, so, co), (mt, st, ct) = reward_stats(ours, last), reward_stats(theirs, last)
    diff, se = mo - mt, (so**2 + st**2) ** 0.5  # standard error of the difference of two independent means
    ok = diff >= -2 * se if se == se else diff >= 0  # NaN (a single step): no error bar, ours must be >= TRL's
    over = "over repeats" if len(ours) > 1 else "over the steps of 1 repeat"
    print(f"  {'reward, first step (mean)':<36}{co[0]:>{w}.2f}{ct[0]:>{w}.2f}")
    print(f"  {f'reward, mean of last {last} steps ± SE':<36}{f'{mo:.2f}±{so:.2f}':>{w}}{f'{mt:.2f}±{st:.2f}':>{w}}"
          f"{mo / mt if mt else float('nan'):>{w}.2f}   (SE {over})")
    print(f"  {'  ours - TRL ± SE of the difference':<36}{f'{diff:+.2f}±{se:.2f}':>{w}}   -> "
          f"{'better' if diff > 0 else 'worse'}; {'within 2 SE or better' if ok else 'more than 2 SE worse'}")
    for name, curve in (("ours", co), ("TRL", ct)):
        print(f"  reward curve {name:<4} {' '.join(f'{x:.2f}' for x in curve)}")
    return ok


def ppo_unmatched(a):
    """What the two sides cannot share, and why: printed with every PPO table."""
    updates = a.ppo_iterations * a.ppo_minibatches * a.ppo_epochs
    lines = [
        f"learning-rate schedule: both cosine from --ppo-lr to 0 without warmup, but TRL steps it once per iteration "
        f"({a.ppo_iterations} values) and ours once per optimizer step ({updates})",
        "gradient clipping: none on either side; TRL's PPOTrainer never clips (max_grad_norm is not applied), so "
        "ours runs with --max-grad-norm 0 (its default clips at 1.0)",
        "old logprobs: TRL takes them from generate's scores (the sampling forward, with its KV cache), ours from a "
        "scoring forward after sampling; the same model and temperature, rounding apart",
        "where the score lands: TRL adds it one token after EOS (where the response has room), ours on EOS",
        "sampling: TRL through transformers' generate, ours through its own loop; the same distribution "
        "(softmax(logits / T), no top-k, top-p 1), different random streams",
        "rows: TRL's are [left-padded prompt, response] of one width, ours [prompt, response, padding]",
        "minibatch shuffle: TRL's numpy permutation (unseeded in TRL; seeded here to the repeat), ours torch's",
        "reward normalisation: ours divides each RM score by its stored reward_std after subtracting reward_mean; "
        "TRL, which uses raw scores, gets the RM with that map folded into its head, so both optimise the same number",
    ]
    if a.ppo_forward_batch < a.ppo_rollouts:
        lines.append(f"sampling batch: TRL samples {a.ppo_forward_batch} prompts at a time "
                     f"(local_rollout_forward_batch_size), ours all {a.ppo_rollouts} of an iteration at once")
    if a.ppo_critic == "head":
        lines.append("critic: ours a value head on the reference pass's features (--critic head, the demo's); TRL has "
                     "no such critic and keeps its value model, the RM with a LoRA adapter of its own")
    return lines


def gold_stats(runs, iteration):
    """Mean gold reward (nanorlhf.gold:sentiment) of one iteration's rollouts, over every repeat's, and its standard
    error over those rollouts."""
    values = [g for r in runs for g in r["gold"][iteration]]
    return statistics.mean(values), statistics.stdev(values) / len(values) ** 0.5


def ppo_stage(a, python):
    """--ppo-repeats interleaved runs of ours' PPO and trl's PPOTrainer (in the environment of `python`) on the same
    models and prompts, then the table; True when the targets are met."""
    from nanorlhf.gold import sentiment
    runs = {"ours": [], "trl": []}
    loads = [os.getloadavg()]
    R, minibatch = a.ppo_rollouts, a.ppo_rollouts // a.ppo_minibatches
    lora = f"LoRA r={a.lora_r} alpha={a.lora_alpha:g} on {','.join(t[:-5] for t in TARGETS)}"
    print(f"ppo: SFT {a.sft}, RM {a.rm}, prompts {a.prompts}; fp32, {a.threads} thread(s); trl {TRL_PPO} from "
          f"{python}")
    print(f"ppo, the same on both sides: {a.ppo_iterations} iterations x {R} rollouts (the same prompts in ours' "
          f"seeded order), {a.ppo_minibatches} minibatches of {minibatch} per epoch (each one forward and one "
          f"optimizer step), {a.ppo_epochs} epoch(s), <= {a.ppo_max_new_tokens} new tokens cut after EOS, temperature "
          f"{a.ppo_temperature:g}, KL coefficient {a.ppo_kl_coef:g} (k1, per token), gamma 1, lambda 0.95, clip 0.2, "
          f"value clip 0.2, vf_coef 0.1, advantages whitened, rewards not, no missing-EOS penalty, lr {a.ppo_lr:g}, "
          f"AdamW (weight decay 0), {lora} on the policy and the critic, "
          f"{'the critic started from the RM, ' if a.ppo_critic == 'adapter' else ''}dropout off, no gradient "
          f"checkpointing, {a.ppo_forward_batch} rows per scoring forward")
    print("ppo, not matched:")
    for line in ppo_unmatched(a):
        print(f"  - {line}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in loads[0])}", flush=True)
    with tempfile.TemporaryDirectory() as work:
        for rep in range(a.ppo_repeats):
            for fw in ("ours", "trl") if rep % 2 == 0 else ("trl", "ours"):
                spec = dict(framework=fw, stage="ppo", sft=os.path.abspath(a.sft), rm=os.path.abspath(a.rm),
                            data=os.path.abspath(a.prompts), work=work, iterations=a.ppo_iterations, rollouts=R,
                            minibatches=a.ppo_minibatches, epochs=a.ppo_epochs, forward_batch=a.ppo_forward_batch,
                            max_new_tokens=a.ppo_max_new_tokens, max_prompt_length=a.ppo_max_prompt_length,
                            temperature=a.ppo_temperature, kl_coef=a.ppo_kl_coef, lr=a.ppo_lr, critic=a.ppo_critic,
                            lora_r=a.lora_r, lora_alpha=a.lora_alpha, seed=rep, threads=a.threads)
                info = run(spec, a.threads, sys.executable if fw == "ours" else python)
                info["gold"] = [sentiment([""] * len(r["texts"]), r["texts"]) for r in info["rollouts"]]
                runs[fw].append(info)
                loads.append(os.getloadavg())
                gold = [statistics.mean(info["gold"][i]) for i in (0, -1)]
                print(f"  repeat {rep + 1} ppo  {fw:<4}: median iteration {statistics.median(info['times'][1:]):.2f} s "
                      f"(first {info['times'][0]:.2f} s), peak RSS {info['peak_rss']:.0f} MiB, "
                      f"gold {gold[0]:+.3f} -> {gold[1]:+.3f}, "
                      f"load {info['load'][0]:.2f}->{info['load'][1]:.2f}, {info['wall']:.0f} s wall", flush=True)
    for o, t in zip(runs["ours"], runs["trl"]):  # the same seed: the same prompts, iteration by iteration
        assert [r["prompts"] for r in o["rollouts"]] == [r["prompts"] for r in t["rollouts"]], "prompt order differs"

    def summary(rs):
        return dict(time=statistics.median(x for r in rs for x in r["times"][1:]),
                    sampling=statistics.median(x for r in rs for x in r["sampling"][1:]),
                    spread=(min(statistics.median(r["times"][1:]) for r in rs),
                            max(statistics.median(r["times"][1:]) for r in rs)),
                    peak=statistics.median(r["peak_rss"] for r in rs), trainable=rs[0]["trainable"],
                    tokens=statistics.mean(x["tokens"] for r in rs for x in r["rollouts"]),
                    first=gold_stats(rs, 0), last=gold_stats(rs, -1),
                    curve=[statistics.mean(g for r in rs for g in r["gold"][i]) for i in range(a.ppo_iterations)])
    o, t = summary(runs["ours"]), summary(runs["trl"])
    rt, rm = o["time"] / t["time"], o["peak"] / t["peak"]
    speedup, mem = GOALS["ppo"]
    diff, se = o["last"][0] - t["last"][0], (o["last"][1] ** 2 + t["last"][1] ** 2) ** 0.5
    ok_speed, ok_mem, ok_gold = rt <= 1 / speedup, rm <= mem, diff >= -2 * se
    w = 14
    print(f"\n== PPO  (ours: train_ppo.py vs trl {TRL_PPO} trl.experimental.ppo.PPOTrainer)")
    print(f"  {'':<44}{'ours':>{w}}{'TRL':>{w}}{'ours/TRL':>{w}}")
    print(f"  {'seconds per iteration, median after the 1st':<44}{o['time']:>{w}.2f}{t['time']:>{w}.2f}{rt:>{w}.2f}"
          f"   -> ours {1 / rt:.2f}x {'faster' if rt < 1 else 'slower'}")
    spread = lambda x: f"{x['spread'][0]:.2f}-{x['spread'][1]:.2f}"  # noqa: E731
    print(f"  {'  per-repeat medians, min-max (s)':<44}{spread(o):>{w}}{spread(t):>{w}}")
    print(f"  {'  of which sampling (generate), median (s)':<44}{o['sampling']:>{w}.2f}{t['sampling']:>{w}.2f}"
          f"{o['sampling'] / t['sampling']:>{w}.2f}")
    print(f"  {'peak RSS (MiB)':<44}{o['peak']:>{w}.0f}{t['peak']:>{w}.0f}{rm:>{w}.2f}")
    print(f"  {'trainable params':<44}{o['trainable']:>{w},}{t['trainable']:>{w},}")
    print(f"  {'response tokens per iteration (mean)':<44}{o['tokens']:>{w}.0f}{t['tokens']:>{w}.0f}")
    gold = lambda g: f"{g[0]:+.3f}±{g[1]:.3f}"  # noqa: E731
    for name, key in (("gold reward, iteration 1 (mean ± SE)", "first"),
                      (f"gold reward, iteration {a.ppo_iterations} (mean ± SE)", "last")):
        ratio = o[key][0] / t[key][0] if t[key][0] else float("nan")
        print(f"  {name:<44}{gold(o[key]):>{w}}{gold(t[key]):>{w}}{ratio:>{w}.2f}")
    print(f"  {'  ours - TRL at the last ± SE':<44}{f'{diff:+.3f}±{se:.3f}':>{w}}   -> "
          f"{'higher' if diff > 0 else 'lower'}; {'within 2 SE or higher' if ok_gold else 'more than 2 SE lower'}")
    for name, curve in (("ours", o["curve"]), ("TRL", t["curve"])):
        print(f"  gold curve {name:<4} {' '.join(f'{x:+.3f}' for x in curve)}")
    ok = ok_speed and ok_mem and ok_gold
    print(f"  target (>= {speedup:g}x faster per iteration, <= {mem:g}x peak memory, gold at the last iteration within "
          f"2 SE of TRL's or higher): {'met' if ok else 'NOT met'} (speed {'ok' if ok_speed else 'no'}, memory "
          f"{'ok' if ok_mem else 'no'}, gold {'ok' if ok_gold else 'no'})")
    ones = [l[0] for l in loads]
    print(f"load average (1 min) over the ppo runs: min {min(ones):.2f}, median {statistics.median(ones):.2f}, "
          f"max {max(ones):.2f} on {os.cpu_count()} CPUs")
    return ok


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
    p.add_argument("--stages", default=",".join(DEFAULT_STAGES),
                   help=f"comma-separated subset of {','.join(STAGES)} (ppo only when named)")
    g = p.add_argument_group("grpo", "the GRPO stage (--steps, --batch-size and --seq-len are for sft, rm, dpo)")
    g.add_argument("--grpo-steps", type=int, default=16,
                   help="optimizer steps per GRPO run: the first --warmup untimed, all of them in the reward curve")
    g.add_argument("--grpo-prompts", type=int, default=4, help="prompts per step (ours: --rollout-batch-size)")
    g.add_argument("--num-generations", type=int, default=4, help="k, completions per prompt")
    g.add_argument("--grpo-micro-batch", type=int, default=8,
                   help="completions per forward (ours: --batch-size; TRL: per_device_train_batch_size)")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--grpo-temperature", type=float, default=0.1,
                   help="sampling temperature (low: the random model's favourite token is then frequent)")
    g.add_argument("--grpo-lr", type=float, default=3e-5, help="peak learning rate, cosine decay, no warmup")
    g.add_argument("--grpo-last", type=int, default=4, help="the reward compared: mean of the last N steps")
    g = p.add_argument_group("ppo", f"the PPO stage, against trl {TRL_PPO}'s PPOTrainer (defaults: the demo's PPO; "
                             "--lora-r, --lora-alpha and --threads apply too)")
    g.add_argument("--sft", default="out/demo/sft", help="the SFT model both sides start from (the demo's)")
    g.add_argument("--rm", default="out/demo/rm", help="the reward model (train_rm.py --out; the demo's)")
    g.add_argument("--prompts", default="out/demo/data/prompts.jsonl", help="the prompts (the demo's)")
    g.add_argument("--trl-venv", default=os.path.join(ROOT, ".cache", f"trl-{TRL_PPO}"),
                   help=f"a virtual environment with trl=={TRL_PPO}; built there when the folder does not exist")
    g.add_argument("--ppo-iterations", type=int, default=15)
    g.add_argument("--ppo-rollouts", type=int, default=32, help="prompts (one response each) per iteration")
    g.add_argument("--ppo-minibatches", type=int, default=4,
                   help="minibatches per epoch, one forward and one optimizer step each (TRL: num_mini_batches)")
    g.add_argument("--ppo-epochs", type=int, default=1, help="passes over each iteration's rollouts")
    g.add_argument("--ppo-forward-batch", type=int, default=32,
                   help="rows per scoring forward (TRL's local_rollout_forward_batch_size, which it samples in "
                        "too; ours' --score-batch-size: it samples the whole rollout in one batch)")
    g.add_argument("--ppo-max-new-tokens", type=int, default=48)
    g.add_argument("--ppo-max-prompt-length", type=int, default=256, help="longer prompts are left out on both sides")
    g.add_argument("--ppo-temperature", type=float, default=0.7)
    g.add_argument("--ppo-kl-coef", type=float, default=0.05)
    g.add_argument("--ppo-lr", type=float, default=1e-3, help="peak learning rate, cosine decay to 0, no warmup")
    g.add_argument("--ppo-critic", default="adapter", choices=["adapter", "head"],
                   help="ours' critic. adapter: a LoRA adapter on a second base started from the RM "
                        "(--critic-from-rm), as TRL's value model; head: a value head on the reference pass's "
                        "features (--critic head, the demo's), which TRL has no counterpart of")
    g.add_argument("--ppo-repeats", type=int, default=1, help="runs per side, interleaved (seed = repeat)")
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
    n_completions = a.grpo_prompts * a.num_generations
    if "grpo" in stages and (a.grpo_steps <= a.warmup or not 1 <= a.grpo_last <= a.grpo_steps
                             or n_completions % a.grpo_micro_batch or a.num_generations < 2):
        p.error("grpo: need --grpo-steps > --warmup, 1 <= --grpo-last <= --grpo-steps, --num-generations >= 2 and "
                "--grpo-prompts x --num-generations a multiple of --grpo-micro-batch")
    env_failed = False
    if "ppo" in stages:
        if a.ppo_rollouts % a.ppo_minibatches or a.ppo_iterations < 2:
            p.error("ppo: need --ppo-rollouts a multiple of --ppo-minibatches and --ppo-iterations >= 2")
        missing = [f"{flag} {path}" for flag, path in (("--sft", a.sft), ("--rm", a.rm), ("--prompts", a.prompts))
                   if not os.path.exists(path)]
        if missing:
            p.error(f"ppo: not found: {', '.join(missing)} (python -m nanorlhf.demo --out out/demo makes them)")
        try:
            trl_python = trl_env(os.path.abspath(a.trl_venv))
        except EnvError as e:  # the other stages still run; the exit status says this one did not
            print(f"bench_trl.py: ppo skipped: {e}", file=sys.stderr, flush=True)
            stages.remove("ppo")
            env_failed = True
    ok_all = bool(stages)
    if set(stages) - {"ppo"}:
        ok_all &= trainer_stages(a, [s for s in stages if s != "ppo"])
    if "ppo" in stages:
        ok_all &= ppo_stage(a, trl_python)
    if stages:
        print(f"all targets met: {'yes' if ok_all else 'no'}")
    sys.exit(1 if env_failed else 0)


def trainer_stages(a, stages):
    """sft, rm, dpo and grpo: --repeats interleaved runs of each side, then a table per stage; True when every
    target is met."""
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
        data = {}
        if set(stages) - {"grpo"}:
            n_rows = a.batch_size * (a.warmup + a.steps)  # one epoch: no epoch boundary inside the timed steps
            data = write_data(work, tok, n_rows, a.seq_len)
        if "grpo" in stages:
            data["prompts"] = write_prompts(work, a.grpo_prompts * a.grpo_steps)  # one epoch
            word, p_word = frequent_token(model, tok, data["prompts"], a.grpo_temperature)
            write_reward(work, word)
        del model

        print(f"model: random Llama, vocab {len(tok)} (SmolLM2 tokenizer), hidden {cfg.hidden_size}, "
              f"intermediate {cfg.intermediate_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads "
              f"({cfg.num_key_value_heads} kv), tied embeddings, {n_params / 1e6:.1f}M params, fp32")
        lora = f"LoRA r={a.lora_r} alpha={a.lora_alpha:g} on {','.join(t[:-5] for t in TARGETS)}"
        if set(stages) - {"grpo"}:
            print(f"run: batch {a.batch_size} ({'pairs for rm/dpo' if set(stages) & {'rm', 'dpo'} else 'examples'}), "
                  f"seq len {a.seq_len} (every sequence; no padding), {lora}, AdamW, clip 1.0, no grad checkpointing, "
                  f"{a.threads} thread(s); {a.warmup} warmup + {a.steps} timed steps x {a.repeats} repeats per "
                  f"(framework, stage)")
        if "grpo" in stages:
            n_completions = a.grpo_prompts * a.num_generations
            print(f"grpo: {a.grpo_prompts} prompts x k={a.num_generations} = {n_completions} completions per optimizer "
                  f"step (one generation, forward micro-batch {a.grpo_micro_batch}), max {a.max_new_tokens} new tokens, "
                  f"temperature {a.grpo_temperature:g}, top_p 1, top_k off, beta 0, loss grpo, scale_rewards group, lr "
                  f"{a.grpo_lr:g} cosine; {lora}, AdamW, clip 1.0, {a.threads} thread(s); {a.warmup} warmup + "
                  f"{a.grpo_steps - a.warmup} timed steps x {a.repeats} repeats (seed = repeat)")
            print(f"grpo reward: count of {word!r} in the response (the initial model's favourite token: "
                  f"p = {p_word:.1%} per token at temperature {a.grpo_temperature:g}, "
                  f"~{p_word * a.max_new_tokens:.1f} per response)")
        print(f"versions: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
              f"peft {peft.__version__}, python {sys.version.split()[0]}; {os.cpu_count()} CPUs")
        print(f"load average at start: {' '.join(f'{x:.2f}' for x in loads[0])}", flush=True)

        for rep in range(a.repeats):
            for i, stage in enumerate(stages):
                order = ("ours", "trl") if (rep + i) % 2 == 0 else ("trl", "ours")
                for fw in order:
                    spec = dict(framework=fw, stage=stage, model=model_dir,
                                data=data[dict(sft="sft", grpo="prompts").get(stage, "pairs")], work=work,
                                steps=a.steps, warmup=a.warmup, batch_size=a.batch_size, seq_len=a.seq_len,
                                lora_r=a.lora_r, lora_alpha=a.lora_alpha, threads=a.threads)
                    if stage == "grpo":  # a fresh seed per repeat, the same on both sides: the reward curve varies
                        spec |= dict(steps=a.grpo_steps - a.warmup, batch_size=a.grpo_micro_batch, seed=rep,
                                     grpo_prompts=a.grpo_prompts, num_generations=a.num_generations,
                                     max_new_tokens=a.max_new_tokens, temperature=a.grpo_temperature, lr=a.grpo_lr)
                    info = run(spec, a.threads)
                    results[(fw, stage)].append(info)
                    loads.append(os.getloadavg())
                    timed = info["times"][a.warmup:]
                    reward = (f"reward {info['rewards'][0]:.2f} -> {statistics.mean(info['rewards'][-a.grpo_last:]):.2f} "
                              f"(last {a.grpo_last}), " if stage == "grpo" else "")
                    print(f"  repeat {rep + 1} {stage:<4} {fw:<4}: median step {statistics.median(timed):.3f} s "
                          f"(min {min(timed):.3f}, max {max(timed):.3f}; warmup {', '.join(f'{t:.2f}' for t in info['times'][:a.warmup])} s), "
                          f"peak RSS {info['peak_rss']:.0f} MiB (Δ {info['peak_rss'] - info['baseline_rss']:.0f}), {reward}"
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
        speedup, mem = GOALS[stage]
        ok_speed, ok_mem = rt <= 1 / speedup, rm <= mem
        print(f"== {stage.upper()}  (ours: train_{stage}.py vs trl.{TRL_CLASS[stage]})")
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
        tokens = {"grpo": "completion tokens per step (mean)", "rm": "tokens per step (ours: prompt once)"}.get(
            stage, "tokens per step (no padding)")
        print(f"  {tokens:<36}{o['tokens']:>{w},}{t['tokens']:>{w},}")
        print(f"  {'attention / threads in the step':<36}{o['attn'] + ' / ' + str(o['threads']):>{w}}"
              f"{t['attn'] + ' / ' + str(t['threads']):>{w}}")
        goal = f">= {speedup:g}x faster, <= {mem:g}x memory Δ"
        verdict = f"speed {'ok' if ok_speed else 'no'}, memory {'ok' if ok_mem else 'no'}"
        ok = ok_speed and ok_mem
        if stage == "grpo":
            ok_reward = print_rewards(ours, theirs, a.grpo_last, w)
            goal += ", reward within 2 SE of TRL's or better"
            verdict += f", reward {'ok' if ok_reward else 'no'}"
            ok = ok and ok_reward
        ok_all &= ok
        print(f"  target ({goal}): {'met' if ok else 'NOT met'} ({verdict})")
    ones = [l[0] for l in loads]
    print(f"\nload average (1 min) over the run: min {min(ones):.2f}, median {statistics.median(ones):.2f}, "
          f"max {max(ones):.2f} on {os.cpu_count()} CPUs; timings are medians of interleaved runs")
    return ok_all


if __name__ == "__main__":
    main()
