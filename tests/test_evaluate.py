import json

import torch
from conftest import python_reward, save_tiny_rm, tiny_llama

from nanorlhf.evaluate import Args, distinct, evaluate


def test_distinct_n_hand_computed():
    texts = ["a b a", "a b c"]
    assert distinct(texts, 1) == 3 / 6  # a, b, c among a b a a b c
    assert distinct(texts, 2) == 3 / 4  # (a b), (b a), (b c) among ab ba ab bc


def test_evaluate_against_itself_and_another_model(tiny_dir, tiny_rm_dir, tokenizer, tmp_path, capsys):
    other = str(tmp_path / "other")
    tiny_llama(len(tokenizer), seed=5).save_pretrained(other)
    tokenizer.save_pretrained(other)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(6)))
    out = tmp_path / "eval.json"
    # --rm twice: the second judge is the same RM, so it scores every response as the first and agrees with it
    # wherever the first prefers one response (the first judge when there is no --reward-fn)
    args = Args(model=[tiny_dir, other], baseline=tiny_dir, rm=[tiny_rm_dir, tiny_rm_dir], data=str(prompts),
                limit=5, max_new_tokens=5, batch_size=3, out=str(out))
    results = evaluate(args)
    # the baseline judged against itself: same seed, same samples, every comparison a tie, zero KL
    assert results[tiny_dir]["win_rate"] == 0.5 and results[tiny_dir]["kl"] == 0.0
    row = results[other]
    assert 0.0 <= row["win_rate"] <= 1.0 and row["kl"] is not None and row["length"] <= 5
    assert json.loads(out.read_text())[other]["score"] == row["score"]
    rm, rm2 = row["judges"]["rm"], row["judges"]["rm2"]
    assert rm2["mean"] == rm["mean"] and rm2["win_rate"] == rm["win_rate"]
    assert rm2["agreement"] == 1.0 and rm2["agreement_n"] > 0 and "agreement" not in rm
    printed = capsys.readouterr().out
    assert "| model | RM score ± se | RM win rate vs baseline | RM gain ± se | RM2 score ± se |" in printed
    assert "RM2 agrees with RM ± se |" in printed


def test_each_rm_is_scored_by_its_own_model_and_agrees_with_the_reward_function(tiny_dir, tiny_rm_dir, tokenizer,
                                                                                 tmp_path, monkeypatch, capsys):
    """--reward-fn with --rm given twice: the reward function is the first judge, each RM gets its own columns (RM,
    RM2) and its agreement with the reward function, and RM2's scores are those of the second RM judging alone."""
    second = save_tiny_rm(tmp_path / "rm_b", tokenizer, seed=1)
    other = str(tmp_path / "other")
    tiny_llama(len(tokenizer), seed=5).save_pretrained(other)
    tokenizer.save_pretrained(other)
    python_reward(tmp_path, monkeypatch, "judge",
                  "def longer(prompts, responses):\n    return [len(r) for r in responses]\n")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(6)))
    kw = dict(model=[other], baseline=tiny_dir, reward_fn="judge:longer", data=str(prompts), limit=6,
              max_new_tokens=6, batch_size=3)
    both = evaluate(Args(rm=[tiny_rm_dir, second], **kw))[other]["judges"]
    printed = capsys.readouterr().out
    alone = evaluate(Args(rm=[second], **kw))[other]["judges"]
    assert both["rm2"]["mean"] == alone["rm"]["mean"] != both["rm"]["mean"]
    assert both["rm2"]["agreement"] == alone["rm"]["agreement"] and "agreement" not in both["longer"]
    assert "| model | RM score ± se |" in printed and "| RM2 score ± se |" in printed
    assert "| longer score ± se |" in printed
    assert "| RM agrees with longer ± se | RM2 agrees with longer ± se |" in printed


def test_length_sorted_batches_keep_each_prompts_response_and_ties(tiny_dir, tiny_rm_dir, tmp_path, monkeypatch):
    """Generation and the KL passes run rows of similar length together; every result still belongs to its own
    prompt, and a model judged against itself still ties everywhere (win rate 0.5, gain 0, KL 0)."""
    from nanorlhf import model as M
    prompts = [[7] * n for n in (5, 1, 9, 3, 1, 7)]
    seen = []

    def fake_generate(model, tokenizer, batch, max_new_tokens, temperature):  # answers each prompt with its length
        seen.append([len(p) for p in batch])
        responses = torch.tensor([[len(p), 2] for p in batch])
        return {"responses": responses, "lengths": torch.full((len(batch),), 2), "ended": torch.ones(len(batch)) > 0}
    monkeypatch.setattr(M, "generate", fake_generate)
    responses, ended = M.generate_all(None, None, prompts, 4, batch_size=2)
    assert responses == [[len(p), 2] for p in prompts] and all(ended)
    assert seen == [[1, 1], [3, 5], [7, 9]]  # sorted by length, stable
    monkeypatch.undo()

    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": "Tell me " + "more " * n + "?"}) + "\n" for n in (9, 1, 5, 2, 7, 3)))
    results = evaluate(Args(model=[tiny_dir], baseline=tiny_dir, rm=[tiny_rm_dir], data=str(data), limit=6,
                            max_new_tokens=6, batch_size=2))
    row = results[tiny_dir]
    assert row["judges"]["rm"]["win_rate"] == 0.5 and row["judges"]["rm"]["gain"] == 0.0 and row["kl"] == 0.0


def test_summed_logprobs_in_sorted_batches_equals_one_batch(tiny_dir):
    """The KL passes' length-sorted batches give each row its own summed logprob, as one unsorted forward does."""
    from nanorlhf import model as M
    from nanorlhf.preference import summed_logprobs
    model, _ = M.load_model(tiny_dir)
    rows = [([5] * p, [9] * c) for p, c in ((4, 2), (1, 6), (3, 3), (6, 1), (2, 5))]
    with torch.no_grad():
        whole = summed_logprobs(model, rows, 0)
        sorted_batches = summed_logprobs(model, rows, 0, batch_size=2)
    torch.testing.assert_close(sorted_batches, whole, rtol=1e-5, atol=1e-5)


def test_rm_scores_in_sorted_batches_equal_one_row_at_a_time(tiny_rm_dir):
    """The RM's length-sorted batches give each sequence its own score, in the order given, as scoring each one
    alone (no padding at all) does."""
    from nanorlhf import model as M
    rm, tokenizer = M.load_reward_model(tiny_rm_dir)
    seqs = [[5 + i] * n for i, n in enumerate((4, 9, 2, 7, 3, 8, 1))]
    alone = torch.cat([M.score_sequences(rm, [s], tokenizer.pad_token_id, 1) for s in seqs])
    batched = M.score_sequences(rm, seqs, tokenizer.pad_token_id, 3)
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    assert alone.unique().numel() == len(seqs)  # distinct scores: a row given another's score would show


def test_judge_stats_skip_prompts_a_judge_does_not_apply_to():
    """A reward function's None (NaN) leaves that prompt out of the judge's numbers instead of making them NaN."""
    from nanorlhf.evaluate import judge_stats
    nan = float("nan")
    s = judge_stats(torch.tensor([1.0, nan, 0.0, 2.0]), torch.tensor([0.0, 1.0, 0.0, nan]))
    assert s["mean"] == 0.5 and s["win_rate"] == 0.75 and s["gain"] == 0.5  # prompts 1 and 3: wins 1 and ½


def test_agreement_counts_the_pairs_the_reference_orders():
    """Worked by hand: the reference prefers the model on prompts 0 and 1, the baseline on 2, neither on 3 (left out),
    and prompt 4 has no reference score (left out). The judge agrees on 0, disagrees on 1 and ties on 2: (1 + 0 + ½)/3."""
    import math

    from nanorlhf.evaluate import agreement
    nan = float("nan")
    ref_scores, ref_base = torch.tensor([1.0, 2.0, 0.0, 5.0, nan]), torch.tensor([0.0, 1.0, 1.0, 5.0, 0.0])
    scores, base = torch.tensor([0.3, -1.0, 0.2, 9.0, 1.0]), torch.tensor([0.1, 0.0, 0.2, 0.0, 0.0])
    mean, se, n = agreement(scores, base, ref_scores, ref_base)
    assert n == 3 and mean == 0.5
    assert math.isclose(se, torch.tensor([1.0, 0.0, 0.5]).std().item() / math.sqrt(3))
    assert agreement(ref_scores, ref_base, ref_scores, ref_base)[:2] == (1.0, 0.0)  # a judge agrees with itself
