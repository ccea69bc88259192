"""Critic-free RL: GRPO (Shao et al. 2024) and RLOO (Ahmadian et al. 2024) on verifiable or model rewards.

No critic, so no value adapter, value head or value passes: each prompt is sampled k times
(--num-generations) and a response's advantage is its reward measured against the rest of its group,

    grpo         A_i = (r_i - mean_group r) / std      std of the group, of the batch, or 1 (--scale-rewards
                                                        none: Dr. GRPO, Liu et al. 2025)
    rloo         A_i = r_i - mean of the other k-1      the leave-one-out baseline; the loss sums each
                                                        response's tokens (--loss-type rloo, its default), as
                                                        RLOO's ∇log π(y|x) = Σ_t ∇log π(y_t) has no 1/|y|
    reinforce++  per-token rewards -β·KL plus the score at the end, summed to the end of the response and
                 whitened over the batch (Hu 2025)

and every token of a response gets its response's advantage. The loss is PPO's clipped ratio over
--ppo-epochs passes (μ in the GRPO paper; one pass over one minibatch gives ratio 1, plain REINFORCE),
with DAPO's asymmetric clip (--cliprange-high) and overlong filtering (Yu et al. 2025), per token or, with
--importance-sampling-level sequence, per response (GSPO, Zheng et al. 2025). The KL to the reference
(--beta) enters where each paper puts it: grpo adds β·k3 to the loss (GRPO eq. 3); rloo subtracts β·Σ_t log π/π_ref
from each response's reward before the leave-one-out baseline (Ahmadian et al. 2024 §3); reinforce++ puts -β·k1 on
every token's reward. With --beta 0 (the default, as TRL) no reference pass runs.
One frozen base serves the policy (LoRA adapter `policy`) and the reference (adapters off). --advantage is
resolved once, before the loop, into a `Variant`: its advantage function, the logprob passes it needs and the β of
the loss. Each iteration, in train():

    1. rollout     --rollout-batch-size prompts, --num-generations responses each
    2. score       the reward (each part logged) and the old and reference logprobs where the variant needs them
    3. advantages  the variant's, computed once for every group before any minibatch
    4. update      clipped ratio over --ppo-epochs, aggregated by --loss-type (`update`)
    5. log + save

    python train_grpo.py --model out/sft --data data/arithmetic.jsonl --reward-fn nanorlhf.arithmetic:accuracy \\
        --out out/grpo
"""
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

from nanorlhf import dist
from nanorlhf import model as M
from nanorlhf.cli import UserError, arg, main
from nanorlhf.data import load_prompts
from nanorlhf.engine import DECODE, DECODE_HELP, check_lengths
from nanorlhf.kernels import entropy_grad
from nanorlhf.loop import Loop, RunArgs, adamw, check_out, cosine_with_warmup, total_steps
from nanorlhf.model import load_policy, trainable
from nanorlhf.perf import Phases, shape
from nanorlhf.rewards import Rewarder, TrainerState, part_means
from nanorlhf.rollout import (batch_logprobs, gae, kl_penalty, masked, masked_mean, micro_batches, minibatches,
                              response_logprobs, sample, shape_rewards, whiten)


@dataclass
class Args(RunArgs):
    model: str = arg(M.DEFAULT_MODEL, "The policy to start from: an SFT output or any causal LM.", alias="--actor")
    rm: list[str] = arg([], "Reward model folder (train_rm.py --out). Give it several times for a weighted sum.")
    rm_weight: list[float] = arg([], "Weight of each --rm in the reward, in order (default 1 each).")
    reward_fn: list[str] = arg([], "Python reward 'module:function', called as TRL's GRPOTrainer calls one (prompts, "
                               "completions, completion_ids and the data's other columns as keyword lists, "
                               "trainer_state, log_metric, log_extra; an async def is awaited; None where it does not "
                               "apply) or, with a `responses` parameter and no `completions`, as f(prompts, "
                               "responses); added to the RM scores, each logged as reward/<its name>. E.g. "
                               "nanorlhf.arithmetic:accuracy.")
    reward_weight: list[float] = arg([], "Weight of each --reward-fn in the reward, in order (default 1 each).")
    gold_reward_fn: str | None = arg(None, "A 'module:function' reward logged as `reward/gold`, never optimised.")
    max_steps: int | None = arg(None, "Iterations (sample, score, update); default: --epochs over the prompts.", gt=0)
    epochs: float = arg(1.0, "Passes over the prompts when --max-steps is not given.", gt=0)
    num_generations: int = arg(4, "k, responses sampled per prompt: the group each response is measured against.",
                               ge=2)
    rollout_batch_size: int = arg(8, "Prompts per iteration (each gives --num-generations responses).", gt=0)
    minibatch_size: int | None = arg(None, "Responses per optimizer step; default all of an iteration's "
                                     "(--rollout-batch-size × --num-generations).", gt=0)
    batch_size: int | None = arg(None, "Responses per forward pass; default min(8, --minibatch-size).", gt=0)
    score_batch_size: int | None = arg(None, "Responses per forward when scoring a rollout (old, reference, RM "
                                       "passes); default --batch-size. Scoring sorts the whole rollout by length, so "
                                       "it pads less than an update micro-batch and can take more rows "
                                       "(docs/benchmarks.md).", gt=0)
    ppo_epochs: int = arg(1, "μ, passes over each iteration's responses. 1 with one minibatch is on-policy "
                          "REINFORCE with a group baseline (and skips the old-logprob pass).", gt=0)
    lr: float = arg(1e-5, "Peak learning rate (LoRA; TRL's 1e-6 is for full fine-tuning); cosine decay over every "
                    "optimizer step after warmup.", gt=0)
    warmup: float = arg(0.03, "Warmup: a fraction of the optimizer steps if < 1, else a number of them.", ge=0)
    weight_decay: float = arg(0.0, "AdamW weight decay.", ge=0)
    max_grad_norm: float = arg(1.0, "Clip the gradient norm to this (0 = no clipping).", ge=0)
    max_prompt_length: int = arg(256, "Max prompt tokens; longer prompts are skipped.", gt=0)
    max_new_tokens: int = arg(64, "Response length limit.", gt=0)
    temperature: float = arg(0.7, "Sampling temperature, used in every logprob pass too, so the ratio and KL compare "
                             "the distributions sampled from.", gt=0)
    top_p: float = arg(1.0, "Nucleus sampling; < 1 makes logprobs differ from the sampling distribution.", gt=0)
    decode: str = arg("auto", DECODE_HELP, choices=DECODE)
    advantage: str = arg("grpo", "grpo: group mean and std; rloo: leave-one-out mean; reinforce++: batch-"
                         "whitened returns with the KL in the reward.", choices=["grpo", "rloo", "reinforce++"])
    scale_rewards: str = arg("group", "What grpo divides by: the group's reward std, the batch's, or nothing "
                             "(none: Dr. GRPO, no per-prompt difficulty bias).", choices=["group", "batch", "none"])
    loss_type: str | None = arg(None, "Loss aggregation over tokens: grpo = mean over responses of each one's token "
                                "mean (GRPO eq. 3), so a response's tokens weigh 1/|y|; rloo = token sum / "
                                "responses, every token weighing 1 (RLOO eq. 7, TRL's RLOOTrainer); dr_grpo = token "
                                "sum / (responses × --max-new-tokens), rloo's over a constant (Liu et al. 2025); "
                                "dapo = token mean over the minibatch, as TRL. Default: rloo under --advantage rloo "
                                "(with grpo it would not be RLOO's estimator), else grpo.",
                                choices=["grpo", "rloo", "dr_grpo", "dapo"])
    cliprange: float = arg(0.2, "ε, the ratio clip (below 1, and above unless --cliprange-high).", gt=0)
    cliprange_high: float | None = arg(None, "DAPO's upper clip ε_high (e.g. 0.28): room for unlikely tokens to "
                                       "grow; default --cliprange.", gt=0)
    importance_sampling_level: str = arg("token", "The ratio the clip acts on, as TRL names it: token = one per token "
                                         "(GRPO); sequence = GSPO (Zheng et al. 2025), one length-normalised ratio "
                                         "per response, clipped as a whole (the paper clips far tighter: ε 3e-4, "
                                         "ε_high 4e-4).", choices=["token", "sequence"])
    mask_truncated: bool = arg(False, "DAPO's overlong filtering: responses that hit --max-new-tokens without EOS "
                               "count in the group's baseline but not in the loss.")
    beta: float = arg(0.0, "β, the KL(π‖π_ref) coefficient: k3 in the loss (grpo), β·Σ_t log π/π_ref subtracted "
                      "from each response's reward before the leave-one-out baseline (rloo), or k1 in each token's "
                      "reward (reinforce++). 0 runs no reference pass at all.", ge=0)
    sample_every: int = arg(10, "Print a prompt -> response -> reward table every N iterations (0 = never).", ge=0)


def nan_std(x, dim):
    """The unbiased std of x's n non-NaN entries along dim (kept), NaN where n < 2: TRL's nanstd. Computed as torch's
    std with the NaNs set to the mean (where they add nothing to the squares), rescaled from k - 1 to n - 1 degrees
    of freedom, so that a row without NaN keeps torch.std's own bits."""
    n = (~x.isnan()).sum(dim, keepdim=True)
    filled = torch.where(x.isnan(), x.nanmean(dim, keepdim=True), x)
    return filled.std(dim, keepdim=True) * ((x.shape[dim] - 1) / (n - 1).clamp(min=0)).sqrt()


def group_advantages(rewards, k, kind="grpo", scale="group", eps=1e-4):
    """Advantages (N,) of N = G·k rewards, the k responses of each prompt side by side.

    grpo: (r - group mean) / std, std of the group (Shao et al. 2024 §4.1.2), of the batch, or none (Dr. GRPO);
    rloo: r - mean of the other k-1 = k/(k-1) · (r - group mean) (Ahmadian et al. 2024, eq. 7).
    A group of equal rewards gets 0 everywhere: it says nothing about which response was better.

    A NaN reward (no reward function applies to that response) is TRL's unscorable row (TRL >= 1.6): it stays out
    of every mean and std (RLOO's baseline is the mean of the other *scorable* responses) and gets advantage 0, as
    does the one scorable response of a group, which has nothing to be measured against.
    """
    r = rewards.view(-1, k)                      # (G, k)
    if kind == "rloo":  # (sum of the scorable others) / (their count)
        n = (~r.isnan()).sum(1, keepdim=True)
        advantages = r - (r.nansum(1, keepdim=True) - r) / (n - 1)
    else:
        advantages = r - r.nanmean(1, keepdim=True)
        if scale == "group":
            advantages = advantages / (nan_std(r, 1) + eps)
        elif scale == "batch":  # under torchrun, the std of every rank's scorable rewards
            n = dist.all_sum((~rewards.isnan()).sum())
            mean = dist.all_sum(rewards.nansum()) / n
            advantages = advantages / ((dist.all_sum(((rewards - mean) ** 2).nansum()) / (n - 1)).sqrt() + eps)
    return torch.where(advantages.isnan(), 0.0, advantages).view(-1)


def rloo_rewards(scores, logprobs, ref_logprobs, mask, beta):
    """RLOO's KL-regularised reward (Ahmadian et al. 2024 §3): r(x, y) - β·Σ_t log π(y_t)/π_ref(y_t), the sequence's
    k1 KL at the sampling policy, taken before the leave-one-out baseline, so each response is measured against the
    others on reward and KL together. scores (B,); logprobs, ref_logprobs, mask (B, R). Returns (B,)."""
    return scores - beta * masked(logprobs - ref_logprobs, mask).sum(1)


def reinforce_pp_advantages(scores, logprobs, ref_logprobs, mask, beta):
    """REINFORCE++ (Hu 2025): per-token rewards -β·KL (k1) plus the score on the last token, their sum to the end
    of the response (γ = 1), whitened over every response token of the batch. All (B, R) but scores (B,)."""
    rewards = shape_rewards(scores, logprobs, ref_logprobs, mask, beta, "k1")
    returns, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=1.0)  # V = 0: advantages = returns
    return whiten(returns, mask)


def on_tokens(advantages, mask):
    """Each response's advantage (N,) on every one of its tokens: (N, R), 0 on padding."""
    return masked(advantages[:, None].expand_as(mask), mask)


def grpo_token_advantages(scores, batch, args):
    """GRPO's advantages (N, R): each response's score against its group's (Shao et al. 2024 §4.1.2); its KL is in
    the loss (grpo_loss), not here."""
    return on_tokens(group_advantages(scores, args.num_generations, "grpo", args.scale_rewards), batch["mask"]), {}


def rloo_token_advantages(scores, batch, args):
    """RLOO's advantages (N, R): the leave-one-out baseline (Ahmadian et al. 2024, eq. 7) of score - β·KL (§3), and
    that KL to log, the mean k1 per token of the sampling policy."""
    rewards, stats = scores, {}
    if args.beta > 0:
        rewards = rloo_rewards(scores, batch["logprobs"], batch["ref_logprobs"], batch["mask"], args.beta)
        stats["kl"] = [masked_mean(batch["logprobs"] - batch["ref_logprobs"], batch["mask"]).item()]
    return on_tokens(group_advantages(rewards, args.num_generations, "rloo"), batch["mask"]), stats


def reinforce_pp_token_advantages(scores, batch, args):
    """REINFORCE++'s advantages (N, R) (Hu 2025), per token already. With β = 0 no logprob pass may have run, and the
    KL term is 0 whatever stands in for the logprobs. A response with a NaN score (no reward function applies) is
    left out as grpo and rloo leave it: advantage 0 on its tokens, and none of them in the whitening statistics."""
    ref_logprobs = batch.get("ref_logprobs", torch.zeros_like(batch["mask"], dtype=torch.float))
    logprobs = batch.get("logprobs", ref_logprobs)
    mask = batch["mask"] * ~scores.isnan()[:, None]
    return reinforce_pp_advantages(scores.nan_to_num(0.0), logprobs, ref_logprobs, mask, args.beta), {}


@dataclass(frozen=True)
class Variant:
    """What --advantage changes, resolved once before the loop (the module docstring has each one's math)."""
    advantages: Callable      # 3.: (scores (N,), batch, args) -> advantages (N, R), stats to log
    needs_old_logprobs: bool  # a scoring pass of the policy: the ratio's denominator, or the KL in the reward
    needs_ref_logprobs: bool  # a scoring pass of the reference (adapters off)
    loss_beta: float          # β of the k3 term in the loss (GRPO eq. 3); 0 where the KL is in the reward
    loss_type: str            # 4.'s aggregation over tokens: --loss-type, else the one the estimator is written with


def resolve_variant(args, updates):
    """The Variant of --advantage, for `updates` optimizer steps per iteration. GRPO puts β·k3 in the loss; RLOO and
    REINFORCE++ put the KL in the reward, so with β > 0 they need the old logprobs. Otherwise one update on fresh
    samples needs none: the old logprobs are the new ones, detached (ratio 1). RLOO's estimator, (1/k) Σ_i A_i ·
    ∇log π(y_i|x) (Ahmadian et al. 2024, eq. 7), sums each response's token gradients, so its default aggregation is
    the token sum per response, not GRPO's token mean, which would weigh a 40-token response's tokens a quarter of a
    10-token one's."""
    kl_in_reward = args.advantage != "grpo"
    advantages = {"grpo": grpo_token_advantages, "rloo": rloo_token_advantages,
                  "reinforce++": reinforce_pp_token_advantages}[args.advantage]
    loss_type = args.loss_type or ("rloo" if args.advantage == "rloo" else "grpo")
    if args.importance_sampling_level == "sequence" and loss_type != "grpo" and dist.is_main():  # as TRL warns
        print(f"warning: --importance-sampling-level sequence with --loss-type {loss_type}: the loss sums each "
              "response's tokens, each carrying the response's one ratio, so a response weighs as much as it is "
              "long; GSPO's objective (Zheng et al. 2025) is one term per response, --loss-type grpo", file=sys.stderr)
    return Variant(advantages, needs_old_logprobs=updates > 1 or (kl_in_reward and args.beta > 0),
                   needs_ref_logprobs=args.beta > 0, loss_beta=0.0 if kl_in_reward else args.beta,
                   loss_type=loss_type)


def grpo_loss(logprobs, old_logprobs, advantages, mask, cliprange, cliprange_high, ref_logprobs=None, beta=0.0,
              level="token"):
    """Per-token loss (B, R), 0 on padding: -min(ratio·A, clip(ratio, 1-ε, 1+ε_high)·A) + β·k3(π, π_ref).

    logprobs, old_logprobs, ref_logprobs, mask: (B, R); advantages (B, R), each response's on its tokens.
    Returns (per_token, stats) with the clip fractions below and above and the mean k3 KL.

    level "token": ratio_t = π(y_t)/π_old(y_t), each token clipped on its own (GRPO eq. 3). level "sequence": GSPO
    (Zheng et al. 2025, eq. 7), s = exp(mean_t log π(y_t)/π_old(y_t)) = (π(y)/π_old(y))^(1/|y|) on every token of
    the response, so a response is clipped as a whole and one noisy token cannot swing its own weight. At the first
    update (π = π_old: μ = 1, or the first minibatch) both levels give ratio exactly 1 and the same gradient, A·Σ_t
    ∇log π(y_t) per response under every --loss-type; they part once the policy has moved off π_old.

    The two directions of the KL term: on tokens sampled from π, k3's value estimates KL(π‖π_ref) per token, and
    that is the logged `kl`; but its gradient, E_π[(1 - π_ref/π)·∇log π] = -Σ_y π_ref(y)·∇log π(y), is the gradient
    of KL(π_ref‖π), so the loss pulls π towards covering π_ref (GRPO eq. 3, as TRL). (RLOO's `kl`, logged by
    rloo_token_advantages, is the mean k1 of the sampling policy: KL(π_old‖π_ref) per token.)
    """
    log_ratio = masked(logprobs - old_logprobs, mask)  # padding: ratio 1, never exp(garbage)
    if level == "sequence":  # the response's mean log-ratio on each of its tokens (padding masked out below)
        log_ratio = (log_ratio.sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)).expand_as(log_ratio)
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1 - cliprange, 1 + cliprange_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    stats = {"clipfrac/low": masked_mean(((ratio < 1 - cliprange) & (advantages < 0)).float(), mask).detach(),
             "clipfrac/high": masked_mean(((ratio > 1 + cliprange_high) & (advantages > 0)).float(), mask).detach()}
    if beta:
        kl = kl_penalty(logprobs, ref_logprobs, "k3")
        per_token = per_token + beta * kl
        stats["kl"] = masked_mean(kl, mask).detach()
    return masked(per_token, mask), stats


def aggregate(per_token, mask, loss_type, n_responses, n_tokens, max_new_tokens):
    """This micro-batch's share of its minibatch's loss: summed over the micro-batches it gives, as TRL,
    grpo:    mean over responses of each response's token mean (GRPO eq. 3)
    rloo:    token sum / responses: the mean over responses of each one's token sum, RLOO's (1/k) Σ_i A_i Σ_t at
             ratio 1 (Ahmadian et al. 2024, eq. 7; TRL's RLOOTrainer)
    dr_grpo: token sum / (responses × max_new_tokens), a constant normaliser (Liu et al. 2025)
    dapo:    token sum / tokens of the minibatch (Yu et al. 2025)
    per_token, mask: (b, R); n_responses, n_tokens: counts over the whole minibatch."""
    if loss_type == "grpo":
        return (per_token.sum(1) / mask.sum(1).clamp(min=1)).sum() / n_responses
    if loss_type == "rloo":
        return per_token.sum() / n_responses
    if loss_type == "dr_grpo":
        return per_token.sum() / (n_responses * max_new_tokens)
    if loss_type == "dapo":
        return per_token.sum() / max(n_tokens, 1)
    raise ValueError(f"unknown loss_type {loss_type!r}")


def update(model, batch, variant, eps_high, loop, args):
    """4. --ppo-epochs passes of minibatches of --minibatch-size responses, --batch-size per forward; each minibatch's
    loss aggregated by the variant's loss type, the ratio clipped to [1 - --cliprange, 1 + eps_high]. batch: the
    rollout with its advantages and loss_mask (N, R), and the old and reference logprobs where the variant needs them.
    Returns lists of per-micro-batch and per-step stats."""
    stats = {}
    for _ in range(args.ppo_epochs):
        for mb in minibatches(batch, args.minibatch_size):
            # normalisers over every rank's minibatch: summed gradients are one process's
            n_responses, n_tokens = dist.all_sum(len(mb["mask"])), dist.all_sum(mb["loss_mask"].sum())
            mb_loss = 0.0
            for _, micro in micro_batches(mb, args.batch_size):
                with entropy_grad(False):  # logged, never in this loss: no gradient work for it
                    logprobs, entropy = response_logprobs(model, micro, args.temperature, "policy", True)
                old_logprobs = micro["logprobs"] if variant.needs_old_logprobs else logprobs.detach()
                per_token, s = grpo_loss(logprobs, old_logprobs, micro["advantages"], micro["loss_mask"],
                                         args.cliprange, eps_high, micro.get("ref_logprobs"), variant.loss_beta,
                                         args.importance_sampling_level)
                loss = aggregate(per_token, micro["loss_mask"], variant.loss_type, n_responses, n_tokens,
                                 args.max_new_tokens)
                loss.backward()
                mb_loss += loss.item()
                s["entropy"] = masked_mean(entropy, micro["mask"]).detach()
                for k, v in s.items():
                    stats.setdefault(k, []).append(float(v))
            for k, v in ({"loss": dist.all_sum(mb_loss)} | loop.optimizer_step()).items():
                stats.setdefault(k, []).append(v)
    return stats


def train(args):
    if not args.lora_r:
        raise UserError("--lora-r 0: the reference is the base with adapters off; this stage needs LoRA")
    n = args.rollout_batch_size * args.num_generations
    args.minibatch_size = args.minibatch_size or n
    args.batch_size = args.batch_size or min(8, args.minibatch_size)
    args.score_batch_size = args.score_batch_size or args.batch_size
    if args.minibatch_size % args.batch_size or n % args.minibatch_size:
        raise UserError(f"--rollout-batch-size × --num-generations ({n}) must be a multiple of --minibatch-size "
                        f"({args.minibatch_size}), and that of --batch-size ({args.batch_size})")
    check_lengths(M.load_config(args.model, "--actor"), args.max_prompt_length, args.max_new_tokens)
    check_out(args)
    torch.manual_seed(args.seed)
    model, tokenizer = load_policy(args, flag="--actor", adapter="policy")
    M.disable_dropout(model)  # LoRA's too: with dropout the ratio is not 1 before the first update
    rewarder = Rewarder(tokenizer, args.rm, args.rm_weight, args.reward_fn, args.gold_reward_fn, args.reward_weight,
                        unscored="so they get advantage 0 and stay out of their group's baseline and the logged "
                        "reward (as TRL)", device=args.device, dtype=args.dtype, load_in_4bit=args.load_in_4bit,
                        load_in_8bit=args.load_in_8bit, compile=args.compile)
    prompts = load_prompts(args.data, tokenizer, args.max_prompt_length, args.format, args.limit,
                           flag="--max-prompt-length")
    optimizer = adamw(trainable(model), args.optim, lr=args.lr, weight_decay=args.weight_decay)
    steps = total_steps(args.max_steps, args.epochs, len(prompts), args.rollout_batch_size)
    updates = args.ppo_epochs * (n // args.minibatch_size)
    scheduler = LambdaLR(optimizer, cosine_with_warmup(steps * updates, args.warmup))  # counts every update
    loop = Loop(args, {"model": model}, optimizer, scheduler, len(prompts), steps, args.max_grad_norm)
    eps_high = args.cliprange_high or args.cliprange
    variant = resolve_variant(args, updates)  # what --advantage changes, decided once
    device = next(model.parameters()).device
    phases = Phases(device, M.pick_dtype(device, args.dtype))  # MFU against the peak in the compute dtype
    # Each pass of an iteration as (Shape, with the lm_head, adapter), for its tokens and model FLOPs
    policy = shape(model)
    score_passes = ([(policy, True, "policy")] * variant.needs_old_logprobs
                    + [(policy, True, None)] * variant.needs_ref_logprobs
                    + [(shape(rm), False, None) for rm, _, _ in rewarder.rms])

    for step in loop:
        # 1. rollout: each prompt k times, side by side, so rows g·k .. g·k+k-1 are group g
        picked = [prompts[i] for i in loop.take(args.rollout_batch_size)]  # this rank's; a group never spans ranks
        rows = [p for p in picked for _ in range(args.num_generations)]  # each with its columns, for the reward
        queries = [p.ids for p in rows]
        with phases.time("generate"):
            batch, lengths, ended = sample(model, tokenizer, queries, args.max_new_tokens, args.temperature,
                                           args.top_p, decode=args.decode)
        mask = batch["mask"]

        # 2. score: the reward (one scalar per response) and the logprobs the update compares against
        with phases.time("score"):
            response_ids = [r[:length].tolist() for r, length in zip(batch["responses"].cpu(), lengths.cpu())]
            scores, parts, texts = rewarder(rows, queries, response_ids, ended.cpu(), args.score_batch_size,
                                            state=TrainerState.of(loop))
            if variant.needs_old_logprobs:
                batch["logprobs"] = batch_logprobs(model, batch, args.temperature, "policy", args.score_batch_size)
            if variant.needs_ref_logprobs:
                batch["ref_logprobs"] = batch_logprobs(model, batch, args.temperature, None, args.score_batch_size)

        # 3. advantages (N, R), computed once for every group before any minibatch; NaN scores (no reward function
        # applies) get 0
        scores = scores.to(mask.device)
        batch["advantages"], stats = variant.advantages(scores, batch, args)
        # DAPO's overlong filtering: truncated responses count in their group's baseline but not in the loss
        batch["loss_mask"] = mask * ended[:, None].to(mask.dtype) if args.mask_truncated else mask

        # 4. update: --ppo-epochs over the rollout
        with phases.time("update"):
            stats |= update(model, batch, variant, eps_high, loop, args)
        phases.add_iteration(batch, policy, score_passes, [(policy, True, "policy")], args.ppo_epochs)

        # 5. log + save
        # the reward and each part over the samples they apply to (on every rank); unscored ones have none
        groups, reward_std = scores.view(-1, args.num_generations), nan_std(scores, 0).item()
        metrics = {k: sum(v) / len(v) for k, v in stats.items()} | {
            **part_means({"reward": scores}), **({"reward_std": reward_std} if math.isfinite(reward_std) else {}),
            **part_means(parts, "reward"),
            "frac_groups_tied": (nan_std(groups, 1) == 0).float().mean(), "response_length": lengths.float().mean(),
            "eos_frac": ended.float().mean(), "tokens": int(mask.sum())} | phases.metrics()
        metrics, extra = rewarder.take_logged(metrics)  # what reward functions sent through log_metric, log_extra
        if args.sample_every and step % args.sample_every == 0:
            k = args.num_generations  # the first prompt's group
            loop.log.samples([p.messages[-1]["content"] for p in rows[:k]], texts[:k], scores[:k].tolist(), "reward",
                             extra)
        loop.end_step(metrics)

    if not loop.interrupted:  # after a signal the checkpoint holds the run, for --resume
        M.save_model(model, tokenizer, args.out, adapter="policy")


if __name__ == "__main__":
    main(train, Args)
