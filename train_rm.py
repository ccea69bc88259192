"""Reward model: learn a scalar score that ranks the chosen reply above the rejected one (RLHF stage 2).

The model is the SFT model with a one-output linear `score` head in place of the lm_head, read at the
last real token of prompt + reply: the EOS every reply ends with, the same position PPO adds the score
at (docs/ppo-details.md §1). A pair's prompt is computed once for both replies, which continue from its KV
cache (prefix sharing, Wang et al. 2024; nanorlhf/prefix.py). The loss is Bradley-Terry,
-log σ(r_chosen - r_rejected) (Stiennon et al. 2020; Ouyang et al. 2022 eq. 1), with an optional per-pair
margin from the data (Touvron et al. 2023 §3.2.2), or a hinge (`--loss margin-ranking`). At the end, the
mean and std of the model's scores are stored in config.json as `reward_mean` / `reward_std`, so PPO can
centre rewards on a known scale (docs/ppo-details.md §8).

    python train_rm.py --model out/sft --data data/hh_harmless.jsonl --out out/rm
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from nanorlhf import dist, prefix
from nanorlhf import model as M
from nanorlhf.cli import UserError, arg, main
from nanorlhf.data import PairRow, load_data, load_examples, tokenize
from nanorlhf.loop import Loop, RunArgs, adamw, check_out, cosine_with_warmup, total_steps
from nanorlhf.model import load_policy, trainable


@dataclass
class Args(RunArgs):
    model: str = arg(M.DEFAULT_MODEL, "The SFT model to put a score head on (train_sft.py --out), or a reward "
                     "model to train further.")
    max_steps: int | None = arg(None, "Optimizer steps to run; default: --epochs over the pairs.", gt=0)
    epochs: float = arg(1.0, "Passes over the training pairs when --max-steps is not given.", gt=0)
    batch_size: int = arg(4, "Pairs per micro-batch (per process under torchrun): their prompts in one forward, then "
                          "both replies of each in another.", gt=0)
    grad_accum: int = arg(4, "Micro-batches per optimizer step: batch_size * grad_accum pairs a step.", gt=0)
    lr: float = arg(2e-4, "Peak learning rate (cosine decay after warmup). Full fine-tuning wants ~1e-5.", gt=0)
    warmup: float = arg(0.03, "Warmup: a fraction of the steps if < 1, else a number of steps.", ge=0)
    weight_decay: float = arg(0.0, "AdamW weight decay.", ge=0)
    max_grad_norm: float = arg(1.0, "Clip the gradient norm to this (0 = no clipping).", ge=0)
    lora_dropout: float = arg(0.0, "Dropout on the LoRA input (the base model's dropout is always off).", ge=0)
    max_length: int = arg(512, "Max tokens per prompt + reply (the longer reply counts); prompts are cut from the "
                          "left, replies from the right.", gt=0)
    eval_data: str | None = arg(None, "Held-out pairs file; default: hold out --eval-frac of --data.")
    eval_frac: float = arg(0.05, "Fraction of the pairs held out for evaluation when --eval-data is not given.", ge=0)
    eval_every: int = arg(0, "Evaluate loss and pairwise accuracy every N steps (0 = only before and after "
                          "training).", ge=0)
    loss: str = arg("sigmoid", "sigmoid: -log σ(r_c - r_r - margin), margin = the pair's `margin` field or 0 "
                    "(Bradley-Terry). margin-ranking: max(0, m - (r_c - r_r)) with m = --ranking-margin + the "
                    "pair's margin; a pair stops pulling once its score gap reaches m.",
                    choices=["sigmoid", "margin-ranking"])
    ranking_margin: float = arg(1.0, "m of --loss margin-ranking: the score gap a pair must reach.", ge=0)
    norm_data: str | None = arg(None, "Data whose completions set reward_mean/reward_std, e.g. the SFT data "
                                "(closest to what PPO's policy writes; pairs give both replies). Default: the "
                                "training pairs' chosen and rejected replies.")
    norm_samples: int = arg(256, "Completions scored for reward_mean/reward_std: a seeded sample (0 = all). "
                            "lm-human-preferences uses 256.", ge=0)


def score_head(model):
    """The (hidden -> 1) linear transformers' *ForSequenceClassification classes call `score`."""
    head = getattr(model, "score", None)
    if not isinstance(head, nn.Linear) or head.out_features != 1:
        raise UserError(f"{type(model).__name__} has no one-output linear `score` head; train_rm supports decoder "
                        "LMs whose sequence-classification class has one (Llama, Qwen, Mistral, Gemma, GPT-2, ...)")
    return head


def init_head(head):
    """Weights N(0, 1/√(d_model + 1)), bias 0 (Stiennon et al. 2020's code; docs/ppo-details.md §7):
    with unit-scale hidden states the first scores have variance ≈ 1."""
    nn.init.normal_(head.weight, std=1 / math.sqrt(head.in_features + 1))
    if head.bias is not None:
        nn.init.zeros_(head.bias)


def is_reward_model(config):
    """True when --model was saved as a sequence classifier, so its head is trained, not drawn at random."""
    return any(a.endswith("ForSequenceClassification") for a in config.architectures or [])


def reward_loss(chosen_rewards, rejected_rewards, margin=None, loss_type="sigmoid", ranking_margin=1.0):
    """Per-pair losses (B,) from the scores (B,) of the chosen and rejected replies.

    sigmoid:        -log σ(r_c - r_r - margin). The margin (B,) asks for a bigger gap on pairs the data
                    rates as clearly different (Llama 2, Touvron et al. 2023 §3.2.2); None means 0.
    margin-ranking: max(0, ranking_margin + margin - (r_c - r_r)), torch's MarginRankingLoss: pairs
                    already separated by that much give no gradient.
    """
    diff = chosen_rewards - rejected_rewards
    margin = torch.zeros_like(diff) if margin is None else margin
    if loss_type == "sigmoid":
        return -F.logsigmoid(diff - margin)
    if loss_type == "margin-ranking":
        return F.relu(ranking_margin + margin - diff)
    raise ValueError(f"unknown loss_type {loss_type!r}; use 'sigmoid' or 'margin-ranking'")


def pair_rewards(model, rows, pad_id, device):
    """(chosen (B,), rejected (B,), margin (B,), tokens) for pair rows, each pair's prompt computed once for both
    replies (prefix sharing, nanorlhf/prefix.py)."""
    chosen, rejected, tokens = prefix.pair_scores(model, rows, pad_id, device)
    margin = torch.tensor([r.margin or 0.0 for r in rows], device=device)
    return chosen, rejected, margin, tokens


@torch.no_grad()
def evaluate(model, rows, pad_id, batch_size, device, loss_type="sigmoid", ranking_margin=1.0):
    """Mean loss and pairwise accuracy (the share of pairs with r_c > r_r) over `rows`: this rank's share of the
    held-out pairs, totals summed over ranks."""
    n = dist.all_sum(len(rows))
    # similar lengths: less padding
    rows = sorted(rows, key=lambda r: len(r.prompt) + max(len(r.chosen), len(r.rejected)))
    total, correct = 0.0, 0
    for i in range(0, len(rows), batch_size):
        chosen, rejected, margin, _ = pair_rewards(model, rows[i:i + batch_size], pad_id, device)
        total += reward_loss(chosen, rejected, margin, loss_type, ranking_margin).sum().item()
        correct += (chosen > rejected).sum().item()
    return {"eval_loss": dist.all_sum(total) / n, "eval_accuracy": dist.all_sum(correct) / n}


def norm_sequences(args, tokenizer, train_rows):
    """(prompt_ids, completion_ids) rows for the reward statistics: the completions of --norm-data (both
    replies of pair data), else of the training pairs; a seeded sample of --norm-samples of them."""
    rows = train_rows
    if args.norm_data:
        try:
            examples = load_examples(args.norm_data, "pairs")
        except UserError:  # not pair data: score its SFT completions (a real error is raised again below)
            examples = load_examples(args.norm_data, "sft")
        rows = tokenize(examples, tokenizer, args.max_length, args.norm_data)[0]
    if rows and isinstance(rows[0], PairRow):
        seqs = [(r.prompt, r.chosen) for r in rows] + [(r.prompt, r.rejected) for r in rows]
    else:
        seqs = [(r.prompt, r.completion) for r in rows]
    if args.norm_samples and len(seqs) > args.norm_samples:
        pick = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(args.seed))[:args.norm_samples]
        seqs = [seqs[i] for i in sorted(pick.tolist())]
    if len(seqs) < 2:
        raise UserError(f"{args.norm_data or args.data}: reward statistics need at least 2 completions")
    return seqs


def reward_stats(model, seqs, pad_id, batch_size):
    """Mean and (unbiased) std of the raw scores of (prompt_ids, completion_ids) rows."""
    seqs = sorted(seqs, key=lambda s: len(s[0]) + len(s[1]))  # similar lengths together: ~1/3 less padding on hh
    scores = M.score_sequences(model, [list(p) + list(c) for p, c in seqs], pad_id, batch_size, normalise=False)
    return scores.mean().item(), scores.std().item()


def train(args):
    check_out(args)
    torch.manual_seed(args.seed)
    # 1. The SFT model with a scalar head. A causal LM's folder has no head, so transformers drew one at
    #    random: redraw it at unit scale (docs/ppo-details.md §7). An existing reward model keeps its own.
    model, tokenizer = load_policy(args, kind="reward")
    head = score_head(model)
    if is_reward_model(model.config):
        print(f"score head: kept the trained one of {args.model}")
    else:
        init_head(head)
    # LoRA froze the head with the base; it is trained whole, in fp32 like the adapters (the optimizer updates it).
    head.float().requires_grad_(True)
    device, pad_id = next(model.parameters()).device, tokenizer.pad_token_id
    train_rows, eval_rows = load_data(args, "pairs", tokenizer)  # ranked lists arrive as all their pairs
    evaluating = dist.all_sum(len(eval_rows)) > 0  # decided from every rank's rows: all or none evaluate
    # The score head is trainable: the optimizer updates it and the Loop checkpoints it, with the adapter.
    steps = total_steps(args.max_steps, args.epochs, len(train_rows), args.batch_size * args.grad_accum)
    optimizer = adamw(trainable(model), args.optim, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = LambdaLR(optimizer, cosine_with_warmup(steps, args.warmup))
    loop = Loop(args, {"model": model}, optimizer, scheduler, len(train_rows), steps, args.max_grad_norm)
    eval_kw = dict(batch_size=args.batch_size, device=device, loss_type=args.loss, ranking_margin=args.ranking_margin)
    if evaluating and not args.resume:
        loop.log.metrics({"step": 0, **evaluate(model, eval_rows, pad_id, **eval_kw)})

    # 2. Train: each micro-batch scores its chosen and rejected replies, each prompt computed once.
    for step in loop:
        chosen, rejected, metrics = [], [], {"loss": 0.0, "tokens": 0}
        for idx in loop.batches(args.batch_size, args.grad_accum):
            c, r, margin, tokens = pair_rewards(model, [train_rows[i] for i in idx], pad_id, device)
            # Micro-batches are equal-sized, so the mean over each / (grad_accum × ranks) is the mean over the step.
            loss = reward_loss(c, r, margin, args.loss, args.ranking_margin).mean() / (args.grad_accum * dist.world())
            loss.backward()
            metrics["loss"] += loss.item()
            metrics["tokens"] += tokens
            chosen.append(c.detach())
            rejected.append(r.detach())
        c, r = torch.cat(chosen), torch.cat(rejected)
        metrics["loss"] = dist.all_sum(metrics["loss"])
        metrics |= {"accuracy": (c > r).float().mean(), "rewards/chosen": c.mean(), "rewards/rejected": r.mean(),
                    "rewards/margin": (c - r).mean()}
        metrics |= loop.optimizer_step()
        if evaluating and args.eval_every and step % args.eval_every == 0:
            metrics |= evaluate(model, eval_rows, pad_id, **eval_kw)
        loop.end_step(metrics)
    if loop.interrupted:  # a signal: the checkpoint holds the run; --resume continues it
        return

    if evaluating:
        final = evaluate(model, eval_rows, pad_id, **eval_kw)
        loop.log.final(loop.step, final)
    # 3. Reward-normalisation statistics travel with the model in config.json (docs/ppo-details.md §8).
    seqs = norm_sequences(args, tokenizer, train_rows)
    mean, std = reward_stats(model, seqs, pad_id, 2 * args.batch_size)
    model.config.reward_mean, model.config.reward_std = mean, std
    loop.log.metrics({"step": loop.step, "reward_mean": mean, "reward_std": std, "norm_samples": float(len(seqs))})
    M.save_model(model, tokenizer, args.out)
    print(f"its config.json holds reward_mean {mean:.4g} and reward_std {std:.4g} over {len(seqs)} completions")


if __name__ == "__main__":
    main(train, Args)
