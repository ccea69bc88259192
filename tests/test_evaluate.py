import json

from conftest import tiny_llama

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
    args = Args(model=[tiny_dir, other], baseline=tiny_dir, rm=tiny_rm_dir, data=str(prompts), limit=5,
                max_new_tokens=5, batch_size=3, out=str(out))
    results = evaluate(args)
    # the baseline judged against itself: same seed, same samples, every comparison a tie, zero KL
    assert results[tiny_dir]["win_rate"] == 0.5 and results[tiny_dir]["kl"] == 0.0
    row = results[other]
    assert 0.0 <= row["win_rate"] <= 1.0 and row["kl"] is not None and row["length"] <= 5
    assert json.loads(out.read_text())[other]["score"] == row["score"]
    assert "| model | RM score ± se | RM win rate vs baseline | RM gain ± se |" in capsys.readouterr().out
