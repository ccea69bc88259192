"""The critic-free stage: advantages, the loss and its aggregation by hand, no reference pass at β = 0, learning a
programmatic reward, exact resume, and the script end to end (4-bit, merged output, PEFT adapter)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from test_ppo import WORDS, tiny_actor
from test_reliability import run_straight_and_resumed

import train_grpo
from nanorlhf import rollout
from nanorlhf.cli import UserError


def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])  # two groups of k = 4
    # rloo: each minus the mean of the other three: 1 - 11/3, 2 - 10/3, 3 - 9/3, 6 - 2; a tied group gets 0
    torch.testing.assert_close(train_grpo.group_advantages(rewards, 4, "rloo"),
                               torch.tensor([-8 / 3, -4 / 3, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0]))
    # grpo: (r - 3) / std(1, 2, 3, 6) where the unbiased std is sqrt(14/3)
    std = math.sqrt(14 / 3)
    torch.testing.assert_close(train_grpo.group_advantages(rewards, 4, "grpo", "group"),
                               torch.tensor([-2 / std, -1 / std, 0.0, 3 / std, 0.0, 0.0, 0.0, 0.0]), atol=1e-4, rtol=1e-4)
    # scale none (Dr. GRPO): centred only; scale batch: by the std of all eight rewards
    torch.testing.assert_close(train_grpo.group_advantages(rewards, 4, "grpo", "none"),
                               torch.tensor([-2.0, -1.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(train_grpo.group_advantages(rewards, 4, "grpo", "batch"),
                               torch.tensor([-2.0, -1.0, 0.0, 3.0, 0, 0, 0, 0]) / (rewards.std() + 1e-4))
    assert train_grpo.group_advantages(torch.full((6,), 0.7), 3, "grpo").eq(0).all()  # equal rewards: no signal


def test_unscored_responses_stay_out_of_every_baseline_hand_computed():
    """NaN: no reward function applies (TRL >= 1.6). It is in no mean or std and gets advantage 0; so does a group's one
    scored response (nothing to measure it against) and every response of a group with none scored."""
    nan = float("nan")
    rewards = torch.tensor([1.0, nan, 3.0, 5.0, nan, 2.0, nan, nan, nan, nan, nan, nan])  # three groups of k = 4
    # grpo: group 0 is (1, 3, 5), mean 3, std 2; group 1 has one scored response; group 2 none
    torch.testing.assert_close(train_grpo.group_advantages(rewards, 4, "grpo", "group", eps=0.0),
                               torch.tensor([-1.0, 0, 0, 1.0] + [0.0] * 8))
    # rloo: each minus the mean of its two scored siblings: 1 - 4, 3 - 3, 5 - 2
    torch.testing.assert_close(train_grpo.group_advantages(rewards, 4, "rloo"),
                               torch.tensor([-3.0, 0, 0, 3.0] + [0.0] * 8))
    # batch: the std of the four scored rewards 1, 3, 5, 2 (mean 2.75, squares 3.0625 + 0.0625 + 5.0625 + 0.5625)
    std = math.sqrt(8.75 / 3)
    torch.testing.assert_close(train_grpo.group_advantages(rewards, 4, "grpo", "batch", eps=0.0),
                               torch.tensor([-2 / std, 0, 0, 2 / std] + [0.0] * 8))
    # the std on its own: unbiased over the scored entries, NaN below two
    torch.testing.assert_close(train_grpo.nan_std(rewards.view(3, 4), 1), torch.tensor([[2.0], [nan], [nan]]),
                               equal_nan=True)


def test_reinforce_pp_leaves_unscored_responses_out():
    """A NaN score: advantage 0 on its tokens, and the whitening is over the scored response's tokens alone."""
    scores, mask = torch.tensor([1.0, float("nan")]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    out, _ = train_grpo.reinforce_pp_token_advantages(scores, {"mask": mask}, train_grpo.Args(advantage="reinforce++"))
    # returns 1, 1, 1 (γ = 1, β = 0) on row 0 alone: whitened to 0 (a constant), and row 1 is 0
    torch.testing.assert_close(out, torch.zeros(2, 3))
    scores, mask = torch.tensor([2.0, float("nan"), -1.0]), torch.tensor([[1, 1], [1, 1], [1, 0]])
    out, _ = train_grpo.reinforce_pp_token_advantages(scores, {"mask": mask}, train_grpo.Args(advantage="reinforce++"))
    returns = torch.tensor([2.0, 2.0, -1.0])  # rows 0 and 2's tokens
    expected = (returns - returns.mean()) / returns.std()
    torch.testing.assert_close(out, torch.tensor([[expected[0], expected[1]], [0.0, 0.0], [expected[2], 0.0]]),
                               atol=1e-5, rtol=1e-5)


def test_rloo_kl_is_in_the_reward_before_the_baseline():
    # Ahmadian et al. 2024 §3: r - β·Σ_t log π/π_ref, then leave-one-out. β = 0.5; the padding (9.0) must not count.
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0])
    logprobs = torch.tensor([[-1.0, -1.0, 9.0], [-1.0, 9.0, 9.0], [-2.0, -2.0, -3.0], [0.0, 0.0, 9.0]])
    ref = torch.tensor([[-1.5, -1.5, 0.0], [-3.0, 0.0, 0.0], [-2.0, -2.0, -2.0], [-1.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]])
    # sequence KLs 1, 2, -1, 2 -> rewards 0.5, 1, 3.5, 5 -> each minus the mean of the other three
    rewards = train_grpo.rloo_rewards(scores, logprobs, ref, mask, 0.5)
    torch.testing.assert_close(rewards, torch.tensor([0.5, 1.0, 3.5, 5.0]))
    torch.testing.assert_close(train_grpo.group_advantages(rewards, 4, "rloo"),
                               torch.tensor([0.5 - 9.5 / 3, 1.0 - 3.0, 3.5 - 6.5 / 3, 5.0 - 5 / 3]))


def test_rloo_training_puts_the_kl_in_the_reward_not_the_loss(actor_dir, tmp_path, monkeypatch):
    """RLOO at β > 0 with one update per iteration (μ = 1, one minibatch): at the second iteration (the adapter has
    moved, so π ≠ π_ref) the advantages are the leave-one-out ones of score - β·Σ_t (old - ref) logprobs, recomputed
    here from the reward function's own outputs, and the loss gets no KL term."""
    (tmp_path / "rloo_probe.py").write_text("SCORES = []\n\ndef reward(prompts, responses):\n"
                                            "    SCORES.extend(float(len(r) % 5) for r in responses)\n"
                                            "    return SCORES[-len(responses):]\n")
    monkeypatch.chdir(tmp_path)
    seen, betas = [], []
    real_minibatches, real_loss = train_grpo.minibatches, train_grpo.grpo_loss
    monkeypatch.setattr(train_grpo, "minibatches", lambda data, size: (seen.append(dict(data)),
                                                                         real_minibatches(data, size))[1])
    monkeypatch.setattr(train_grpo, "grpo_loss", lambda *a: (betas.append(a[7]), real_loss(*a))[1])  # a[7]: β
    beta, k = 0.3, 4
    train_grpo.train(make_args(tmp_path, actor_dir, reward_fn="rloo_probe:reward", advantage="rloo", beta=beta,
                               max_steps=2, num_generations=k, out=str(tmp_path / "rloo")))
    import rloo_probe
    data = seen[1]
    scores = torch.tensor(rloo_probe.SCORES[len(data["mask"]):])  # the second iteration's
    kl = ((data["logprobs"] - data["ref_logprobs"]) * data["mask"]).sum(1)
    assert len(seen) == 2 and kl.abs().min() > 1e-4  # the KL is there to be accounted for
    r = (scores - beta * kl).view(-1, k)
    expected = (r - (r.sum(1, keepdim=True) - r) / (k - 1)).view(-1)  # r_i - mean of the other k-1
    torch.testing.assert_close(data["advantages"][:, 0], expected, atol=1e-5, rtol=1e-5)
    assert betas and all(b == 0.0 for b in betas)


def test_reinforce_pp_hand_computed():
    scores = torch.tensor([1.0, -1.0])
    logprobs, ref = torch.tensor([[-1.0, -2.0, -1.0], [-1.0, 0.0, 0.0]]), torch.tensor([[-1.5, -2.0, -2.0], [-2.0, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # rewards (β = 0.1, k1): row 0: -0.05, 0, -0.1 + 1; row 1: -0.1 - 1. Returns to the end: 0.85, 0.9, 0.9; -1.1
    returns = torch.tensor([0.85, 0.9, 0.9, -1.1])
    expected = (returns - returns.mean()) / returns.std()
    out = train_grpo.reinforce_pp_advantages(scores, logprobs, ref, mask, 0.1)
    torch.testing.assert_close(out[mask.bool()], expected, atol=1e-5, rtol=1e-5)
    assert out[~mask.bool()].eq(0).all()


@pytest.mark.parametrize("advantage, beta, updates, expected", [
    ("grpo", 0.1, 1, (False, True, 0.1)),        # one update on fresh samples: old = new, detached; KL in the loss
    ("grpo", 0.0, 2, (True, False, 0.0)),        # a second update needs the ratio's denominator
    ("rloo", 0.1, 1, (True, True, 0.0)),         # the KL is in the reward: old logprobs, no β in the loss
    ("rloo", 0.0, 1, (False, False, 0.0)),
    ("reinforce++", 0.1, 1, (True, True, 0.0)),
    ("reinforce++", 0.0, 2, (True, False, 0.0))])
def test_variant_is_resolved_once_from_the_flags(advantage, beta, updates, expected):
    variant = train_grpo.resolve_variant(train_grpo.Args(advantage=advantage, beta=beta), updates)
    assert (variant.needs_old_logprobs, variant.needs_ref_logprobs, variant.loss_beta) == expected


@pytest.mark.parametrize("loss_type, level, warned", [
    ("dapo", "sequence", True), ("dr_grpo", "sequence", True), ("grpo", "sequence", False), ("dapo", "token", False)])
def test_gspo_with_a_token_sum_aggregation_is_warned_about(capsys, loss_type, level, warned):
    """GSPO's ratio is one per response, on each of its tokens: dapo and dr_grpo sum those tokens, so the response
    weighs by its length, not as GSPO's per-response objective; TRL warns, and so do we (once, before the loop)."""
    train_grpo.resolve_variant(train_grpo.Args(loss_type=loss_type, importance_sampling_level=level), 1)
    err = capsys.readouterr().err
    assert err.startswith(f"warning: --importance-sampling-level sequence with --loss-type {loss_type}: ") == warned
    assert ("GSPO's objective (Zheng et al. 2025) is one term per response, --loss-type grpo" in err) == warned


def test_reinforce_pp_without_logprob_passes_is_the_score_alone():
    """β = 0 and one update: neither pass ran, and the advantages are the whitened score-to-go of each token."""
    scores, mask = torch.tensor([1.0, -1.0]), torch.tensor([[1, 1, 1], [1, 0, 0]])
    args = train_grpo.Args(advantage="reinforce++")
    out, stats = train_grpo.reinforce_pp_token_advantages(scores, {"mask": mask}, args)
    returns = torch.tensor([1.0, 1.0, 1.0, -1.0])  # the score on every token up to the end (γ = 1)
    torch.testing.assert_close(out[mask.bool()], (returns - returns.mean()) / returns.std(), atol=1e-5, rtol=1e-5)
    assert out[~mask.bool()].eq(0).all() and stats == {}


def test_grpo_loss_hand_computed_forward_and_backward():
    # ratios 1.5 (A = +1, clipped at 1 + ε_high = 1.3), 1.1 (A = +1, inside), 0.5 (A = -1, clipped at 0.8), padding
    logprobs = torch.log(torch.tensor([[1.5, 1.1, 0.5, 9.0]])).requires_grad_()
    old = torch.zeros(1, 4)
    advantages = torch.tensor([[1.0, 1.0, -1.0, 4.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    per_token, stats = train_grpo.grpo_loss(logprobs, old, advantages, mask, 0.2, 0.3)
    torch.testing.assert_close(per_token, torch.tensor([[-1.3, -1.1, 0.8, 0.0]]))
    assert stats["clipfrac/high"].item() == pytest.approx(1 / 3) and stats["clipfrac/low"].item() == pytest.approx(1 / 3)
    per_token.sum().backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, -1.1, 0.0, 0.0]]))  # d(-ratio·A)/dlogp = -ratio·A
    # β·k3 with ref = logprobs - 0.5 on token 0: k3 = e^-0.5 - 1 + 0.5
    logprobs = torch.zeros(1, 1, requires_grad=True)
    per_token, stats = train_grpo.grpo_loss(logprobs, torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), 0.2, 0.2,
                                            ref_logprobs=torch.full((1, 1), -0.5), beta=0.1)
    k3 = math.exp(-0.5) - 1 + 0.5
    assert per_token.item() == pytest.approx(0.1 * k3) and stats["kl"].item() == pytest.approx(k3)
    per_token.sum().backward()
    assert logprobs.grad.item() == pytest.approx(0.1 * (1 - math.exp(-0.5)))  # d k3 / d logp = 1 - ref/π


def test_gspo_sequence_ratio_hand_computed_forward_and_backward():
    """GSPO (Zheng et al. 2025): one ratio per response, exp of its tokens' mean log-ratio, clipped as a whole."""
    # response 0: log-ratios 0.1, 0.2, 0.3 -> s = e^0.2 = 1.2214 > 1 + ε = 1.2 with A = +1: clipped on all 3 tokens.
    # response 1: log-ratios -0.1, 0.0 and padding (9.0, must not count) -> s = e^-0.05 with A = -1: inside the clip.
    old = torch.zeros(2, 3)
    logprobs = torch.tensor([[0.1, 0.2, 0.3], [-0.1, 0.0, 9.0]], requires_grad=True)
    advantages, mask = torch.tensor([[1.0] * 3, [-1.0] * 3]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    per_token, stats = train_grpo.grpo_loss(logprobs, old, advantages, mask, 0.2, 0.2, level="sequence")
    s1 = math.exp(-0.05)
    torch.testing.assert_close(per_token, torch.tensor([[-1.2, -1.2, -1.2], [s1, s1, 0.0]]))
    assert stats["clipfrac/high"].item() == pytest.approx(3 / 5) and stats["clipfrac/low"].item() == 0.0
    per_token.sum().backward()
    # clipped: no gradient; inside: the sum holds -s·A = s twice (|y| = 2), and ds/dlogp_t = s/2, so 2·s/2 = s
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 0.0, 0.0], [s1, s1, 0.0]]))
    # the token level clips token by token instead: e^0.1 is inside, e^0.2 and e^0.3 are clipped
    token, _ = train_grpo.grpo_loss(logprobs.detach(), old, advantages, mask, 0.2, 0.2)
    torch.testing.assert_close(token[0], torch.tensor([-math.exp(0.1), -1.2, -1.2]))


def test_gspo_and_token_ratio_agree_at_the_first_update():
    """π = π_old: both levels give ratio exactly 1, so the same loss and gradient under every aggregation."""
    g = torch.Generator().manual_seed(0)
    logprobs = torch.randn(3, 4, generator=g) - 2
    advantages = torch.tensor([0.5, -1.0, 2.0])[:, None].expand(3, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    for loss_type in ("grpo", "dr_grpo", "dapo"):
        grads = []
        for level in ("token", "sequence"):
            lp = logprobs.clone().requires_grad_()
            per_token, _ = train_grpo.grpo_loss(lp, lp.detach(), advantages, mask, 0.2, 0.2, level=level)
            torch.testing.assert_close(per_token, -advantages * mask)  # ratio 1 everywhere
            train_grpo.aggregate(per_token, mask, loss_type, 3, 7, 4).backward()
            grads.append(lp.grad)
        torch.testing.assert_close(grads[0], grads[1])


def test_kl_terms_value_and_gradient_directions():
    """Exact expectations over a 6-token vocabulary, π = softmax(θ): the k3 term's value (the logged `kl`) is
    KL(π‖π_ref), its on-policy gradient is ∇KL(π_ref‖π) (GRPO eq. 3); k2's gradient is ∇KL(π‖π_ref), k1's is 0."""
    g = torch.Generator().manual_seed(0)
    theta, ref = torch.randn(6, generator=g, requires_grad=True), torch.log_softmax(torch.randn(6, generator=g), 0)

    def grad(f):
        theta.grad = None
        f().backward()
        return theta.grad.clone()

    def expected_term(kind):  # Σ_y π(y) (sampling weight, not differentiated) · term(y)
        logp = torch.log_softmax(theta, 0)
        if kind == "k3":  # through the stage's own loss, A = 0 and β = 1: per token exactly k3
            per_token, stats = train_grpo.grpo_loss(logp[None], logp[None].detach(), torch.zeros(1, 6), torch.ones(1, 6),
                                                    0.2, 0.2, ref[None], beta=1.0)
            return (logp.exp().detach() * per_token[0]).sum()
        return (logp.exp().detach() * rollout.kl_penalty(logp, ref, kind)).sum()

    forward = lambda: (torch.softmax(theta, 0) * (torch.log_softmax(theta, 0) - ref)).sum()  # KL(π‖π_ref)
    reverse = lambda: (ref.exp() * (ref - torch.log_softmax(theta, 0))).sum()               # KL(π_ref‖π)
    assert expected_term("k3").item() == pytest.approx(forward().item(), rel=1e-5)
    torch.testing.assert_close(grad(lambda: expected_term("k3")), grad(reverse))
    assert not torch.allclose(grad(reverse), grad(forward), atol=1e-3)  # the two directions differ here
    torch.testing.assert_close(grad(lambda: expected_term("k2")), grad(forward))
    torch.testing.assert_close(grad(lambda: expected_term("k1")), torch.zeros(6), atol=1e-6, rtol=0)


@pytest.mark.parametrize("loss_type, expected", [
    ("grpo", (1.0 + 2.0 + 6.0) / 3),        # mean over responses of each one's token mean: 3/3, 2/1, 18/3
    ("rloo", (3.0 + 2.0 + 18.0) / 3),          # mean over responses of each one's token sum
    ("dr_grpo", (3.0 + 2.0 + 18.0) / (3 * 4)),  # token sum / (responses × max_new_tokens = 4)
    ("dapo", (3.0 + 2.0 + 18.0) / 7),          # token sum / tokens
])
def test_loss_aggregation_hand_computed_and_split_invariant(loss_type, expected):
    per_token = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, 0.0], [6.0, 6.0, 6.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 1]])
    whole = train_grpo.aggregate(per_token * mask, mask, loss_type, 3, 7, 4)
    assert whole.item() == pytest.approx(expected)
    # micro-batches of 2 + 1 responses sum to the same loss: gradient accumulation equals one big minibatch
    parts = [train_grpo.aggregate((per_token * mask)[s], mask[s], loss_type, 3, 7, 4) for s in (slice(0, 2), slice(2, 3))]
    assert sum(p.item() for p in parts) == pytest.approx(expected)


def test_rloo_aggregates_as_rloos_estimator_hand_computed():
    """RLOO's gradient (Ahmadian et al. 2024, eq. 7) at ratio 1 is -(1/k) Σ_i A_i Σ_t ∇log π(y_t): every token of
    response i gets -A_i/k, whatever its length, and --advantage rloo aggregates so unless told otherwise. GRPO's token
    mean, asked for explicitly, gives -A_i/(k·|y_i|): the length weighting RLOO does not have."""
    # k = 2 responses of 1 and 4 tokens with rewards 1 and 0: leave-one-out advantages +1 and -1
    advantages = train_grpo.group_advantages(torch.tensor([1.0, 0.0]), 2, "rloo")
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]])

    def grad(**flags):
        variant = train_grpo.resolve_variant(train_grpo.Args(advantage="rloo", **flags), 1)
        logprobs = torch.full((2, 4), -1.0, requires_grad=True)
        per_token, _ = train_grpo.grpo_loss(logprobs, logprobs.detach(), train_grpo.on_tokens(advantages, mask),
                                            mask, 0.2, 0.2)
        train_grpo.aggregate(per_token, mask, variant.loss_type, 2, 5, 4).backward()
        return logprobs.grad

    torch.testing.assert_close(grad(), torch.tensor([[-0.5, 0, 0, 0], [0.5, 0.5, 0.5, 0.5]]))  # -A_i / k
    torch.testing.assert_close(grad(loss_type="grpo"), torch.tensor([[-0.5, 0, 0, 0], [0.125] * 4]))  # / |y_i| too
    torch.testing.assert_close(grad(loss_type="dr_grpo"), grad() / 4)  # RLOO's over --max-new-tokens (here 4)
    assert train_grpo.resolve_variant(train_grpo.Args(), 1).loss_type == "grpo"  # GRPO's own default is unchanged


@pytest.fixture(scope="module")
def actor_dir(tokenizer, tmp_path_factory):
    return tiny_actor(tokenizer, tmp_path_factory.mktemp("actor"))


def make_args(tmp_path, actor, **kw):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something {i}."}) + "\n" for i in range(32)))
    defaults = dict(model=actor, data=str(prompts), out=str(tmp_path / "grpo"), rollout_batch_size=4,
                    num_generations=4, max_new_tokens=6, temperature=1.0, lr=3e-3, lora_r=8, lora_alpha=16,
                    max_steps=2, sample_every=0, log_every=100)
    return train_grpo.Args(**(defaults | kw))


def test_the_update_asks_for_the_entropy_without_its_gradient(actor_dir, tmp_path, moon_reward, monkeypatch):
    """GRPO's loss never holds the entropy, which is only logged: the update's pass returns it without a gradient,
    so the kernel forms no entropy-gradient tiles (tests/test_kernels.py), and the entropy is still logged."""
    real, seen = train_grpo.response_logprobs, []

    def spy(*a, **kw):
        out = real(*a, **kw)
        seen.append(out[1].requires_grad)
        return out
    monkeypatch.setattr(train_grpo, "response_logprobs", spy)
    args = make_args(tmp_path, actor_dir, reward_fn=moon_reward, max_steps=1, batch_size=8)
    train_grpo.train(args)
    assert seen == [False, False]  # 16 responses, 8 a forward
    (row,) = [json.loads(line) for line in open(os.path.join(args.out, "metrics.jsonl"))]
    assert row["entropy"] > 0


def test_beta_zero_runs_no_reference_pass(actor_dir, tmp_path, moon_reward, monkeypatch):
    calls = {}
    real = rollout.response_logprobs

    def counting(model, batch, temperature, adapter="policy", return_entropy=False):
        calls[adapter] = calls.get(adapter, 0) + 1
        return real(model, batch, temperature, adapter, return_entropy)
    monkeypatch.setattr(train_grpo, "response_logprobs", counting)  # the update's passes
    monkeypatch.setattr(rollout, "response_logprobs", counting)     # the scoring passes (rollout.batch_logprobs)
    train_grpo.train(make_args(tmp_path, actor_dir, reward_fn=moon_reward, out=str(tmp_path / "b0")))
    assert calls.get(None, 0) == 0 and calls["policy"] > 0
    calls.clear()
    train_grpo.train(make_args(tmp_path, actor_dir, reward_fn=moon_reward, out=str(tmp_path / "b1"), beta=0.1))
    assert calls[None] > 0  # with β > 0 the reference runs (adapters off)


def test_a_non_finite_reward_is_an_error_naming_the_function(actor_dir, tmp_path, monkeypatch):
    (tmp_path / "holes.py").write_text("def reward(prompts, responses):\n"
                                       "    values = [1.0, float('nan'), float('inf')]\n"
                                       "    return [values[i % 3] for i in range(len(responses))]\n")
    monkeypatch.chdir(tmp_path)
    args = make_args(tmp_path, actor_dir, reward_fn="holes:reward", rollout_batch_size=3, num_generations=2)
    with pytest.raises(UserError, match=r"^--reward-fn holes:reward returned NaN or inf for 4 of 6 responses"):
        train_grpo.train(args)
    assert not os.path.exists(os.path.join(args.out, "config.json"))


@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_grpo_learns_a_programmatic_reward(actor_dir, tmp_path, moon_reward, advantage):
    args = make_args(tmp_path, actor_dir, reward_fn=moon_reward, max_steps=30, advantage=advantage,
                     rollout_batch_size=4, num_generations=4, out=str(tmp_path / advantage))
    train_grpo.train(args)
    with open(os.path.join(args.out, "metrics.jsonl")) as f:
        reward = [json.loads(line)["reward"] for line in f]
    first, last = sum(reward[:3]) / 3, sum(reward[-5:]) / 5
    assert last > first + 1.0 and last > 2 * first, reward


def test_grpo_resume_gives_identical_losses(tiny_dir, tmp_path, monkeypatch):
    """The reward reads each row's `answer` column (TRL's contract) and checks it belongs to its prompt: columns
    travel with their prompts through the resumed data stream; the reward is not linear in it, so a column
    moved to another group would change the advantages."""
    # a module name of its own: an in-process import stays in sys.modules, and other tests' lengthy:reward differs
    (tmp_path / "answer_reward.py").write_text(
        "def reward(prompts, completions, answer, **kwargs):\n"
        "    assert all(p == f'Say {a}.' for p, a in zip(prompts, answer)), (prompts, answer)\n"
        "    return [len(c) % (a + 2) / 10 for c, a in zip(completions, answer)]\n")
    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}.", "answer": i}) + "\n" for i in range(12)))

    def make(out):  # two minibatches and two epochs: old logprobs, clipping and the stream all resume
        return train_grpo.Args(model=tiny_dir, data=str(prompts), out=out, max_steps=4, rollout_batch_size=2,
                               num_generations=3, minibatch_size=3, batch_size=3, ppo_epochs=2, max_new_tokens=4,
                               lr=1e-3, reward_fn="answer_reward:reward", sample_every=0, log_every=100, beta=0.05)

    straight, resumed = run_straight_and_resumed(monkeypatch, train_grpo, make, tmp_path)
    assert [s for s, _ in straight] == [1, 2, 3, 4] and straight == resumed


def test_grpo_script_4bit_writes_a_merged_model_and_adapter(actor_dir, tiny_rm_dir, tmp_path):
    peft = pytest.importorskip("peft")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about {w}."}) + "\n" for w in WORDS))
    out = tmp_path / "out"
    cmd = [sys.executable, "train_grpo.py", "--actor", actor_dir, "--rm", tiny_rm_dir, "--data", str(prompts),
           "--out", str(out), "--max-steps", "2", "--rollout-batch-size", "2", "--num-generations", "2",
           "--max-new-tokens", "4", "--sample-every", "1", "--load-in-4bit", "--beta", "0.1", "--ppo-epochs", "2"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--- prompt" in r.stdout
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [row["step"] for row in rows] == [1, 2]
    for key in ("reward", "reward/rm", "kl", "clipfrac/low", "clipfrac/high", "entropy", "loss", "grad_norm",
                "response_length", "eos_frac", "frac_groups_tied", "tokens_per_s", "peak_mem_gb",
                *[f"perf/{p}_{m}" for p in ("generate", "score", "update") for m in ("tokens", "tokens_per_s", "mfu")]):
        assert all(math.isfinite(row[key]) for row in rows), key
    assert all(row["perf/score_tokens"] == 3 * row["perf/generate_tokens"] for row in rows)  # old, ref and RM passes
    assert all(row["perf/update_tokens"] == 2 * row["perf/generate_tokens"] for row in rows)  # the policy, 2 epochs
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == 49152
    base = AutoModelForCausalLM.from_pretrained(actor_dir)
    peft.PeftModel.from_pretrained(base, out / "adapter")


def test_scoring_and_update_forwards_take_their_own_batch_sizes(actor_dir, tmp_path, moon_reward, monkeypatch):
    """--score-batch-size sets the rows of the scoring passes (old and reference logprobs over the whole rollout),
    --batch-size those of the update's; 16 responses, minibatches of 8, so old logprobs are needed."""
    rows = {"score": [], "update": []}
    real = rollout.response_logprobs

    def spy(where):
        def counting(model, batch, temperature, adapter="policy", return_entropy=False):
            rows[where].append(batch["mask"].shape[0])
            return real(model, batch, temperature, adapter, return_entropy)
        return counting
    monkeypatch.setattr(rollout, "response_logprobs", spy("score"))  # rollout.batch_logprobs
    monkeypatch.setattr(train_grpo, "response_logprobs", spy("update"))
    args = make_args(tmp_path, actor_dir, reward_fn=moon_reward, max_steps=1, beta=0.1, minibatch_size=8,
                     batch_size=2, score_batch_size=8)
    train_grpo.train(args)
    assert rows["score"] == [8] * 4  # old and reference passes, 16 rows at 8 per forward
    assert rows["update"] == [2] * 8
