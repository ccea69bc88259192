"""Kahneman-Tversky Optimization: learn from single responses labelled good or bad, no pairs needed.

KTO (Ethayarajh et al. 2024) scores a response by its log-ratio r = log π(y|x) - log π_ref(y|x)
(summed logprobs) and values it against a reference point z₀ ≈ KL(π || π_ref), with a value
function that saturates like prospect theory's, so examples already well on their side stop pulling:

    desirable:    λ_D · (1 - σ(β·(r - z₀)))
    undesirable:  λ_U · (1 - σ(β·(z₀ - r)))

z₀ is the mean r over *mismatched* pairs of the step's batch, completion i after prompt (i+1) mod n:
an answer to another question, so its r measures how far π has drifted overall, not how good the
answer is. It is clamped at 0 and detached. It uses the step's whole batch (--batch-size ×
--grad-accum examples, every rank's under torchrun), so accumulation equals one big batch and
the set of mismatched completions is the set of matched ones (TRL PR#1402). Under torchrun the
pairs are the ones a single process forms from the whole batch, in its order, and each rank
scores a share of them: pairs within each rank's own examples would be other pairs, and another
z₀ (held-out z₀ alike). Pairs data is split into desirable (chosen) and undesirable (rejected)
examples.

    python train_kto.py --model out/sft --data data/kto_en_demo.json --out out/kto
"""
import itertools
import sys
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

from nanorlhf import dist
from nanorlhf import model as M
from nanorlhf.cli import arg, main
from nanorlhf.data import load_data
from nanorlhf.loop import Loop, adamw, check_out, cosine_with_warmup, total_steps
from nanorlhf.model import load_policy, trainable
from nanorlhf.preference import PreferenceArgs, Reference, summed_logprobs


@dataclass
class Args(PreferenceArgs):
    model: str = arg(M.DEFAULT_MODEL, "The SFT model to start from (train_sft.py --out); it is the reference too.")
    beta: float = arg(0.1, "β: how sharply the value saturates around z₀; higher keeps π closer to the "
                      "reference. The implicit reward is β·(log π - log π_ref).", gt=0)
    desirable_weight: float = arg(1.0, "λ_D, the weight of desirable examples' losses. The paper recommends "
                                  "λ_D·n_D / (λ_U·n_U) between 1 and 4/3 (printed at start).", gt=0)
    undesirable_weight: float = arg(1.0, "λ_U, the weight of undesirable examples' losses.", gt=0)
    max_steps: int | None = arg(None, "Optimizer steps to run; default: --epochs over the examples.", gt=0)
    epochs: float = arg(1.0, "Passes over the training examples when --max-steps is not given.", gt=0)
    batch_size: int = arg(4, "Examples per micro-batch (per process under torchrun); z₀ uses the whole step's, every "
                          "process's, paired as one process pairs them.", gt=0)
    grad_accum: int = arg(4, "Micro-batches per optimizer step: batch_size * grad_accum examples a step.", gt=0)
    lr: float = arg(5e-5, "Peak learning rate (cosine decay after warmup). LoRA: 5e-6 to 5e-5; full fine-tuning "
                    "wants ~1e-6.", gt=0)
    warmup: float = arg(0.03, "Warmup: a fraction of the steps if < 1, else a number of steps.", ge=0)
    weight_decay: float = arg(0.0, "AdamW weight decay.", ge=0)
    max_grad_norm: float = arg(1.0, "Clip the gradient norm to this (0 = no clipping).", ge=0)
    lora_dropout: float = arg(0.0, "Dropout on the LoRA input (the base model's dropout is always off).", ge=0)
    max_length: int = arg(512, "Max tokens per prompt+response (z₀'s mismatched pairs too); prompts are cut from "
                          "the left, responses from the right.", gt=0)
    eval_data: str | None = arg(None, "Held-out examples file; default: hold out --eval-frac of --data.")
    eval_frac: float = arg(0.05, "Fraction of the examples held out for evaluation when --eval-data is not "
                           "given.", ge=0)
    eval_every: int = arg(0, "Evaluate loss, rewards and z₀ every N steps (0 = only before and after training).", ge=0)


def kto_loss(policy_logps, reference_logps, labels, kl_ref, beta, desirable_weight=1.0, undesirable_weight=1.0):
    """Per-example KTO losses (B,) and implicit rewards β·r (B,), detached.

    policy_logps, reference_logps: (B,) summed response logprobs; labels: (B,) bool, True = desirable;
    kl_ref: z₀, a float (already clamped and detached).
    """
    r = policy_logps - reference_logps                                          # (B,)
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (r - kl_ref)))     # (B,)
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (kl_ref - r)))  # (B,)
    return torch.where(labels, desirable, undesirable), beta * r.detach()


def mismatched(rows, max_length):
    """(prompt, completion) pairs that do not belong together: completion i after prompt (i+1) mod n.

    Pairs whose two prompts are equal are matched after all (e.g. the chosen and rejected halves
    of one preference pair side by side) and left out; a single row gives none. Prompts are cut
    from the left to fit max_length.
    """
    seqs = []
    for i, row in enumerate(rows):
        prompt = rows[(i + 1) % len(rows)].prompt
        if prompt != row.prompt:
            seqs.append((prompt[max(0, len(prompt) + len(row.completion) - max_length):], row.completion))
    return seqs


def step_pairs(train_rows, batches, max_length):
    """This rank's share of the step's mismatched pairs, formed as one process forms them: from every rank's
    micro-batches (`batches`: this rank's share of each, as example indices), each micro-batch's shares in rank
    order, which is the order one process holding the whole batch reads (Loop.take deals contiguous shares)."""
    order = [i for shares in zip(*dist.gather(batches)) for share in shares for i in share]
    return mismatched([train_rows[i] for i in order], max_length)[dist.rank()::dist.world()]


def held_out_pairs(rows, max_length):
    """This rank's share of the held-out set's mismatched pairs, formed as one process forms them: from every rank's
    rows, back in the order data.load_data dealt them out in (row j to rank j mod world)."""
    rows = [r for dealt in itertools.zip_longest(*dist.gather(rows)) for r in dealt if r is not None]
    return mismatched(rows, max_length)[dist.rank()::dist.world()]


@torch.no_grad()
def estimate_kl(model, reference, seqs, pad_id, batch_size):
    """z₀ = max(0, mean of log π - log π_ref over mismatched pairs), or None when there are none. Under torchrun
    `seqs` are this rank's share of the pairs and the mean is over every rank's."""
    total = 0.0
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        total += (summed_logprobs(model, chunk, pad_id) - reference(chunk)).sum().item()  # (b,) log-ratios
    n = dist.all_sum(len(seqs))
    return max(0.0, dist.all_sum(total) / n) if n else None


class ReferencePoint:
    """z₀ for steps that cannot form one (one example, or one prompt only), where TRL's KTO logged NaN
    (trl#1447, PR#1380): the last valid estimate, and 0 before any, which is exact then (π = π_ref).
    Checkpointed with the run, so a resumed run falls back to the same value."""

    def __init__(self):
        self.kl, self.fallbacks = 0.0, 0

    def update(self, kl):
        if kl is None:
            self.fallbacks += 1
        else:
            self.kl = kl
        return self.kl

    def state_dict(self):
        return {"kl": self.kl, "fallbacks": self.fallbacks}

    def load_state_dict(self, state):
        self.kl, self.fallbacks = state["kl"], state["fallbacks"]


def kto_step(model, reference, rows, kl, args, pad_id):
    """Per-example losses (B,) of unpaired rows, and sums and counts of the logged metrics; kl: z₀."""
    seqs = [(r.prompt, r.completion) for r in rows]
    logprobs = summed_logprobs(model, seqs, pad_id)  # (B,)
    labels = torch.tensor([r.label for r in rows], device=logprobs.device)  # (B,) bool
    losses, rewards = kto_loss(logprobs, reference(seqs), labels, kl, args.beta, args.desirable_weight,
                               args.undesirable_weight)
    sums = {"loss": losses.detach().sum(), "rewards/chosen": rewards[labels].sum(), "n/chosen": labels.sum(),
            "rewards/rejected": rewards[~labels].sum(), "n/rejected": (~labels).sum()}
    return losses, {k: v.item() for k, v in sums.items()}


def means(sums, n):
    """Mean loss over all n examples; mean rewards over the desirable / undesirable ones, left out when
    the batch has none of that kind (so the logs never hold a 0/0 NaN). Sums and n are over every rank."""
    sums, n = dist.sum_dicts(sums), dist.all_sum(n)  # a rank without held-out rows has no sums
    out = {"loss": sums["loss"] / n}
    for kind in ("chosen", "rejected"):
        if sums[f"n/{kind}"]:
            out[f"rewards/{kind}"] = sums[f"rewards/{kind}"] / sums[f"n/{kind}"]
    return out


def add(totals, sums):
    return {k: totals.get(k, 0.0) + v for k, v in sums.items()}


@torch.no_grad()
def evaluate(model, reference, rows, pairs, z0, args, pad_id):
    """Loss and rewards over held-out examples, with z₀ from the whole held-out set's mismatched pairs (this rank's
    share of them: held_out_pairs)."""
    kl = estimate_kl(model, reference, pairs, pad_id, args.batch_size)
    kl = z0.kl if kl is None else kl
    totals = {}
    for i in range(0, len(rows), args.batch_size):
        totals = add(totals, kto_step(model, reference, rows[i:i + args.batch_size], kl, args, pad_id)[1])
    return {f"eval_{k}": v for k, v in (means(totals, len(rows)) | {"kl": kl}).items()}


def train(args):
    check_out(args)
    torch.manual_seed(args.seed)
    model, tokenizer = load_policy(args)
    pad_id = tokenizer.pad_token_id
    train_rows, eval_rows = load_data(args, "unpaired", tokenizer)
    evaluating = dist.all_sum(len(eval_rows)) > 0  # decided from every rank's rows: all or none evaluate
    n_d, n_u = sum(r.label for r in train_rows), sum(not r.label for r in train_rows)
    if n_d and n_u:
        ratio = args.desirable_weight * n_d / (args.undesirable_weight * n_u)
        print(f"{n_d} desirable, {n_u} undesirable examples: λ_D·n_D / (λ_U·n_U) = {ratio:.3g} (Ethayarajh et al. "
              f"recommend 1 to 4/3; set --desirable-weight / --undesirable-weight)")
    else:  # as TRL: go on, but say so; only one side of the value function then pulls
        have, missing = ("desirable", "undesirable") if n_d else ("undesirable", "desirable")
        print(f"warning: {args.data}: all {len(train_rows)} training examples are {have}, none {missing}: KTO can "
              f"only move {have} log-ratios past z₀. Check the labels if that is not what you meant.",
              file=sys.stderr)
    # The reference is the model as loaded, before any update and before Loop loads a checkpoint. The z₀ pairs are
    # new every step, so the reference stays live (a frozen copy for full fine-tuning) even with --precompute-ref.
    # Held-out examples and their mismatched pairs are fixed: scored once, in the batches evaluate() uses.
    reference = Reference(model, pad_id)
    if args.precompute_ref:
        reference.precompute([(r.prompt, r.completion) for r in train_rows], args.batch_size)
    reference.precompute([(r.prompt, r.completion) for r in eval_rows], args.batch_size)
    eval_pairs = held_out_pairs(eval_rows, args.max_length)
    reference.precompute(eval_pairs, args.batch_size)
    z0 = ReferencePoint()
    # The optimizer: AdamW on what is trainable, linear warmup then cosine decay to 0 over the run.
    steps = total_steps(args.max_steps, args.epochs, len(train_rows), args.batch_size * args.grad_accum)
    optimizer = adamw(trainable(model), args.optim, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = LambdaLR(optimizer, cosine_with_warmup(steps, args.warmup))
    loop = Loop(args, {"model": model}, optimizer, scheduler, len(train_rows), steps, args.max_grad_norm,
                stateful={"z0": z0})
    if evaluating and not args.resume:
        loop.log.metrics({"step": 0, **evaluate(model, reference, eval_rows, eval_pairs, z0, args, pad_id)})

    for step in loop:
        batches = loop.batches(args.batch_size, args.grad_accum)
        step_rows = [train_rows[i] for idx in batches for i in idx]
        n_step = dist.all_sum(len(step_rows))
        # z₀ first, from the whole step (every rank's) and without grad: every micro-batch then shares one
        # reference point.
        kl = z0.update(estimate_kl(model, reference, step_pairs(train_rows, batches, args.max_length), pad_id,
                                   args.batch_size))
        totals = {}
        for idx in batches:
            rows = [train_rows[i] for i in idx]
            losses, sums = kto_step(model, reference, rows, kl, args, pad_id)
            (losses.sum() / n_step).backward()  # the mean over the step's examples (on every rank)
            totals = add(totals, sums)
        metrics = means(totals, len(step_rows)) | {"kl": kl, "kl_fallbacks": z0.fallbacks}
        metrics["tokens"] = sum(len(r.prompt) + len(r.completion) for r in step_rows)
        metrics |= loop.optimizer_step()
        if evaluating and args.eval_every and step % args.eval_every == 0:
            metrics |= evaluate(model, reference, eval_rows, eval_pairs, z0, args, pad_id)
        loop.end_step(metrics)
    if loop.interrupted:  # a signal: the checkpoint holds the run; --resume continues it
        return

    if evaluating:
        final = evaluate(model, reference, eval_rows, eval_pairs, z0, args, pad_id)
        loop.log.final(loop.step, final)
    M.save_model(model, tokenizer, args.out)


if __name__ == "__main__":
    main(train, Args)
