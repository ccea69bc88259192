"""PPO from a reward model (Ziegler et al. 2019; Ouyang et al. 2022), with the implementation
details of the N+ reproduction (Huang et al. 2024, arXiv 2403.17031; docs/ppo-details.md).

One frozen base carries three roles: the actor (LoRA adapter `policy`), the reference (every
adapter disabled) and the critic (adapter `value` + a linear value head; with --critic head the
value head alone, reading the reference pass's hidden states). Each iteration is five steps in
train(), each a function or a few lines that name what they compute:

    1. rollout      sample responses to a batch of prompts, cut after the first EOS (`sample`)
    2. score        the old and reference logprobs and the values of every response token (`score_tokens`),
                    the score of each response; then reward = -β·KL(π‖π_ref) per token, plus the score on
                    the last token (`shape_rewards`)
    3. advantages   GAE (γ, λ) advantages and returns, advantages whitened (`advantages`)
    4. update       clipped policy and value losses over shuffled minibatches, --ppo-epochs times (`update`)
    5. log          one metrics dict; the Loop logs it and checkpoints

    python train_ppo.py --actor out/sft --rm out/rm --data data/hh_harmless.jsonl --out out/ppo
"""
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from nanorlhf import dist
from nanorlhf import model as M
from nanorlhf.cli import UserError, arg, main
from nanorlhf.data import load_prompts
from nanorlhf.engine import DECODE, DECODE_HELP, check_lengths
from nanorlhf.kernels import entropy_grad
from nanorlhf.lora import add_lora, use_adapter
from nanorlhf.loop import Loop, RunArgs, adamw, check_out, cosine_with_warmup, total_steps
from nanorlhf.model import load_policy
from nanorlhf.perf import Phases, shape
from nanorlhf.rewards import Rewarder, TrainerState, part_means
from nanorlhf.rollout import (KLController, batch_inputs, gae, kl_penalty, masked, masked_mean, masked_var,
                              micro_batches, minibatches, response_logprobs, response_slice, sample, shape_rewards,
                              whiten)


@dataclass
class Args(RunArgs):
    model: str = arg(M.DEFAULT_MODEL, "The actor to start from: an SFT output (train_sft.py --out) or any causal LM.",
                     alias="--actor")
    rm: list[str] = arg([], "Reward model folder (train_rm.py --out). Give it several times for a weighted sum.")
    rm_weight: list[float] = arg([], "Weight of each --rm in the composite score, in order (default 1 each).")
    reward_fn: list[str] = arg([], "Python reward 'module:function', called as TRL's GRPOTrainer calls one (prompts, "
                               "completions, completion_ids and the data's other columns as keyword lists, "
                               "trainer_state, log_metric, log_extra; an async def is awaited; None where it does not "
                               "apply) or, with a `responses` parameter and no `completions`, as f(prompts, "
                               "responses) on lists of strings (the last user message, the decoded response); added "
                               "to the RM scores, each logged as score/<its name>. For verifiable rewards.")
    reward_weight: list[float] = arg([], "Weight of each --reward-fn in the composite score, in order (default 1 "
                                     "each).")
    gold_reward_fn: str | None = arg(None, "A 'module:function' reward logged as `score/gold` beside the score PPO "
                                     "optimises, never optimised: with a known true reward it shows when the policy "
                                     "starts to exploit the RM (Gao et al. 2023).")
    critic: str = arg("adapter", "The critic: 'adapter', a LoRA adapter of its own on the actor's base and a linear "
                      "value head (N+); 'head', the value head alone, on the frozen base's final hidden states, "
                      "which the reference pass computes anyway. 'head' runs no critic forward or backward (a "
                      "third of an iteration's model FLOPs, and the value adapter's activations) for a linear "
                      "critic of fixed features.", choices=["adapter", "head"])
    critic_from_rm: bool = arg(False, "Start the critic from the first --rm (its weights, and its head scaled by "
                               "its --rm-weight) instead of a zero value head on the actor's base; the other --rm "
                               "models and --reward-fn are not in its start. Costs a second base in memory.")
    max_steps: int | None = arg(None, "PPO iterations; default: --epochs over the prompts.", gt=0)
    epochs: float = arg(1.0, "Passes over the prompts when --max-steps is not given.", gt=0)
    rollout_batch_size: int = arg(16, "Prompts sampled per iteration. 7B on 24 GB: 32-64.", gt=0)
    minibatch_size: int = arg(8, "Rollouts per optimizer step, run --batch-size at a time.", gt=0)
    batch_size: int | None = arg(None, "Sequences per forward pass of the update (and of scoring, unless "
                                 "--score-batch-size); default min(4, --minibatch-size).", gt=0)
    score_batch_size: int | None = arg(None, "Sequences per forward when scoring a rollout (old, reference, RM "
                                       "passes); default --batch-size. Scoring sorts the whole rollout by length, so "
                                       "it pads less than an update micro-batch and can take more rows "
                                       "(docs/benchmarks.md).", gt=0)
    ppo_epochs: int = arg(4, "Passes over each iteration's rollouts.", gt=0)
    lr: float = arg(1e-5, "Peak learning rate of policy and critic (LoRA; N+ uses 3e-6 for full fine-tuning); "
                    "cosine decay over every optimizer step after warmup.", gt=0)
    warmup: float = arg(0.03, "Warmup: a fraction of the optimizer steps if < 1, else a number of them.", ge=0)
    weight_decay: float = arg(0.0, "AdamW weight decay.", ge=0)
    max_grad_norm: float = arg(1.0, "Clip the policy's and the critic's gradient norms, each on its own, to this "
                               "(0 = no clipping).", ge=0)
    max_prompt_length: int = arg(256, "Max prompt tokens; longer prompts are skipped.", gt=0)
    max_new_tokens: int = arg(64, "Response length limit.", gt=0)
    temperature: float = arg(0.7, "Sampling temperature, used in every logprob pass too, so the KL and the ratio "
                             "compare the distributions sampled from.", gt=0)
    top_p: float = arg(1.0, "Nucleus sampling; < 1 makes logprobs differ from the sampling distribution.", gt=0)
    decode: str = arg("auto", DECODE_HELP, choices=DECODE)
    kl_coef: float = arg(0.05, "β, the per-token KL penalty coefficient (initial value when adaptive).", ge=0)
    target_kl: float | None = arg(None, "Adaptive β: steer the per-sequence KL towards this (Ziegler et al.).", gt=0)
    kl_horizon: int = arg(10000, "Horizon of the adaptive controller, in rollouts.", gt=0)
    kl_estimator: str = arg("k1", "Per-token KL estimator in the reward (Schulman 2020).", choices=["k1", "k2", "k3"])
    gamma: float = arg(1.0, "GAE discount γ.", ge=0)
    lam: float = arg(0.95, "GAE λ.", ge=0)
    whiten_rewards: bool = arg(False, "Whiten per-token rewards (scale only) before GAE.")
    cliprange: float = arg(0.2, "PPO policy ratio clip ε.", gt=0)
    cliprange_value: float = arg(0.2, "Value clip around the rollout's values.", gt=0)
    vf_coef: float = arg(0.1, "Value loss coefficient.", ge=0)
    entropy_coef: float = arg(0.0, "Entropy bonus coefficient (the seeds suggest 0.01).", ge=0)
    early_stop_kl: float | None = arg(None, "Stop an iteration's PPO epochs once mean approx-KL exceeds this.", gt=0)
    missing_eos: str = arg("none", "A response without EOS within --max-new-tokens: replace its score with "
                           "--missing-eos-value, subtract --missing-eos-penalty from it, or leave it (TRL's default). "
                           "A penalty helps only when most responses end in time (N+: summaries within 53 tokens); "
                           "otherwise PPO optimises the penalty, not the reward (a warning says so).",
                           choices=["replace", "subtract", "none"])
    missing_eos_value: float = arg(-1.0, "The score of a response without EOS under --missing-eos replace (N+ "
                                   "replaces with -1 on normalised scores).")
    missing_eos_penalty: float = arg(1.0, "Subtracted from the score of a response without EOS under --missing-eos "
                                     "subtract (TRL's missing_eos_penalty).", ge=0)
    sample_every: int = arg(10, "Print a prompt -> response -> score table every N iterations (0 = never).", ge=0)


def ppo_loss(logprobs, old_logprobs, values, old_values, advantages, returns, mask, cliprange, cliprange_value):
    """Clipped surrogate and clipped value loss (Schulman et al. 2017, eq. 7; value clip as in PPO2).

    All inputs (B, R); mask is 1 on real response tokens. Returns (pg_loss, vf_loss, stats).
    """
    log_ratio = masked(logprobs - old_logprobs, mask)  # padding: ratio 1, never exp(garbage)
    ratio = torch.exp(log_ratio)
    pg_losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange))
    pg_loss = masked_mean(pg_losses, mask)
    values_clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    vf_losses = torch.max((values - returns) ** 2, (values_clipped - returns) ** 2)
    vf_loss = 0.5 * masked_mean(vf_losses, mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((pg_losses > -advantages * ratio).float(), mask),
                 "vf_clipfrac": masked_mean(((values_clipped - returns) ** 2 > (values - returns) ** 2).float(), mask),
                 "approx_kl": masked_mean(0.5 * log_ratio ** 2, mask)}
    return pg_loss, vf_loss, stats


def missing_eos_scores(scores, ended, args):
    """Scores (B,) with responses that never emitted EOS (ended False) penalised (docs/ppo-details.md §3):
    replaced by --missing-eos-value, or lowered by --missing-eos-penalty (>= 0), or left as they are."""
    if args.missing_eos == "replace":
        return torch.where(ended, scores, torch.full_like(scores, args.missing_eos_value))
    if args.missing_eos == "subtract":
        return torch.where(ended, scores, scores - args.missing_eos_penalty)
    return scores.clone()


def critic_values(critic, value_head, batch):
    """(B, R) values V(s_t) of the states before each response token: the `value` adapter + head, or with
    --critic head (critic None) the head on the reference pass's hidden states, batch["features"] (B, R, H)."""
    if critic is None:
        hidden = batch["features"]
    else:
        input_ids, attention_mask, _ = batch_inputs(batch)
        with use_adapter(critic, "value"):
            hidden = response_slice(M.hidden_states(critic, input_ids, attention_mask), batch)  # (B, R, H)
    return value_head(hidden.float()).squeeze(-1)


@torch.no_grad()
def score_tokens(model, critic, value_head, data, args):
    """Old logprobs and entropy (policy), reference logprobs (adapters off), values (critic): each (B, R), 0 on
    padding, all at the sampling temperature so the KL and the PPO ratio compare like with like. With --critic head
    (critic None) also the reference pass's hidden states (B, R, H) the values came from, else None."""
    out = [torch.zeros_like(data["mask"], dtype=torch.float) for _ in range(4)]
    features = None
    for idx, c in micro_batches(data, args.score_batch_size):
        logprobs, entropy = response_logprobs(model, c, args.temperature, "policy", return_entropy=True)
        ref_logprobs, hidden = response_logprobs(model, c, args.temperature, adapter=None, return_hidden=True)
        if critic is None:  # --critic head reads these (B, R, H) features
            c["features"] = hidden
            if features is None:
                features = hidden.new_zeros(*data["mask"].shape, hidden.shape[-1])
            features[idx, :hidden.shape[1]] = hidden
        for t, x in zip(out, (logprobs, entropy, ref_logprobs, critic_values(critic, value_head, c))):
            t[idx, :x.shape[1]] = x
    return (*out, features)


def make_critic(model, rewarder, args):
    """(critic model, value head): the `value` adapter on the actor's base with a zero head (it starts predicting
    0), or with --critic-from-rm a second base from the first RM, its score head turned into the value head
    (N+ and TRL do this: the critic starts knowing what the reward rewards), scaled as that RM is in the score.
    With --critic head: (None, a zero head), which reads the reference pass's hidden states."""
    device = next(model.parameters()).device
    if not args.critic_from_rm:
        if args.critic == "adapter":
            add_lora(model, args.lora_r, args.lora_alpha, name="value")
        value_head = nn.Linear(model.config.hidden_size, 1).to(device)
        nn.init.zeros_(value_head.weight)
        nn.init.zeros_(value_head.bias)
        return (model if args.critic == "adapter" else None), value_head
    if not rewarder.same_tokenizer(0):  # the critic reads the actor's token ids
        raise UserError(f"--critic-from-rm: --rm {args.rm[0]} has another tokenizer or chat template than the "
                        "actor, so it cannot read the actor's tokens; drop --critic-from-rm")
    critic = load_policy(args, name=args.rm[0], flag="--rm", kind="reward", adapter="value")[0]
    score = critic.score
    value_head = nn.Linear(score.in_features, 1).to(device)
    mean, std = getattr(critic.config, "reward_mean", 0.0), getattr(critic.config, "reward_std", 1.0)
    weight = rewarder.rms[0][2]  # its --rm-weight: the share of the composite score this RM contributes
    with torch.no_grad():  # w·(score - mean) / std, this RM's part of the score PPO's rewards are made of
        value_head.weight.copy_(score.weight.float() * weight / std)
        value_head.bias.fill_(-mean * weight / std)
    score.requires_grad_(False)
    return critic, value_head


def advantages(rewards, values, mask, args):
    """3. GAE (Schulman et al. 2016, eq. 16) on the response tokens, the advantages whitened over the batch (every
    rank's under torchrun); rewards, values, mask (B, R). Returns advantages, returns: (B, R)."""
    if args.whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae(rewards, values, mask, args.gamma, args.lam)
    return whiten(advantages, mask), returns


def update(model, critic, value_head, batch, loop, args):
    """4. --ppo-epochs passes of minibatches of --minibatch-size rollouts, --batch-size per forward; each loss
    is the token mean over its minibatch. batch: the rollout with the old logprobs, values, advantages and returns
    (B, R) of steps 2 and 3. Returns lists of per-micro-batch and per-step stats."""
    stats = {}
    for epoch in range(args.ppo_epochs):
        epoch_kl = []
        for mb in minibatches(batch, args.minibatch_size):
            n_tokens = dist.all_sum(mb["mask"].sum())  # every rank's minibatch: one process's, split
            for _, micro in micro_batches(mb, args.batch_size):
                with entropy_grad(args.entropy_coef > 0):  # its gradient only when the bonus is in the loss
                    logprobs, entropy = response_logprobs(model, micro, args.temperature, "policy", True)
                values = critic_values(critic, value_head, micro)
                pg_loss, vf_loss, s = ppo_loss(logprobs, micro["logprobs"], values, micro["values"],
                                               micro["advantages"], micro["returns"], micro["mask"], args.cliprange,
                                               args.cliprange_value)
                loss = pg_loss + args.vf_coef * vf_loss - args.entropy_coef * masked_mean(entropy, micro["mask"])
                (loss * micro["mask"].sum() / n_tokens).backward()
                s |= {"pg_loss": pg_loss.detach(), "vf_loss": vf_loss.detach(), "loss": loss.detach()}
                for k, v in s.items():
                    stats.setdefault(k, []).append(float(v))
                epoch_kl.append(float(s["approx_kl"]))
            for k, v in loop.optimizer_step().items():
                stats.setdefault(k, []).append(v)
        stats.setdefault("ppo_epochs_run", []).append(epoch + 1)
        if args.early_stop_kl and dist.all_sum(sum(epoch_kl)) / dist.all_sum(len(epoch_kl)) > args.early_stop_kl:
            break  # every rank sees the same mean, so all stop together
    return stats


def train(args):
    if not args.lora_r:
        raise UserError("--lora-r 0: PPO shares one frozen base between actor, reference and critic; it needs LoRA")
    if args.batch_size is None:
        args.batch_size = min(4, args.minibatch_size)
    args.score_batch_size = args.score_batch_size or args.batch_size
    if args.minibatch_size % args.batch_size or args.rollout_batch_size % args.minibatch_size:
        raise UserError("--rollout-batch-size must be a multiple of --minibatch-size, and that of --batch-size")
    if args.critic_from_rm and not args.rm:
        raise UserError("--critic-from-rm starts the critic from the first --rm; give one (--rm FOLDER)")
    if args.critic_from_rm and args.critic == "head":
        raise UserError("--critic-from-rm starts an adapter critic from the RM's weights; --critic head has none")
    check_lengths(M.load_config(args.model, "--actor"), args.max_prompt_length, args.max_new_tokens)
    check_out(args)
    torch.manual_seed(args.seed)
    model, tokenizer = load_policy(args, flag="--actor", adapter="policy")
    rewarder = Rewarder(tokenizer, args.rm, args.rm_weight, args.reward_fn, args.gold_reward_fn, args.reward_weight,
                        unscored="so they score 0", device=args.device, dtype=args.dtype,
                        load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit, compile=args.compile)
    critic, value_head = make_critic(model, rewarder, args)
    for m in (model, critic):  # LoRA's dropout too: with any dropout the ratio is not 1 at the first update
        if m is not None:  # --critic head has no critic model
            M.disable_dropout(m)
    prompts = load_prompts(args.data, tokenizer, args.max_prompt_length, args.format, args.limit,
                           flag="--max-prompt-length")
    kl_ctl = KLController(args.kl_coef, args.target_kl, args.kl_horizon)
    # The optimizer: policy and critic are a param group each, so each is clipped on its own (the critic's large
    # early gradients must not set the policy's step) and could take its own lr. The schedule counts every update.
    policy_params = [p for n, p in model.named_parameters() if ".policy." in n]
    critic_params = [p for n, p in critic.named_parameters() if ".value." in n] if critic is not None else []
    critic_params += list(value_head.parameters())
    optimizer = adamw([{"params": policy_params, "name": "policy"}, {"params": critic_params, "name": "critic"}],
                      args.optim, lr=args.lr, weight_decay=args.weight_decay)
    steps = total_steps(args.max_steps, args.epochs, len(prompts), args.rollout_batch_size)
    updates = args.ppo_epochs * (args.rollout_batch_size // args.minibatch_size)
    scheduler = LambdaLR(optimizer, cosine_with_warmup(steps * updates, args.warmup))
    modules = {"model": model, "value_head": value_head} | ({"critic": critic} if critic not in (model, None) else {})
    loop = Loop(args, modules, optimizer, scheduler, len(prompts), steps, args.max_grad_norm, stateful={"kl": kl_ctl})
    device = next(model.parameters()).device
    phases = Phases(device, M.pick_dtype(device, args.dtype))  # MFU against the peak in the compute dtype
    # Each pass of an iteration as (Shape, with the lm_head, adapter), for its tokens and model FLOPs: the critic's
    # (none with --critic head, whose head alone is 2·H FLOPs a token) beside the policy's, the reference, each RM
    policy = shape(model)
    critic_passes = [(shape(critic), False, "value")] if critic is not None else []
    score_passes = [(policy, True, "policy"), (policy, True, None), *critic_passes,
                    *[(shape(rm), False, None) for rm, _, _ in rewarder.rms]]
    train_passes = [(policy, True, "policy"), *critic_passes]
    warned_eos = False

    for step in loop:
        # 1. rollout: one response to each of this rank's prompts, cut after the first EOS
        picked = [prompts[i] for i in loop.take(args.rollout_batch_size)]  # this rank's share
        queries = [p.ids for p in picked]
        with phases.time("generate"):
            batch, lengths, ended = sample(model, tokenizer, queries, args.max_new_tokens, args.temperature, args.top_p,
                                           decode=args.decode)
        mask = batch["mask"]

        # 2. score: per token (B, R) what the update compares against; per response (B,) the score (RMs and/or
        # reward functions, then the missing-EOS rule); then the rewards (B, R), -β·KL everywhere and the score on
        # the last real token (Ziegler et al. 2019, eq. 2)
        with phases.time("score"):
            batch["logprobs"], entropy, batch["ref_logprobs"], batch["values"], features = score_tokens(
                model, critic, value_head, batch, args)
            if features is not None:  # --critic head: the value head's inputs, fixed for this iteration
                batch["features"] = features
            response_ids = [r[:length].tolist() for r, length in zip(batch["responses"].cpu(), lengths.cpu())]
            scores_raw, parts, texts = rewarder(picked, queries, response_ids, ended.cpu(), args.score_batch_size,
                                                state=TrainerState.of(loop))
            scores_raw = scores_raw.nan_to_num(nan=0.0)  # no reward function applies (the warning counts them)
            scores = missing_eos_scores(scores_raw, ended.cpu(), args)
            rewards = shape_rewards(scores.to(mask.device), batch["logprobs"], batch["ref_logprobs"], mask,
                                    kl_ctl.value, args.kl_estimator)
            batch["advantages"], batch["returns"] = advantages(rewards, batch["values"], mask, args)  # 3. GAE

        # 4. update: --ppo-epochs over the rollout
        with phases.time("update"):
            stats = update(model, critic, value_head, batch, loop, args)
        phases.add_iteration(batch, policy, score_passes, train_passes, stats["ppo_epochs_run"][-1])

        # 5. log + save; the KL controller sees this iteration's mean sequence KL over every rank
        kl = dist.all_sum(masked(kl_penalty(batch["logprobs"], batch["ref_logprobs"], "k1"), mask).sum(1).mean().item())
        kl /= dist.world()  # every rank's mean over an equal share: the global mean
        kl_ctl.update(kl, args.rollout_batch_size * dist.world())
        residual_var = masked_var(batch["returns"] - batch["values"], mask)
        metrics = {k: sum(v) / len(v) for k, v in stats.items() if k != "ppo_epochs_run"} | {
            "score": scores.mean(), "score_raw": scores_raw.mean(), "kl": kl, "kl_coef": kl_ctl.value,
            **part_means(parts, "score"),
            "entropy": masked_mean(entropy, mask), "response_length": lengths.float().mean(),
            "eos_frac": ended.float().mean(), "ppo_epochs_run": stats["ppo_epochs_run"][-1],
            "explained_variance": 1 - residual_var / masked_var(batch["returns"], mask),
            "tokens": int(mask.sum())} | phases.metrics()
        metrics, extra = rewarder.take_logged(metrics)  # what reward functions sent through log_metric, log_extra
        if args.missing_eos != "none" and metrics["eos_frac"] < 0.5 and not warned_eos:
            warned_eos = True
            loop.log.write(f"warning: only {metrics['eos_frac']:.0%} of responses ended with EOS within "
                           f"--max-new-tokens {args.max_new_tokens}, so --missing-eos {args.missing_eos} sets most "
                           "scores; raise --max-new-tokens or pass --missing-eos none")
        if args.sample_every and step % args.sample_every == 0:
            loop.log.samples([p.messages[-1]["content"] for p in picked[:3]], texts[:3], scores[:3].tolist(),
                             extra=extra)
        loop.end_step(metrics)

    if not loop.interrupted:  # after a signal the checkpoint holds the run, for --resume
        M.save_model(model, tokenizer, args.out, adapter="policy")


if __name__ == "__main__":
    main(train, Args)
