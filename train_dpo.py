"""Direct Preference Optimization: learn from preference pairs with no reward model and no sampling.

The RLHF objective max E[r] - β·KL(π || π_ref) is maximised by π ∝ π_ref·exp(r / β), so the reward
is r = β·log(π / π_ref) up to a per-prompt constant; putting that into the Bradley-Terry likelihood
of the human preferences gives a loss on the policy alone (Rafailov et al. 2023, eq. 7):

    h    = [log π(y_c|x) - log π_ref(y_c|x)] - [log π(y_r|x) - log π_ref(y_r|x)]
    loss = -log σ(β·h)

on summed response logprobs. β·(log π - log π_ref) is the implicit reward: its accuracy (chosen >
rejected) and margin on held-out pairs show whether the preference is learnt. The reference is the
starting model: with LoRA that same model with its adapters disabled, for full fine-tuning a
frozen copy, and with --precompute-ref neither (its logprobs are computed once, before training).

    python train_dpo.py --model out/sft --data data/dpo_en_demo.json --out out/dpo
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR

from nanorlhf import dist
from nanorlhf import model as M
from nanorlhf.cli import UserError, arg, main
from nanorlhf.data import load_data
from nanorlhf.loop import Loop, adamw, check_out, cosine_with_warmup, total_steps
from nanorlhf.model import load_policy, trainable
from nanorlhf.preference import PreferenceArgs, Reference, summed_logprobs


@dataclass
class Args(PreferenceArgs):
    model: str = arg(M.DEFAULT_MODEL, "The SFT model to start from (train_sft.py --out); it is the reference too.")
    beta: float = arg(0.1, "β: the strength of the KL pull toward the reference; the implicit reward is "
                      "β·(log π - log π_ref). Lower lets the policy move further.", gt=0)
    loss: str = arg("sigmoid", "sigmoid: DPO (Rafailov et al. 2023); ipo: (h - 1/(2β))², which stops at a finite "
                    "margin (Azar et al. 2023), on each completion's mean token logprob (TRL's form, confirmed by "
                    "the IPO authors), so β means what it means elsewhere; hinge: relu(1 - β·h) (SLiC, Zhao et al. "
                    "2023); robust: unbiased under a label-flip rate --label-smoothing (Chowdhury et al. 2024).",
                    choices=["sigmoid", "ipo", "hinge", "robust"])
    label_smoothing: float = arg(0.0, "ε, the assumed fraction of flipped preference labels (0 <= ε < 0.5): "
                                 "conservative DPO for --loss sigmoid, or --loss robust.", ge=0)
    max_steps: int | None = arg(None, "Optimizer steps to run; default: --epochs over the preference pairs.", gt=0)
    epochs: float = arg(1.0, "Passes over the training preference pairs when --max-steps is not given.", gt=0)
    batch_size: int = arg(4, "Pairs per micro-batch (per process under torchrun); chosen and rejected go through "
                          "one forward.", gt=0)
    grad_accum: int = arg(4, "Micro-batches per optimizer step: batch_size * grad_accum preference pairs a step.", gt=0)
    lr: float = arg(5e-5, "Peak learning rate (cosine decay after warmup). LoRA: 5e-6 to 5e-5; full fine-tuning "
                    "wants ~5e-7 (Zephyr).", gt=0)
    warmup: float = arg(0.03, "Warmup: a fraction of the steps if < 1, else a number of steps.", ge=0)
    weight_decay: float = arg(0.0, "AdamW weight decay.", ge=0)
    max_grad_norm: float = arg(1.0, "Clip the gradient norm to this (0 = no clipping).", ge=0)
    lora_dropout: float = arg(0.0, "Dropout on the LoRA input (the base model's dropout is always off).", ge=0)
    max_length: int = arg(512, "Max tokens per prompt + reply, the longer of chosen and rejected; both are cut alike "
                          "from the right, the prompt from the left.", gt=0)
    eval_data: str | None = arg(None, "Held-out preference pairs file; default: hold out --eval-frac of --data.")
    eval_frac: float = arg(0.05, "Fraction of the preference pairs held out for evaluation when --eval-data is not "
                           "given.", ge=0)
    eval_every: int = arg(0, "Evaluate loss, implicit rewards and accuracy every N steps (0 = only before and "
                          "after training).", ge=0)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta, loss_type="sigmoid", label_smoothing=0.0):
    """Per-pair losses (B,) and the implicit rewards β·(log π - log π_ref) of chosen and rejected (B,), detached.

    All inputs (B,): summed response logprobs. h is the chosen log-ratio minus the rejected one.
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps        # (B,)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,)
    h = chosen_logratios - rejected_logratios                             # (B,)
    eps = label_smoothing
    if loss_type == "sigmoid":  # eq. 7; with ε > 0 conservative DPO: each label is right with probability 1 - ε
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":  # rDPO: its expectation over flipped labels is the clean-label loss (Chowdhury et al.)
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "ipo":  # regress h to 1/(2β); DPO drives h to infinity on certain preferences (Azar et al.)
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":  # SLiC's calibration loss: no gradient once the margin β·h reaches 1
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def pair_seqs(rows):
    """(prompt, completion) rows for one concatenated forward: every chosen row, then every rejected row."""
    return [(r.prompt, r.chosen) for r in rows] + [(r.prompt, r.rejected) for r in rows]


def dpo_step(model, reference, rows, args, pad_id):
    """Per-pair losses (B,) of pair rows, and the sum over them of every logged metric."""
    seqs = pair_seqs(rows)
    logprobs = summed_logprobs(model, seqs, pad_id).view(2, -1)  # (2, B): chosen and rejected in one forward
    ref_logprobs = reference(seqs).view(2, -1)                   # (2, B)
    if args.loss == "ipo":  # IPO compares mean token logprobs: Σ_t log π / |y|, for the policy and the reference
        lengths = torch.tensor([len(c) for _, c in seqs], device=logprobs.device).view(2, -1)  # (2, B)
        logprobs, ref_logprobs = logprobs / lengths, ref_logprobs / lengths
    losses, chosen_rewards, rejected_rewards = dpo_loss(logprobs[0], logprobs[1], ref_logprobs[0], ref_logprobs[1],
                                                        args.beta, args.loss, args.label_smoothing)
    sums = {"loss": losses.detach().sum(), "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(), "rewards/accuracy": (chosen_rewards > rejected_rewards).sum(),
            "rewards/margin": (chosen_rewards - rejected_rewards).sum(),
            "logps/chosen": logprobs[0].detach().sum(), "logps/rejected": logprobs[1].detach().sum()}
    return losses, {k: v.item() for k, v in sums.items()}


def batched_pairs(rows, batch_size):
    """pair_seqs of every batch of rows, one after another: the rows of each forward, in order."""
    return [s for i in range(0, len(rows), batch_size) for s in pair_seqs(rows[i:i + batch_size])]


@torch.no_grad()
def evaluate(model, reference, rows, args, pad_id):
    """Mean loss, implicit rewards, accuracy, margin and logprobs over held-out pairs, eval_-prefixed."""
    totals = {}
    for i in range(0, len(rows), args.batch_size):
        _, sums = dpo_step(model, reference, rows[i:i + args.batch_size], args, pad_id)
        totals = {k: totals.get(k, 0.0) + v for k, v in sums.items()}
    n = dist.all_sum(len(rows))  # under torchrun `rows` is this rank's share of the held-out pairs, maybe none
    return {f"eval_{k}": v / n for k, v in dist.sum_dicts(totals).items()}


def train(args):
    if args.label_smoothing >= 0.5:  # at 0.5 the labels carry no information (and robust divides by 0)
        raise UserError(f"--label-smoothing must be < 0.5, got {args.label_smoothing}")
    if args.label_smoothing and args.loss in ("ipo", "hinge"):
        raise UserError(f"--label-smoothing applies to --loss sigmoid or robust, not {args.loss}")
    check_out(args)
    torch.manual_seed(args.seed)
    model, tokenizer = load_policy(args)
    pad_id = tokenizer.pad_token_id
    train_rows, eval_rows = load_data(args, "pairs", tokenizer)
    evaluating = dist.all_sum(len(eval_rows)) > 0  # decided from every rank's rows: all or none evaluate
    # The reference is the model as loaded, before any update and before Loop loads a checkpoint. The held-out
    # pairs are scored once, in the batches evaluate() uses: same batches, same bits, so at step 0 policy and
    # reference tie exactly instead of by rounding (which would make accuracy a coin flip).
    reference = Reference(model, pad_id, live=not args.precompute_ref)
    pairs = 2 * args.batch_size  # rows per forward: chosen and rejected
    if args.precompute_ref:
        reference.precompute(batched_pairs(train_rows, args.batch_size), pairs)
    reference.precompute(batched_pairs(eval_rows, args.batch_size), pairs)
    # The optimizer: AdamW on what is trainable, linear warmup then cosine decay to 0 over the run.
    steps = total_steps(args.max_steps, args.epochs, len(train_rows), args.batch_size * args.grad_accum)
    optimizer = adamw(trainable(model), args.optim, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = LambdaLR(optimizer, cosine_with_warmup(steps, args.warmup))
    loop = Loop(args, {"model": model}, optimizer, scheduler, len(train_rows), steps, args.max_grad_norm)
    if evaluating and not args.resume:
        loop.log.metrics({"step": 0, **evaluate(model, reference, eval_rows, args, pad_id)})

    for step in loop:
        batches = loop.batches(args.batch_size, args.grad_accum)
        n_pairs = dist.all_sum(sum(map(len, batches)))  # the loss is the mean over the step's pairs, on all ranks
        totals, tokens = {}, 0
        for idx in batches:
            rows = [train_rows[i] for i in idx]
            losses, sums = dpo_step(model, reference, rows, args, pad_id)
            (losses.sum() / n_pairs).backward()
            totals = {k: totals.get(k, 0.0) + v for k, v in sums.items()}
            tokens += sum(2 * len(r.prompt) + len(r.chosen) + len(r.rejected) for r in rows)
        metrics = {k: dist.all_sum(v) / n_pairs for k, v in totals.items()} | {"tokens": tokens}
        metrics |= loop.optimizer_step()
        if evaluating and args.eval_every and step % args.eval_every == 0:
            metrics |= evaluate(model, reference, eval_rows, args, pad_id)
        loop.end_step(metrics)
    if loop.interrupted:  # a signal: the checkpoint holds the run; --resume continues it
        return

    if evaluating:
        final = evaluate(model, reference, eval_rows, args, pad_id)
        loop.log.final(loop.step, final)
    M.save_model(model, tokenizer, args.out)


if __name__ == "__main__":
    main(train, Args)
