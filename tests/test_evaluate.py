import json
import math

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
    from nanorlhf import engine
    prompts = [[7] * n for n in (5, 1, 9, 3, 1, 7)]
    seen = []

    def fake_generate(model, tokenizer, batch, max_new_tokens, temperature, seeds, decode):  # each prompt's length
        seen.append([len(p) for p in batch])
        responses = torch.tensor([[len(p), 2] for p in batch])
        return {"responses": responses, "lengths": torch.full((len(batch),), 2), "ended": torch.ones(len(batch)) > 0}
    monkeypatch.setattr(engine, "generate", fake_generate)
    responses, ended = engine.generate_all(None, None, prompts, 4, batch_size=2)
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
    from nanorlhf.evaluate import agreement
    nan = float("nan")
    ref_scores, ref_base = torch.tensor([1.0, 2.0, 0.0, 5.0, nan]), torch.tensor([0.0, 1.0, 1.0, 5.0, 0.0])
    scores, base = torch.tensor([0.3, -1.0, 0.2, 9.0, 1.0]), torch.tensor([0.1, 0.0, 0.2, 0.0, 0.0])
    mean, se, n = agreement(scores, base, ref_scores, ref_base)
    assert n == 3 and mean == 0.5
    assert math.isclose(se, torch.tensor([1.0, 0.0, 0.5]).std().item() / math.sqrt(3))
    assert agreement(ref_scores, ref_base, ref_scores, ref_base)[:2] == (1.0, 0.0)  # a judge agrees with itself


def test_a_verdict_that_flips_with_the_order_is_a_tie():
    """Worked by hand. Margins > 0 pick A. Pair 0: the model (A) wins, then the model (B) wins: a win. Pair 1: A wins
    in both orders, so the model wins one and the baseline the other: a flip, a tie. Pair 2: the baseline wins both.
    Pair 3: the model wins both. A was picked in 3 + 2 of the 8 judgements; one pair in 4 flipped."""
    from nanorlhf.evaluate import judge_stats, pairwise
    ab, ba = torch.tensor([2.0, 1.0, -1.0, 0.5]), torch.tensor([-1.0, 1.0, 1.0, -0.5])
    verdicts, position_a, position_a_se, flips = pairwise(ab, ba)
    assert verdicts.tolist() == [1.0, 0.0, -1.0, 1.0]
    assert position_a == 5 / 8 and flips == 1 / 4
    assert math.isclose(position_a_se, torch.tensor([1.0, 1, 0, 1, 0, 1, 1, 0]).std().item() / math.sqrt(8))
    assert judge_stats(verdicts, torch.zeros(4))["win_rate"] == (1 + 0.5 + 0 + 1) / 4


def alpaca_file(tmp_path, n=4):
    """n alpaca records of different prompt lengths, each with an output (a reference answer)."""
    rows = [{"instruction": "Say something " + "nice " * i + "please.", "input": "", "output": f"Here is thing {i}."}
            for i in range(n)]
    (tmp_path / "alpaca.json").write_text(json.dumps(rows))
    return str(tmp_path / "alpaca.json")


def test_the_judge_is_asked_in_both_orders_and_writes_battle_records(tiny_dir, tokenizer, tmp_path, monkeypatch,
                                                                     lengthy, capsys):
    """The tiny model judges: it is asked twice, the model's responses as A then as B; each pair's verdict follows the
    two margins (a flip is a tie); the battle records name the judge and hold both answers; and on data with
    reference answers BLEU and ROUGE-L come with the table."""
    from nanorlhf import evaluate as E
    other = str(tmp_path / "other")
    tiny_llama(len(tokenizer), seed=5).save_pretrained(other)
    tokenizer.save_pretrained(other)
    calls, real = [], E.judge_margins

    def spy(judge, tok, messages, firsts, seconds, batch_size):
        margins = real(judge, tok, messages, firsts, seconds, batch_size)
        calls.append((firsts, seconds, margins))
        return margins
    monkeypatch.setattr(E, "judge_margins", spy)
    battles = tmp_path / "judge.jsonl"
    results = E.evaluate(E.Args(model=[other], baseline=tiny_dir, judge=tiny_dir, reward_fn=lengthy,
                                data=alpaca_file(tmp_path), limit=4, max_new_tokens=4, batch_size=2,
                                score_batch_size=3, battles=str(battles)))
    (texts, base_texts, ab), (firsts, seconds, ba) = calls
    assert firsts == base_texts and seconds == texts and texts != base_texts
    records = [json.loads(line) for line in battles.read_text().splitlines()]
    for i, r in enumerate(records):
        model_first, model_second = torch.sign(ab[i]).item(), -torch.sign(ba[i]).item()
        expected = "tie" if model_first != model_second else {1.0: "model_a", -1.0: "model_b"}[model_first]
        assert r["winner"] == expected and r["question_id"] == i and r["judge"] == f"judge:{tiny_dir}"
        assert (r["model_a"], r["model_b"]) == (other, tiny_dir)
        assert r["conversation_a"][-1]["content"] == texts[i] and r["conversation_b"][-1]["content"] == base_texts[i]
    pair = results[other]["pairwise"]
    assert pair["win_rate"] == sum({"model_a": 1, "model_b": 0, "tie": 0.5}[r["winner"]] for r in records) / 4
    assert pair["agreement_n"] <= 4 and "pairwise" not in results[tiny_dir]
    assert results[other]["reference"]["n"] == 4
    printed = capsys.readouterr().out
    assert "| judge win rate vs baseline ± se | judge picks A ± se | judge flips | judge agrees with reward ± se |" \
        in printed and "| BLEU (4 refs) | ROUGE-L ± se |" in printed


def test_a_judge_that_always_picks_a_finds_every_pair_a_tie(tiny_dir, tmp_path, monkeypatch, lengthy):
    """A stub judge with a pure position bias (A, whatever the answers): every verdict flips when the sides swap, so
    every pair is a tie, the win rate ½, the first position picked every time, and against the reward function it
    is right half the time on each pair the reward orders (a tie counts half)."""
    from nanorlhf import evaluate as E
    monkeypatch.setattr(E, "judge_margins", lambda judge, tok, messages, firsts, seconds, batch_size:
                        torch.ones(len(firsts)))
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(5)))
    results = E.evaluate(E.Args(model=[tiny_dir], baseline=tiny_dir, judge=tiny_dir, reward_fn=lengthy,
                                data=str(data), limit=5, max_new_tokens=3, battles=str(tmp_path / "b.jsonl")))
    pair = results[tiny_dir]["pairwise"]
    assert pair["win_rate"] == 0.5 and pair["win_se"] == 0.0 and pair["position_a"] == 1.0 and pair["flips"] == 1.0
    assert pair["agreement_n"] == 0  # the model is the baseline: the reward orders no pair
    assert {json.loads(line)["winner"] for line in open(tmp_path / "b.jsonl")} == {"tie"}


def test_judge_margin_is_the_logit_difference_at_the_answer_position(tiny_dir):
    """Each row of a right-padded batch reads log p(A) - log p(B) at its own last token: what a forward of that row
    alone gives as logits["A"] - logits["B"] at its last position."""
    from nanorlhf import model as M
    from nanorlhf.data import render_prompt
    from nanorlhf.evaluate import JUDGE_PROMPT, conversation, judge_margins
    judge, tok = M.load_model(tiny_dir)
    messages = [[{"role": "user", "content": "Hi " * n}] for n in (1, 7, 3)]
    firsts, seconds = ["Hello.", "A much longer answer than the other one.", "Yes"], ["Hey", "No.", "Maybe so."]
    margins = judge_margins(judge, tok, messages, firsts, seconds, batch_size=2)
    a, b = (tok.encode(x, add_special_tokens=False)[0] for x in ("A", "B"))
    for m, x, y, margin in zip(messages, firsts, seconds, margins):
        ids = render_prompt(tok, [{"role": "user", "content": JUDGE_PROMPT.format(prompt=conversation(m), a=x, b=y)}])
        with torch.no_grad():
            logits = judge(torch.tensor([ids])).logits[0, -1]
        torch.testing.assert_close(margin, logits[a] - logits[b], rtol=1e-4, atol=1e-5)
    assert margins.unique().numel() == 3


def test_references_come_from_the_answer_the_data_gives(tmp_path, tokenizer):
    """alpaca's output, a preference pair's chosen reply and a prompt file's `reference` column are references; a
    prompt with none has None."""
    from nanorlhf.data import load_prompts
    from nanorlhf.evaluate import references
    files = {"alpaca.json": [{"instruction": "Q1", "input": "", "output": "A1"}],
             "pref.jsonl": [{"prompt": "Q2", "chosen": "good", "rejected": "bad"}],
             "ref.jsonl": [{"prompt": "Q3", "reference": "R3"}, {"prompt": "Q4"}]}
    found = {}
    for name, rows in files.items():
        path = tmp_path / name
        path.write_text(json.dumps(rows) if name.endswith(".json") else "".join(json.dumps(r) + "\n" for r in rows))
        args = Args(data=str(path))
        found[name] = references(load_prompts(str(path), tokenizer, 256), args)
    assert found == {"alpaca.json": ["A1"], "pref.jsonl": ["good"], "ref.jsonl": ["R3", None]}


def test_bleu_and_rouge_l_by_hand():
    """A response that is the reference less its last word: every n-gram precision is 1, so BLEU is the brevity
    penalty alone, 100·exp(1 - 7/6); ROUGE-L's LCS is the 6 words, P = 1, R = 6/7, F1 = 12/13. The second prompt has
    no reference and is left out."""
    from nanorlhf.evaluate import reference_metrics
    m = reference_metrics(["the cat sat on the mat", "anything"], ["the cat sat on the mat today", None])
    assert m["n"] == 1 and math.isclose(m["bleu"], 100 * math.exp(1 - 7 / 6), rel_tol=1e-6)
    assert math.isclose(m["rouge_l"], 12 / 13, rel_tol=1e-6) and m["rouge_l_se"] == 0.0
