import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, tiny_llama

import train_ppo
from nanorlhf import engine
from nanorlhf import model as M
from nanorlhf import rollout
from nanorlhf.lora import add_lora, lora_layers
from nanorlhf.rollout import KLController, gae, minibatches, whiten

WORDS = [" the", " cat", " dog", " red", " blue", " sun", " tree", " fish", " bird", " car", " book", " milk",
         " rain", " king", " moon", " star"]


def lengths_mask(lengths, R):
    return (torch.arange(R)[None] < torch.tensor(lengths)[:, None]).long()


def gae_loop(rewards, values, gamma, lam):
    """GAE for one episode, written as the textbook recursion over plain Python floats."""
    advantages, last = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(values) else 0.0
        last = rewards[t] + gamma * next_value - values[t] + gamma * lam * last
        advantages[t] = last
    return advantages, [a + v for a, v in zip(advantages, values)]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.5), (1.0, 0.0)])
def test_gae_matches_python_loop(gamma, lam):
    g = torch.Generator().manual_seed(int(gamma * 100 + lam * 10))
    lengths = [7, 3, 1, 5]
    rewards, values = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    mask = lengths_mask(lengths, 7)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        adv, ret = gae_loop(rewards[b, :n].tolist(), values[b, :n].tolist(), gamma, lam)
        torch.testing.assert_close(advantages[b, :n], torch.tensor(adv))
        torch.testing.assert_close(returns[b, :n], torch.tensor(ret))
        assert advantages[b, n:].eq(0).all() and returns[b, n:].eq(0).all()


def test_whiten_uses_only_masked_positions():
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 5.0, -50.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    valid = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    expected = (valid - valid.mean()) / valid.std()  # unbiased, as masked_var
    out = whiten(x, mask)
    torch.testing.assert_close(out[mask.bool()], expected, atol=1e-6, rtol=1e-6)
    assert out[~mask.bool()].eq(0).all()
    torch.testing.assert_close(whiten(x, mask, shift_mean=False)[mask.bool()], expected + 3.0, atol=1e-6, rtol=1e-6)


def test_minibatches_visit_each_sample_once_per_epoch():
    """PPO's and GRPO's update: each epoch's shuffled minibatches of the rollout batch cover every row once, and a
    row's tensors stay together."""
    B = 10
    t = torch.arange(B, dtype=torch.float)[:, None].expand(B, 3)
    batch = {k: t.clone() for k in ("queries", "query_mask", "responses", "mask", "logprobs", "advantages")}
    for _ in range(3):
        mbs = list(minibatches(batch, 4))
        seen = torch.cat([mb["responses"][:, 0] for mb in mbs])
        assert sorted(seen.long().tolist()) == list(range(B))
        assert all(torch.equal(mb[k], mb["responses"]) for mb in mbs for k in batch)
    sizes = [len(mb["mask"]) for mb in minibatches(batch, 4)]
    assert sizes == [4, 4, 2]


def test_ppo_loss_hand_computed():
    # four one-token cases: ratio 1.5 / A=+1 (clipped to 1.2), ratio 1.1 / A=+1 (inside),
    # ratio 0.5 / A=-1 (clipped to 0.8), padding (ignored)
    old = torch.zeros(1, 4)
    logprobs = torch.log(torch.tensor([[1.5, 1.1, 0.5, 7.0]])).requires_grad_()
    advantages = torch.tensor([[1.0, 1.0, -1.0, 5.0]])
    values = torch.tensor([[1.0, 0.6, 0.5, 9.0]], requires_grad=True)
    old_values = torch.tensor([[0.5, 0.5, 0.5, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 0.5, 3.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    pg, vf, stats = train_ppo.ppo_loss(logprobs, old, values, old_values, advantages, returns, mask, 0.2, 0.2)
    # pg terms: max(-1.5, -1.2) = -1.2; max(-1.1, -1.1) = -1.1; max(0.5, 0.8) = 0.8
    assert pg.item() == pytest.approx((-1.2 - 1.1 + 0.8) / 3)
    # vf terms: v=1 clipped to 0.7: max(1, 1.69) = 1.69; v=0.6 inside: 0.36; v=0.5: 0
    assert vf.item() == pytest.approx(0.5 * (1.69 + 0.36 + 0.0) / 3)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)
    assert stats["vf_clipfrac"].item() == pytest.approx(1 / 3)
    (pg + vf).backward()
    # d/dlogp of -A·ratio is -A·ratio where unclipped (only token 2: -1.1), 0 where clipped or padded
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, -1.1 / 3, 0.0, 0.0]]))
    # value grads: clipped branch wins on token 1 -> 0; token 2: 0.5·2·(0.6-0)/3; token 3: 0
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.6 / 3, 0.0, 0.0]]))


def test_shape_rewards_hand_computed():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -5.0, -5.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    rewards = train_ppo.shape_rewards(torch.tensor([2.0, -1.0]), logprobs, ref, mask, 0.1, "k1")
    expected = torch.tensor([[-0.05, 0.0, 0.1 + 2.0], [-0.1 - 1.0, 0.0, 0.0]])
    torch.testing.assert_close(rewards, expected)


def test_kl_controller():
    fixed = KLController(0.05)
    fixed.update(100.0, 64)
    assert fixed.value == 0.05
    ctl = KLController(0.1, target=6.0, horizon=1000)
    ctl.update(12.0, 100)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    ctl.update(5.4, 100)  # error -0.1
    assert ctl.value == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 0.1))


def test_padding_is_inert_in_rewards_gae_and_losses():
    g = torch.Generator().manual_seed(0)
    lengths, R = [5, 2, 4], 5
    mask = lengths_mask(lengths, R)
    clean = {k: torch.randn(3, R, generator=g) for k in ("logprobs", "ref", "values", "new_logprobs", "new_values")}
    dirty = {k: torch.where(mask.bool(), v, torch.randn(3, R, generator=g) * 1e4) for k, v in clean.items()}
    scores = torch.tensor([1.0, -2.0, 0.5])

    def run(t):
        rewards = train_ppo.shape_rewards(scores, t["logprobs"], t["ref"], mask, 0.05, "k3")
        rewards = whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, t["values"], mask, 1.0, 0.95)
        advantages = whiten(advantages, mask)
        pg, vf, stats = train_ppo.ppo_loss(t["new_logprobs"], t["logprobs"], t["new_values"], t["values"],
                                           advantages, returns, mask, 0.2, 0.2)
        return [rewards * mask, advantages, returns, pg, vf, *stats.values()]

    for a, b in zip(run(clean), run(dirty)):
        assert torch.equal(a, b)


def tiny_actor(tokenizer, path):
    """A tiny random Llama that mostly says one of 16 words, so a word-count reward has signal."""
    model = tiny_llama(len(tokenizer), seed=1)
    ids = [tokenizer(w, add_special_tokens=False).input_ids for w in WORDS]
    assert all(len(i) == 1 for i in ids)
    with torch.no_grad():
        model.get_input_embeddings().weight[[i[0] for i in ids]] *= 40
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def make_args(tmp_path, actor, **kw):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something {i}."}) + "\n" for i in range(32)))
    defaults = dict(model=actor, data=str(prompts), out=str(tmp_path / "ppo"), rollout_batch_size=8,
                    minibatch_size=8, batch_size=4, score_batch_size=4, max_new_tokens=6, temperature=1.0,
                    ppo_epochs=2, lr=1e-3, lora_r=8, lora_alpha=16, max_steps=2, sample_every=0, log_every=100,
                    missing_eos="none")
    return train_ppo.Args(**(defaults | kw))


@pytest.fixture(scope="module")
def actor_dir(tokenizer, tmp_path_factory):
    return tiny_actor(tokenizer, tmp_path_factory.mktemp("actor"))


def policy_and_critic(actor_dir):
    model, tok = M.load_model(actor_dir)
    torch.manual_seed(0)
    add_lora(model, 4, 8, name="policy")
    add_lora(model, 4, 8, name="value")
    for _, m in lora_layers(model):
        torch.nn.init.normal_(m.lora_B["policy"].weight, std=0.05)
    head = torch.nn.Linear(64, 1)
    return model, tok, head


def side_by_side(data):
    """The reference layout, independent of rollout.join's packed one: prompt (left-padded) then response
    (right-padded) side by side, (B, P + R), so outputs[:, P - 1:-1] line up with the responses."""
    return (torch.cat([data["queries"], data["responses"]], 1), torch.cat([data["query_mask"], data["mask"]], 1))


def test_join_packs_prompt_then_response_with_one_padded_region():
    """Hand-built: rows of prompt lengths 1, 3, 2 and response lengths 2, 1, 0 become prompt + response + padding,
    T = 4; targets are each response token at the position before it; response_slice reads them back as (B, R)."""
    queries = torch.tensor([[0, 0, 11], [21, 22, 23], [0, 31, 32]])
    query_mask = (queries != 0).long()
    responses = torch.tensor([[12, 13], [24, 0], [0, 0]])
    mask = torch.tensor([[1, 1], [1, 0], [0, 0]])
    input_ids, attention_mask, targets = rollout.join(queries, query_mask, responses, mask)
    assert input_ids[attention_mask.bool()].tolist() == [11, 12, 13, 21, 22, 23, 24, 31, 32]
    assert attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert targets.tolist() == [[12, 13, -100, -100], [-100, -100, 24, -100], [-100] * 4]
    positions = torch.arange(4).expand(3, 4)  # an output that is its own position
    data = {"query_mask": query_mask, "mask": mask}
    assert rollout.response_slice(positions, data).masked_fill(mask == 0, -1).tolist() == [[0, 1], [2, -1], [-1, -1]]
    hidden = torch.randn(3, 4, 5)  # trailing dims ride along
    torch.testing.assert_close(rollout.response_slice(hidden, data)[0], hidden[0, :2])


def test_logprob_temperature_is_the_sampling_temperature(actor_dir, tmp_path, monkeypatch):
    model, tok, head = policy_and_critic(actor_dir)
    args = make_args(tmp_path, actor_dir, temperature=0.6)
    seen = {}
    real_sample_token = engine.sample_token

    def spy(logits, temperature, top_p=1.0, u=None):
        seen["temperature"] = temperature  # every decoding step draws through sample_token
        return real_sample_token(logits, temperature, top_p, u)

    monkeypatch.setattr(engine, "sample_token", spy)
    queries = [tok("Hello there", add_special_tokens=False).input_ids, tok("Hi", add_special_tokens=False).input_ids]
    data, lengths, _ = train_ppo.sample(model, tok, queries, args.max_new_tokens, args.temperature)
    logprobs, entropy, ref_logprobs, values, features = train_ppo.score_tokens(model, model, head, data, args)
    assert features is None  # only --critic head keeps the reference pass's hidden states
    assert seen["temperature"] == args.temperature
    P = data["queries"].shape[1]
    ids, attn = side_by_side(data)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)

    def eager(temperature, adapter):
        from nanorlhf.lora import use_adapter
        with use_adapter(model, adapter), torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, P - 1:-1]
        lp = torch.log_softmax(logits / temperature, -1).gather(-1, data["responses"][..., None])[..., 0]
        return lp * data["mask"]

    torch.testing.assert_close(logprobs, eager(0.6, "policy"), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref_logprobs, eager(0.6, None), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logprobs, eager(1.0, "policy"), atol=1e-3)
    # padded response positions hold pad ids; putting other tokens there changes nothing
    dirty = dict(data, responses=data["responses"].masked_fill(data["mask"] == 0, 17))
    torch.testing.assert_close(train_ppo.score_tokens(model, model, head, dirty, args)[0], logprobs)


def test_ppo_learns_a_programmatic_reward(actor_dir, tmp_path, moon_reward):
    args = make_args(tmp_path, actor_dir, reward_fn=moon_reward, max_steps=30, kl_coef=0.02,
                     rollout_batch_size=16, minibatch_size=8, lr=3e-3)
    train_ppo.train(args)
    with open(os.path.join(args.out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    score, kl = [r["score"] for r in rows], [r["kl"] for r in rows]
    first, last = score[0], sum(score[-5:]) / 5  # the first rollouts come from the untrained policy
    assert last > first + 1.0 and last > 2 * first, score
    assert max(kl) < 20 and all(math.isfinite(k) for k in kl), kl


def test_critic_from_rm_starts_at_the_first_rms_weighted_share(actor_dir, tiny_rm_dir, tmp_path, tokenizer):
    """With --rm-weight 0.5 the critic's first values are 0.5 · the RM's normalised score of each state: V at
    response token j is the score of prompt + the response's first j tokens (score_sequences, an independent pass)."""
    from nanorlhf.rewards import Rewarder
    args = make_args(tmp_path, actor_dir, rm=[tiny_rm_dir], rm_weight=[0.5], critic_from_rm=True)
    model, _ = M.load_model(actor_dir)
    rewarder = Rewarder(tokenizer, args.rm, args.rm_weight)
    critic, value_head = train_ppo.make_critic(model, rewarder, args)
    queries, responses = [[5, 6, 7], [8, 9]], [[10, 11, 12], [13, 14, 15]]
    batch = {"queries": torch.tensor([[5, 6, 7], [0, 8, 9]]), "query_mask": torch.tensor([[1, 1, 1], [0, 1, 1]]),
             "responses": torch.tensor(responses), "mask": torch.ones(2, 3, dtype=torch.long)}
    with torch.no_grad():
        values = train_ppo.critic_values(critic, value_head, batch)
    rm = rewarder.rms[0][0]
    expected = [M.score_sequences(rm, [q + r[:j] for j in range(3)], tokenizer.pad_token_id, 3)
                for q, r in zip(queries, responses)]
    torch.testing.assert_close(values, 0.5 * torch.stack(expected), atol=1e-5, rtol=1e-5)


def test_head_critic_reads_the_reference_pass(actor_dir, tmp_path):
    """--critic head: the values are the head applied to the final hidden states of the base with every adapter
    off (here from transformers' own output_hidden_states, an independent pass), the same states the reference
    logprobs come from; no value adapter exists, and the update trains the head on the stored features."""
    model, tok = M.load_model(actor_dir)
    add_lora(model, 4, 8, name="policy")
    args = make_args(tmp_path, actor_dir, critic="head", batch_size=2)
    critic, head = train_ppo.make_critic(model, None, args)
    assert critic is None and torch.count_nonzero(head.weight) == 0
    torch.nn.init.normal_(head.weight, std=0.1)
    queries = [tok(t, add_special_tokens=False).input_ids for t in ("Hello there", "Hi", "A longer prompt here")]
    data, _, _ = train_ppo.sample(model, tok, queries, args.max_new_tokens, args.temperature)
    logprobs, _, ref_logprobs, values, features = train_ppo.score_tokens(model, critic, head, data, args)
    P, (B, R) = data["queries"].shape[1], data["mask"].shape
    ids, attn = side_by_side(data)
    from nanorlhf.lora import use_adapter
    with use_adapter(model, None), torch.no_grad():
        out = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0),
                    output_hidden_states=True)
    hidden = out.hidden_states[-1][:, P - 1:-1]  # (B, R, H): the state before each response token
    mask = data["mask"][..., None]
    assert features.shape == (B, R, 64)
    torch.testing.assert_close(features * mask, hidden * mask, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values, (head(hidden).squeeze(-1)) * data["mask"], atol=1e-5, rtol=1e-5)
    lp = torch.log_softmax(out.logits[:, P - 1:-1], -1).gather(-1, data["responses"][..., None])[..., 0]
    torch.testing.assert_close(ref_logprobs, lp * data["mask"], atol=1e-5, rtol=1e-5)
    assert not any(".value." in n for n, _ in model.named_parameters())
    # one update step: the head learns from the stored features, the policy from its own pass
    batch = dict(data, logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, features=features,
                 advantages=torch.randn(B, R) * data["mask"], returns=torch.ones(B, R) * data["mask"])
    losses = []

    class Steps:  # the one thing update needs from the Loop: an optimizer step after each minibatch
        def optimizer_step(self):
            losses.append(head.weight.grad.abs().sum().item())
            return {}
    train_ppo.update(model, critic, head, batch, Steps(), args)
    assert losses and losses[0] > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".policy." in n)


def test_the_entropy_gradient_is_formed_only_when_the_bonus_is_in_the_loss(actor_dir, tmp_path, monkeypatch):
    """At --entropy-coef 0 the update's entropy is logged only: the kernel returns it without a gradient (no
    entropy tiles), and the policy's gradient is the one a loss without the entropy has. At 0.05 it has one, and the
    bonus moves the gradient."""
    model, tok = M.load_model(actor_dir)
    add_lora(model, 4, 8, name="policy")
    queries = [tok(t, add_special_tokens=False).input_ids for t in ("Hello there", "Hi")]
    torch.manual_seed(0)
    data, _, _ = train_ppo.sample(model, tok, queries, 4, 1.0)
    B, R = data["mask"].shape
    real, seen = train_ppo.response_logprobs, []

    def spy(*a, **kw):
        out = real(*a, **kw)
        if torch.is_grad_enabled():  # the update's pass, not scoring's
            seen.append(out[1].requires_grad)
        return out
    monkeypatch.setattr(train_ppo, "response_logprobs", spy)
    grads = {}
    for coef in (0.0, 0.05):
        args = make_args(tmp_path, actor_dir, critic="head", batch_size=2, minibatch_size=2, rollout_batch_size=2,
                         ppo_epochs=1, entropy_coef=coef)
        critic, head = train_ppo.make_critic(model, None, args)
        logprobs, _, ref_logprobs, values, features = train_ppo.score_tokens(model, critic, head, data, args)
        batch = dict(data, logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, features=features,
                     advantages=torch.linspace(-1, 1, B * R).view(B, R) * data["mask"], returns=values)

        class Steps:  # the update's optimizer step: keep the policy's gradient, step nothing
            def optimizer_step(self):
                grads[coef] = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if ".policy." in n])
                model.zero_grad()
                return {}
        train_ppo.update(model, critic, head, batch, Steps(), args)
    assert seen == [False, True]
    assert not torch.allclose(grads[0.0], grads[0.05])
    # at 0 the gradient is the clipped surrogate's alone: the same loss through a pass with the entropy's gradient
    with torch.enable_grad():
        lp, ent = real(model, batch, 1.0, "policy", True)
        pg_loss, _, _ = train_ppo.ppo_loss(lp, batch["logprobs"], batch["values"], batch["values"], batch["advantages"],
                                           batch["returns"], batch["mask"], 0.2, 0.2)
        pg_loss.backward()
    expected = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if ".policy." in n])
    assert ent.requires_grad
    torch.testing.assert_close(grads[0.0], expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("extra", [[], ["--load-in-4bit", "--critic-from-rm"], ["--critic", "head"]])
def test_ppo_script_smoke(actor_dir, tiny_rm_dir, tmp_path, extra):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about {w}."}) + "\n" for w in WORDS))
    out = tmp_path / "out"
    cmd = [sys.executable, "train_ppo.py", "--actor", actor_dir, "--rm", tiny_rm_dir, "--data", str(prompts), "--out",
           str(out), "--max-steps", "2", "--rollout-batch-size", "4", "--minibatch-size", "2", "--batch-size", "2",
           "--max-new-tokens", "4", "--ppo-epochs", "1", "--sample-every", "1"] + extra
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--- prompt" in r.stdout
    with open(out / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("score", "kl", "entropy", "clipfrac", "approx_kl", "vf_loss", "explained_variance",
                "response_length", "eos_frac", "tokens_per_s", "peak_mem_gb", "time/generate", "time/update",
                *[f"perf/{p}_{m}" for p in ("generate", "score", "update") for m in ("tokens", "tokens_per_s", "mfu")]):
        assert all(math.isfinite(r[key]) for r in rows), key
    critic = "head" not in extra  # the adapter critic's passes: one in scoring, one in the update
    for r in rows:  # scoring: policy, reference, (critic,) RM; the update: policy (and critic), one epoch
        assert r["perf/score_tokens"] == (3 + critic) * r["perf/generate_tokens"]
        assert r["perf/update_tokens"] == (1 + critic) * r["perf/generate_tokens"]
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == 49152


@pytest.mark.parametrize("mode, expected", [("replace", [0.5, -1.0, -2.0]), ("subtract", [0.5, -0.5, -3.0]),
                                            ("none", [0.5, 0.5, -2.0])])
def test_missing_eos_penalises_hand_computed(mode, expected):
    """A response without EOS (the 2nd and 3rd) must never gain: replace sets --missing-eos-value (-1), subtract
    takes --missing-eos-penalty (1) away, whatever the sign of the value flag."""
    scores, ended = torch.tensor([0.5, 0.5, -2.0]), torch.tensor([True, False, False])
    args = train_ppo.Args(missing_eos=mode)
    expected = torch.tensor(expected)
    if mode == "replace":  # replacing never raises a score already below the value
        expected[2] = -1.0
    torch.testing.assert_close(train_ppo.missing_eos_scores(scores, ended, args), expected)
    assert scores.tolist() == [0.5, 0.5, -2.0]  # the raw scores are kept for logging


def ppo_loss_calls(monkeypatch, args):
    """Run PPO and return (new logprobs, old logprobs, mask) of every ppo_loss call."""
    calls = []
    real = train_ppo.ppo_loss

    def spy(logprobs, old_logprobs, *rest):
        calls.append((logprobs.detach().clone(), old_logprobs.clone(), rest[-3]))
        return real(logprobs, old_logprobs, *rest)
    monkeypatch.setattr(train_ppo, "ppo_loss", spy)
    train_ppo.train(args)
    return calls


def test_lora_dropout_never_acts_in_ppo(actor_dir, tmp_path, lengthy, monkeypatch):
    """A policy whose LoRA carries dropout 0.1 (PPO has no --lora-dropout: it would only break this): the old
    logprobs (no grad) and the update's come from one deterministic policy, so at the first minibatch of every
    iteration, before its optimizer step, the ratio is 1. (The first iteration alone proves nothing: LoRA's B
    starts at 0, so dropout has nothing to act on yet.)"""
    real_load = train_ppo.load_policy

    def load_with_dropout(*a, **k):
        model, tok = real_load(*a, **k)
        for _, layer in lora_layers(model):
            for name in layer.lora_dropout:
                layer.lora_dropout[name] = torch.nn.Dropout(0.1)
        return model, tok
    monkeypatch.setattr(train_ppo, "load_policy", load_with_dropout)
    args = make_args(tmp_path, actor_dir, reward_fn=lengthy, max_steps=2, ppo_epochs=1,
                     rollout_batch_size=8, minibatch_size=8, batch_size=4)
    calls = ppo_loss_calls(monkeypatch, args)
    assert len(calls) == 4  # two micro-batches per iteration, one optimizer step after each pair
    for new, old, mask in calls:
        # to rounding: the no-grad and the training pass may run other kernels (seen: 4e-5 on this sharp tiny
        # policy); LoRA dropout 0.1 acting in either pass moved them by 0.09
        assert mask.sum() > 0
        torch.testing.assert_close(new * mask, old * mask, atol=1e-3, rtol=0)


def test_batch_size_follows_a_smaller_minibatch(actor_dir, tmp_path, lengthy):
    """Lowering only --minibatch-size works (--batch-size defaults to min(4, it)); a contradiction stays an error;
    policy and critic report their own gradient norms."""
    args = make_args(tmp_path, actor_dir, reward_fn=lengthy, max_steps=1, minibatch_size=2, ppo_epochs=1,
                     batch_size=None, score_batch_size=None)  # None: not given on the command line
    train_ppo.train(args)
    assert args.batch_size == args.score_batch_size == 2
    with open(os.path.join(args.out, "metrics.jsonl")) as f:
        row = json.loads(f.readline())
    assert row["grad_norm/policy"] > 0 and row["grad_norm/critic"] > 0 and "grad_norm" not in row
    bad = make_args(tmp_path, actor_dir, reward_fn=lengthy, out=str(tmp_path / "bad"), minibatch_size=2,
                    batch_size=4)
    with pytest.raises(train_ppo.UserError, match="and that of --batch-size"):
        train_ppo.train(bad)


def test_ratio_is_exactly_one_at_the_first_minibatch_in_bf16(actor_dir, tmp_path, lengthy, monkeypatch):
    """With a bf16 base on the CPU the scoring pass (no grad, --batch-size rows) and the update's first minibatch
    (grad) compute bit-identical logprobs, so the PPO ratio is exactly 1 before the first optimizer step of each
    iteration: bf16 rounding must not show up as a policy change that clipping then acts on."""
    args = make_args(tmp_path, actor_dir, reward_fn=lengthy, max_steps=2, ppo_epochs=1, dtype="bfloat16",
                     rollout_batch_size=8, minibatch_size=8, batch_size=4)
    calls = ppo_loss_calls(monkeypatch, args)
    assert len(calls) == 4  # per iteration two micro-batches, both before its one optimizer step
    for new, old, mask in calls:
        assert mask.sum() > 0 and torch.equal(new * mask, old * mask)


def test_scoring_and_update_forwards_take_their_own_batch_sizes(actor_dir, tmp_path, lengthy, monkeypatch):
    """--score-batch-size sets the scoring forwards (old, reference, RM passes: the whole rollout at once here) and
    --batch-size the update's; the update's first micro-batches, before any optimizer step, see the logprobs that
    scoring saw at another batch size (ratio 1, to rounding), and --score-batch-size defaults to --batch-size."""
    sizes, real = [], train_ppo.micro_batches

    def spy(batch, size):
        for idx, chunk in real(batch, size):
            sizes.append((size, len(idx)))
            yield idx, chunk
    monkeypatch.setattr(train_ppo, "micro_batches", spy)
    args = make_args(tmp_path, actor_dir, reward_fn=lengthy, max_steps=1, ppo_epochs=1,
                     rollout_batch_size=8, minibatch_size=8, batch_size=2, score_batch_size=8)
    calls = ppo_loss_calls(monkeypatch, args)
    assert sizes == [(8, 8)] + [(2, 2)] * 4  # one scoring forward pair, then four update micro-batches
    assert len(calls) == 4
    for new, old, mask in calls:  # one minibatch: no optimizer step before any of them
        torch.testing.assert_close(new * mask, old * mask, atol=1e-3, rtol=0)
    default = make_args(tmp_path, actor_dir, reward_fn=lengthy, out=str(tmp_path / "default"), max_steps=1,
                        ppo_epochs=1, batch_size=2, score_batch_size=None)
    sizes.clear()
    train_ppo.train(default)
    assert default.score_batch_size == 2 and {s for s, _ in sizes} == {2}
