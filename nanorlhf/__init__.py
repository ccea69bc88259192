"""nanorlhf: the package every train_*.py script imports, and the command-line tools around it.

The core, in reading order (what the scripts import):
    loop.py        the plumbing flags (RunArgs), data stream, guarded optimizer step, NaN guard, checkpoints, resume;
                   each script builds its own optimizer and schedule (adamw, cosine_with_warmup here)
    log.py         where the numbers go (loop.log): progress bar, metrics.jsonl, --report-to, samples
    model.py       loading (HF folder, GGUF, 4/8-bit; load_policy: base + LoRA), hidden states -> logprobs, reward
                   scores, generation, saving
    kernels.py     the fused logprob/entropy kernel: never builds the (tokens, vocab) logits
    lora.py        LoRA layers with named adapters, merge, PEFT-format save and load
    data.py        examples -> chat template, truncation, batching; load_data: train and held-out rows
    formats.py     reading .json/.jsonl/hub data and the eight record formats (alpaca ... ranked, prompt)
    preference.py  summed response logprobs and the one reference mechanism (DPO, KTO, evaluation)
    rollout.py     RL on samples: sampling, response logprobs, GAE, whitening, KL penalty and controller
    rewards.py     the reward composite: reward models and Python reward functions
    dist.py        torchrun: shards, all-reduced gradients and statistics, rank 0 writes
    cli.py         argparse from a dataclass, one-line errors

The tools (python -m nanorlhf.<tool>): demo, label, evaluate, abtest (a blind A/B test for people), plot, memory;
and two reward functions, gold (VADER sentiment) and arithmetic (exact match on generated word problems).
"""
