"""The sampling engine (nanorlhf/engine.py): the distribution it draws from, that a batch changes nothing a row
would draw alone (left padding, shared prefills, rows leaving at their stop token), its stop tokens, and that the
logits it samples from are the scorer's in bf16 too."""
import math

import pytest
import torch

from nanorlhf import model as M
from nanorlhf.cli import UserError
from nanorlhf.engine import check_lengths, generate, generate_all, sample_token, stop_ids
from nanorlhf.kernels import token_logprobs


@pytest.fixture(scope="module")
def meddling_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama whose generation_config.json would change sampling: it suppresses every id >= 1000, keeps
    the top 5 tokens, penalises repeats and forbids repeated unigrams (the settings Qwen and others ship)."""
    from conftest import tiny_llama
    model = tiny_llama(len(tokenizer))
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(5)  # logits far from uniform (entropy ~9 nats), so a top-k would show
    g = model.generation_config
    g.suppress_tokens, g.do_sample, g.top_k = list(range(1000, len(tokenizer))), True, 5
    g.repetition_penalty, g.no_repeat_ngram_size = 3.0, 1
    path = str(tmp_path_factory.mktemp("meddling"))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_sampling_ignores_the_models_generation_config(meddling_dir):
    """Samples come from softmax(logits / T) alone (the π the ratio and the KL assume), through the path that
    nanorlhf.label and nanorlhf.evaluate use (generate_all), whatever the model's generation_config says."""
    model, tok = M.load_model(meddling_dir)
    assert model.generation_config.suppress_tokens  # the shipped config is loaded ...
    torch.manual_seed(0)
    prompts = [[5 + i, 7, 9] for i in range(24)]
    responses, _ = generate_all(model, tok, prompts, max_new_tokens=4, temperature=0.7, batch_size=24)
    # ... and ignored: per sampled token, the eager softmax's mass on ids >= 1000 and the token's logprob
    expected_high, sampled_high, nll, entropy = 0.0, 0, 0.0, 0.0
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            logp = torch.log_softmax(model(torch.tensor([p + r])).logits[0, len(p) - 1:-1] / 0.7, -1)  # (len(r), V)
            expected_high += logp[:, 1000:].exp().sum().item()
            sampled_high += sum(t >= 1000 for t in r)
            nll -= logp[torch.arange(len(r)), torch.tensor(r)].sum().item()
            entropy -= (logp.exp() * logp).sum().item()
    n = sum(len(r) for r in responses)
    assert n >= 48 and 0.5 < expected_high / n  # the test has power: most of the mass is on suppressed ids
    assert abs(sampled_high - expected_high) < 4 * math.sqrt(expected_high) + 2, (sampled_high, expected_high, n)
    # E[-log π(sampled)] = entropy; a leaked top-k of 5 would sample far likelier tokens than π does
    assert abs(nll - entropy) / n < 0.25 * entropy / n + 0.1, (nll / n, entropy / n)
    # greedy is the eager argmax: no repetition penalty or n-gram ban either
    out = generate(model, tok, [[5, 7, 9]], max_new_tokens=5, temperature=0)
    ids = [5, 7, 9]
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert out["responses"][0, :out["lengths"][0]].tolist() == ids[3:3 + int(out["lengths"][0])]


def test_sample_token_draws_from_the_softmax_and_its_nucleus():
    """40,000 draws per row against the distribution worked out by hand: softmax(logits / T), and with top_p 0.8 the
    three likeliest tokens renormalised (their masses 0.563, 0.207, 0.126 first reach 0.8). The vocabulary is out of
    order, so the nucleus must map back to the right ids; a -inf logit is never drawn; temperature 0 is the argmax."""
    logits = torch.tensor([0.5, -1.0, 2.0, float("-inf"), 0.0, 1.0])  # likeliest first: ids 2, 5, 0, 4, 1
    e = {i: math.exp(x) for i, x in enumerate(logits.tolist()) if x > float("-inf")}
    full = {i: v / sum(e.values()) for i, v in e.items()}
    nucleus = {i: e[i] / (e[2] + e[5] + e[0]) for i in (2, 5, 0)}
    cooled = {i: math.exp(x / 0.5) for i, x in enumerate(logits.tolist()) if x > float("-inf")}
    cooled = {i: v / sum(cooled.values()) for i, v in cooled.items()}
    n = 40000
    torch.manual_seed(0)
    for temperature, top_p, expected in ((1.0, 1.0, full), (1.0, 0.8, nucleus), (0.5, 1.0, cooled)):
        counts = torch.bincount(sample_token(logits.expand(n, -1), temperature, top_p), minlength=6).tolist()
        for i in range(6):
            p = expected.get(i, 0.0)
            assert abs(counts[i] - n * p) <= 4 * math.sqrt(n * p * (1 - p)), (temperature, top_p, i, counts, p)
    assert sample_token(torch.stack([logits, -logits.nan_to_num(neginf=0)]), 0).tolist() == [2, 1]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_left_padded_batch_decodes_each_prompt_as_alone(tokenizer, arch):
    """The KV-cache loop over a left-padded batch (positions from the mask, the cache passed under each transformers
    version's name) gives each prompt the greedy tokens a cache-free forward of that prompt alone picks."""
    from conftest import tiny_llama
    from transformers import GPT2Config, GPT2LMHeadModel
    if arch == "llama":
        model = tiny_llama(len(tokenizer))
    else:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=64))
    model.eval()
    prompts = [[5, 6], [7, 8, 9, 10, 11], [12, 13, 14]]
    out = generate(model, tokenizer, prompts, max_new_tokens=6, temperature=0)
    assert out["queries"].shape == (3, 5) and out["query_mask"].sum(1).tolist() == [2, 5, 3]
    for b, p in enumerate(prompts):
        ids = list(p)
        with torch.no_grad():
            for _ in range(6):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        n = int(out["lengths"][b])
        assert out["responses"][b, :n].tolist() == ids[len(p):len(p) + n], (arch, b)


def test_generate_without_a_cache_is_one_line(tokenizer):
    """A model that hands back no KV cache would be fed each new token alone: one line, not a wrong sample."""
    from conftest import tiny_llama
    from transformers.modeling_outputs import BaseModelOutputWithPast
    model = tiny_llama(len(tokenizer))
    body = model.base_model
    forward = body.forward
    body.forward = lambda **kw: BaseModelOutputWithPast(last_hidden_state=forward(**kw).last_hidden_state)
    with pytest.raises(UserError, match="returned no KV cache"):
        generate(model, tokenizer, [[5, 6]], max_new_tokens=2)


def test_the_cdf_keeps_probabilities_below_float32s_resolution():
    """p(token 1) = e⁻²⁰/(1 + e⁻²⁰) ≈ 2.1e-9, below 2⁻²⁴: a float32 running sum has already reached 1 at token 0 and
    never draws token 1. Summed in float64, the uniforms that land past token 0's mass draw it, and only those."""
    logits = torch.tensor([[0.0, -20.0]])
    p1 = math.exp(-20) / (1 + math.exp(-20))
    assert sample_token(logits, 1.0, u=torch.tensor([0.5 * p1])).item() == 1  # v = (1 - u)·total lands past p0
    assert sample_token(logits, 1.0, u=torch.tensor([1.5 * p1])).item() == 0


@pytest.fixture(scope="module")
def chatty(tokenizer):
    """A tiny random Llama over SmolLM2's first 64 ids (EOS is 2) that often says EOS, so responses end at different
    steps: the EOS row of its (tied) lm_head points along the mean final hidden state. 64 tokens, not 49,152: a draw
    whose uniform lands within rounding of a CDF boundary may go either way in two batch layouts, and with a small
    vocabulary no draw comes near one."""
    from conftest import tiny_llama
    model = tiny_llama(64, seed=1).eval()
    with torch.no_grad():
        ids = torch.randint(3, 64, (8, 12), generator=torch.Generator().manual_seed(0))
        d = model.model(ids).last_hidden_state.reshape(-1, 64).mean(0)
        model.get_input_embeddings().weight[tokenizer.eos_token_id] = 8 * d / d.norm() ** 2
    return model


def test_a_batch_samples_what_each_row_samples_alone(chatty, tokenizer, monkeypatch):
    """Rows leave the batch at their stop token, a prompt's copies share one prefill, and left padding moves nothing:
    each row's response is the one it draws alone from its own seed. The decoder ran only on rows still sampling."""
    prompts = [[5, 6], [7, 8, 9, 10, 11], [5, 6], [12, 13, 14], [5, 6], [7, 8, 9, 10, 11]]
    seeds = [11, 12, 13, 14, 15, 16]
    from nanorlhf import engine
    calls, prefills = [], []
    real_step, body_forward = engine._step, chatty.base_model.forward
    monkeypatch.setattr(engine, "_step", lambda body, cache, kw, tokens, *a: calls.append(len(tokens)) or
                        real_step(body, cache, kw, tokens, *a))
    monkeypatch.setattr(chatty.base_model, "forward", lambda **kw: prefills.append(kw["input_ids"].shape) or
                        body_forward(**kw))
    out = generate(chatty, tokenizer, prompts, max_new_tokens=12, temperature=1.0, seeds=seeds, decode="eager")
    monkeypatch.undo()
    assert prefills[0] == (3, 5) and len(prefills) == 1 + len(calls)  # three distinct prompts, one prefill
    lengths = out["lengths"].tolist()
    assert len(set(lengths)) >= 3 and out["ended"].any() and min(lengths) < 12  # rows ended at different steps
    assert sum(calls) == sum(n - 1 for n in lengths)  # a decode step for each row's tokens after its first, no more
    for b, (p, seed) in enumerate(zip(prompts, seeds)):
        alone = generate(chatty, tokenizer, [p], max_new_tokens=12, temperature=1.0, seeds=[seed])
        n = lengths[b]
        assert alone["lengths"].item() == n and alone["ended"].item() == out["ended"][b].item()
        assert out["responses"][b, :n].tolist() == alone["responses"][0, :n].tolist(), b
        assert out["mask"][b].sum() == n


def test_copies_of_a_prompt_are_independent_draws(chatty, tokenizer):
    """4000 copies of one prompt, one token each: the tokens follow softmax(logits / T) (the top ones within 4 se),
    and copy pairs agree as often as two independent draws do, Σ p², not always as one shared draw would."""
    torch.manual_seed(0)
    n, T = 4000, 0.7
    out = generate(chatty, tokenizer, [[5, 6, 7]] * n, max_new_tokens=1, temperature=T)
    with torch.no_grad():
        p = torch.softmax(chatty(torch.tensor([[5, 6, 7]])).logits[0, -1].double() / T, -1)
    tokens = out["responses"][:, 0]
    counts = torch.bincount(tokens, minlength=len(p)).double()
    for i in p.topk(3).indices.tolist():
        assert abs(counts[i] - n * p[i]) <= 4 * math.sqrt(n * p[i] * (1 - p[i])), (i, counts[i], n * p[i])
    agree = (tokens[0::2] == tokens[1::2]).double()
    q = float((p ** 2).sum())
    assert 0.01 < q < 0.5 and abs(agree.mean() - q) <= 4 * math.sqrt(q * (1 - q) / len(agree)), (agree.mean(), q)


def test_a_rows_stream_does_not_depend_on_its_batch(chatty, tokenizer):
    """generate_all draws each row's seed up front: any batch size gives every row the same response."""
    prompts = [[5 + i % 4, 6, 7][: 1 + i % 3] for i in range(10)]
    runs = []
    for batch_size in (1, 3, 10):
        torch.manual_seed(0)
        runs.append(generate_all(chatty, tokenizer, prompts, max_new_tokens=8, temperature=1.0,
                                 batch_size=batch_size))
    assert runs[0] == runs[1] == runs[2]
    assert len({len(r) for r in runs[0][0]}) > 1  # the responses differ in length: rows left their batches


def test_stop_tokens_are_the_tokenizers_and_the_checkpoints(tokenizer):
    """A checkpoint that lists more EOS ids than its tokenizer's (Llama 3.x Instruct) stops at each of them; the
    token is kept and the response counts as ended. Greedy here, so the first token is known beforehand."""
    from conftest import tiny_llama
    model = tiny_llama(len(tokenizer)).eval()
    with torch.no_grad():
        first = int(model(torch.tensor([[5, 6]])).logits[0, -1].argmax())
    assert first != tokenizer.eos_token_id
    out = generate(model, tokenizer, [[5, 6]], max_new_tokens=4, temperature=0)
    assert out["lengths"].item() > 1 and not out["ended"].item()
    model.generation_config.eos_token_id = [first, tokenizer.eos_token_id]
    assert stop_ids(model, tokenizer) == sorted({first, tokenizer.eos_token_id})
    out = generate(model, tokenizer, [[5, 6]], max_new_tokens=4, temperature=0)
    assert out["responses"][0].tolist() == [first] and out["lengths"].item() == 1 and out["ended"].item()


def test_bf16_samples_from_the_logits_the_scorer_forms(tiny_dir, monkeypatch):
    """In bf16 the model's own lm_head rounds the logits to 3 significant digits; the engine forms them in fp32 from
    the final hidden state, as the fused kernel does. At every step, the logprob of the sampled token under the
    distribution sampled equals the kernel's logprob of it from the same hidden state, to fp32 rounding. (The tiny
    model's embeddings, tied to its lm_head, are scaled up to logits of a real model's size, about 10.)"""
    from nanorlhf import engine
    model, tok = M.load_model(tiny_dir, dtype="bfloat16")
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(8)
    weight, scale = M.lm_head(model)
    seen = []
    real_sample = engine.sample_token

    def spy_sample(logits, temperature, top_p=1.0, u=None):
        token = real_sample(logits, temperature, top_p, u)
        seen.append((logits, temperature, token))
        return token

    hidden_seen = []
    real_step = engine._step
    monkeypatch.setattr(engine, "sample_token", spy_sample)
    monkeypatch.setattr(engine, "_step", lambda *a: hidden_seen.append(real_step(*a)) or hidden_seen[-1])
    torch.manual_seed(0)
    generate(model, tok, [[5, 6, 7], [8, 9]], max_new_tokens=4, temperature=0.7)
    monkeypatch.undo()
    assert len(seen) == 4 and len(hidden_seen) == 3
    for (logits, temperature, token), hidden in zip(seen[1:], hidden_seen):
        assert logits.dtype == torch.float32 and hidden.dtype == torch.bfloat16
        sampled = torch.log_softmax(logits / temperature, -1).gather(1, token[:, None]).squeeze(1)
        scored = token_logprobs(hidden, weight, token, 0.7 / scale)
        torch.testing.assert_close(sampled, scored, atol=2e-5, rtol=0)
        rounded = torch.log_softmax((hidden @ weight.T).float() / 0.7, -1).gather(1, token[:, None]).squeeze(1)
        assert (rounded - scored).abs().max() > 1e-3  # what a bf16 lm_head would have sampled from: visibly off


def test_lengths_the_context_cannot_hold_are_one_line(tiny_dir, tokenizer):
    """The response budget and the prompt must fit the model's positions: refused before anything runs."""
    from conftest import tiny_llama
    model = tiny_llama(len(tokenizer))  # 1024 positions
    with pytest.raises(UserError, match=r"--max-new-tokens 1020: a 5-token prompt .* 1025 positions, more than the "
                                        r"model's 1024"):
        generate(model, tokenizer, [[5, 6, 7, 8, 9]], max_new_tokens=1020)
    with pytest.raises(UserError, match=r"--max-prompt-length 1000 \+ --max-new-tokens 64 = 1064 tokens exceed the "
                                        r"model's context of 1024"):
        check_lengths(model.config, 1000, 64)
    check_lengths(model.config, 960, 64)  # exactly full is fine


def test_the_compiled_step_samples_what_the_eager_one_does(chatty, tokenizer):
    """The static-shape step (whole-capacity attention under an additive mask, writes at a tensor position, the batch
    halved only when half of it has stopped) that CUDA runs as graphs: compiled here by inductor on the CPU, in fp32,
    it gives every row the response the eager step gives it."""
    prompts = [[5, 6], [7, 8, 9, 10, 11], [5, 6], [12, 13, 14], [5, 6], [7, 8, 9, 10, 11]]
    seeds = [11, 12, 13, 14, 15, 16]
    eager = generate(chatty, tokenizer, prompts, max_new_tokens=12, temperature=1.0, seeds=seeds, decode="eager")
    compiled = generate(chatty, tokenizer, prompts, max_new_tokens=12, temperature=1.0, seeds=seeds, decode="compiled")
    assert len(set(eager["lengths"].tolist())) >= 3  # rows stopped at different steps, so the batch was halved
    for key in ("responses", "lengths", "ended", "mask"):
        assert torch.equal(eager[key], compiled[key]), key


def test_generate_all_keeps_a_prompts_copies_in_one_batch(monkeypatch):
    """Copies of a prompt are prefilled once only if they share a batch: with 3 copies each and batches of 4 rows,
    no batch splits a prompt's copies (one of 3 fits, a second does not), and every row gets its own response."""
    from nanorlhf import engine
    seen = []

    def fake_generate(model, tokenizer, batch, max_new_tokens, temperature, seeds, decode):
        seen.append(batch)
        return {"responses": torch.tensor([[len(p), 9] for p in batch]), "lengths": torch.full((len(batch),), 2),
                "ended": torch.ones(len(batch), dtype=torch.bool)}
    monkeypatch.setattr(engine, "generate", fake_generate)
    prompts = [[7] * n for n in (2, 1, 3) for _ in range(3)]
    responses, _ = engine.generate_all(None, None, prompts, 2, batch_size=4)
    assert seen == [[[7]] * 3, [[7, 7]] * 3, [[7, 7, 7]] * 3]
    assert responses == [[len(p), 9] for p in prompts]
    seen.clear()
    engine.generate_all(None, None, [[5]] * 5, 2, batch_size=2)  # more copies than a batch: split
    assert [len(b) for b in seen] == [2, 2, 1]
