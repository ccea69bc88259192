"""The labeller (preference data from a judge), the gold reward, and evaluation by a reward function."""
import json

import pytest

from nanorlhf import evaluate as E
from nanorlhf import gold
from nanorlhf import label as L
from nanorlhf.data import load_examples


def test_pairs_of_hand_computed():
    responses, scores = ["a", "b", "c", "d"], [0.5, -0.2, 0.9, 0.5]
    usable = [True, True, True, False]
    # best-worst: c (0.9) against b (-0.2); d is unusable
    assert L.pairs_of(responses, scores, usable, "best-worst", 0.0) == [(2, 1, pytest.approx(1.1))]
    # all pairs of the usable ones, better first, with their margins; the 0.7 floor drops c > a (0.4)
    assert L.pairs_of(responses, scores, usable, "all", 0.7) == [(2, 1, pytest.approx(1.1)), (0, 1, pytest.approx(0.7))]
    assert L.pairs_of(responses, [0.3, 0.3, 0.3, 0.3], usable, "all", 0.0) == []  # ties are never pairs
    assert L.pairs_of(responses, scores, [True, False, False, False], "best-worst", 0.0) == []


def test_ranks_tie_equal_scores_and_leave_out_unfinished():
    assert L.ranks([1.0, 0.0, 0.0, 0.0], [True] * 4) == [0, 1, 1, 1]  # one right, three equally wrong
    assert L.ranks([0.5, 0.9, 0.5, 2.0], [True, True, True, False]) == [1, 0, 1, None]


@pytest.fixture
def scripted_label(tiny_dir, tmp_path, monkeypatch):
    """label() on fixed responses: per prompt 'yes' (score 1), 'no', 'no way' (0 each), all ended, and 'yes but'
    (score 1) that hit the length limit, so each prompt has a tie and an unfinished response."""
    (tmp_path / "yesno.py").write_text("def reward(prompts, responses):\n"
                                       "    return [float(r.startswith('yes')) for r in responses]\n")
    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(2)))
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    texts, ended = ["yes", "no", "no way", "yes but"], [True, True, True, False]
    monkeypatch.setattr(L, "generate_all", lambda model, tokenizer, queries, *a, **kw: (
        [tok(texts[i % 4], add_special_tokens=False).input_ids for i in range(len(queries))],
        [ended[i % 4] for i in range(len(queries))]))

    def run(**kw):
        out = tmp_path / "labels"
        L.label(L.Args(**{"model": tiny_dir, "data": str(prompts), "k": 4, "reward_fn": "yesno:reward",
                          "out": str(out), "overwrite": True} | kw))
        return out
    return run


def test_samples_jsonl_pairs_no_ties_and_no_unfinished(scripted_label):
    out = scripted_label(pairs="all")
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert [s["rank"] for s in samples] == [[0, 1, 1, None]] * 2 and samples[0]["scores"] == [1.0, 0.0, 0.0, 1.0]
    # the ranked loader makes exactly pairs.jsonl's pairs: the right answer over each wrong one, nothing else
    ranked = [(e.chosen, e.rejected) for e in load_examples(str(out / "samples.jsonl"), "pairs")]
    assert ranked == [("yes", "no"), ("yes", "no way")] * 2
    assert ranked == [(e.chosen, e.rejected) for e in load_examples(str(out / "pairs.jsonl"), "pairs")]
    # under best-worst (or a margin floor) pairs.jsonl keeps fewer: one pair a prompt, of the loader's two
    out = scripted_label()
    best_worst = [(e.chosen, e.rejected) for e in load_examples(str(out / "pairs.jsonl"), "pairs")]
    assert len(best_worst) == 2 and set(best_worst) < set(ranked)
    assert len(load_examples(str(out / "samples.jsonl"), "pairs")) == 4


def test_kto_jsonl_labels_both_sides_of_a_binary_judge(scripted_label):
    """Scores [1, 0, 0] among the finished responses: the right one desirable, both wrong ones undesirable."""
    out = scripted_label()
    kto = [(e.completion, e.label) for e in load_examples(str(out / "kto.jsonl"), "unpaired")]
    assert kto == [("yes", True), ("no", False), ("no way", False)] * 2


def test_a_response_no_judge_scores_is_in_no_pair_and_no_kto_example(scripted_label, tmp_path):
    """A TRL-style judge returns None for 'no way': that response has no score (null, no rank), so it is never the
    rejected side of a pair nor an undesirable example; its neighbours are labelled as before."""
    (tmp_path / "maybe_yes.py").write_text(
        "def reward(completions, **kwargs):\n"
        "    return [None if c == 'no way' else float(c.startswith('yes')) for c in completions]\n")
    out = scripted_label(reward_fn="maybe_yes:reward", pairs="all")
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert [(s["scores"], s["rank"]) for s in samples] == [([1.0, 0.0, None, 1.0], [0, 1, None, None])] * 2
    pairs = [(e.chosen, e.rejected) for e in load_examples(str(out / "pairs.jsonl"), "pairs")]
    assert pairs == [("yes", "no")] * 2
    kto = [(e.completion, e.label) for e in load_examples(str(out / "kto.jsonl"), "unpaired")]
    assert kto == [("yes", True), ("no", False)] * 2
    summary = json.load(open(out / "label.json"))["summary"]
    assert summary["unscored"] == 2 and summary["mean_score"] == pytest.approx(4 / 6)  # over the scored six


def test_kto_labels_hand_computed():
    scores = [0.1, 0.5, 0.3, 0.9, -1.0]
    # mean of the usable four (0.1, 0.5, 0.3, 0.9) is 0.45: 0.5 and 0.9 desirable, 0.1 and 0.3 not
    assert L.kto_labels(scores, [True, True, True, True, False]) == [(0, False), (1, True), (2, False), (3, True)]
    # a response at the mean (0.3 of 0.1, 0.5, 0.3) is left out; so is a whole tied group, float sums or not
    assert L.kto_labels([0.1, 0.5, 0.3], [True] * 3) == [(0, False), (1, True)]
    assert L.kto_labels([0.1] * 7, [True] * 7) == []
    # a binary judge: both sides are labelled whichever answer is the majority (a median keeps only the minority)
    assert L.kto_labels([1.0, 0.0, 0.0, 0.0], [True] * 4) == [(0, True), (1, False), (2, False), (3, False)]
    assert L.kto_labels([1.0, 1.0, 1.0, 0.0], [True] * 4) == [(0, True), (1, True), (2, True), (3, False)]
    # --kto-threshold: above desirable, below undesirable, equal left out, as its help says
    assert L.kto_labels(scores, [True] * 5, threshold=0.2) == [(0, False), (1, True), (2, True), (3, True), (4, False)]
    assert L.kto_labels(scores, [True] * 5, threshold=0.3) == [(0, False), (1, True), (3, True), (4, False)]


def test_gold_sentiment_orders_hand_picked_sentences():
    pytest.importorskip("vaderSentiment")
    positive, neutral, negative = gold.sentiment(
        ["q"] * 3, ["What a wonderful, happy day; I love it!", "The train leaves at nine.",
                    "This is a terrible, sad failure and I hate it."])
    assert positive > 0.5 and neutral == 0.0 and negative < -0.5


def test_labeller_writes_pairs_and_kto_examples_our_loader_reads(tiny_dir, tmp_path, lengthy):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(5)))
    out = tmp_path / "labels"
    args = L.Args(model=tiny_dir, data=str(prompts), k=4, reward_fn=lengthy, pairs="all", keep_unfinished=True,
                  max_new_tokens=6, batch_size=8, out=str(out))
    summary = L.label(args)
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert len(samples) == 5 and all(len(s["responses"]) == 4 for s in samples)
    score_of = {(json.dumps(s["prompt"]), r): v for s in samples for r, v in zip(s["responses"], s["scores"])}
    for s in samples:  # the judge's own scores, ranked best first
        assert s["scores"] == pytest.approx([len(r) / 10 for r in s["responses"]])
        assert sorted(range(4), key=lambda i: s["rank"][i]) == sorted(range(4), key=lambda i: -s["scores"][i])
    pairs = [json.loads(line) for line in open(out / "pairs.jsonl")]
    assert pairs and len(pairs) == summary["pairs"]
    for p in pairs:
        chosen, rejected = score_of[json.dumps(p["prompt"]), p["chosen"]], score_of[json.dumps(p["prompt"]), p["rejected"]]
        assert chosen > rejected and p["margin"] == pytest.approx(chosen - rejected)
    kto = [json.loads(line) for line in open(out / "kto.jsonl")]
    assert {k["label"] for k in kto} == {True, False}
    # what train_rm / train_dpo (pairs) and train_kto (unpaired) read
    assert len(load_examples(str(out / "pairs.jsonl"), "pairs")) == len(pairs)
    assert len(load_examples(str(out / "kto.jsonl"), "unpaired")) == len(kto)
    assert len(load_examples(str(out / "samples.jsonl"), "pairs")) > 0  # ranked lists: all their ordered pairs
    with pytest.raises(L.UserError, match="already holds labelled data"):
        L.label(args)


def test_evaluate_by_reward_fn_against_itself_is_a_tie(tiny_dir, tmp_path, lengthy):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(6)))
    results = E.evaluate(E.Args(model=[tiny_dir], baseline=tiny_dir, reward_fn=lengthy, data=str(prompts),
                                limit=6, max_new_tokens=5, batch_size=3))
    row = results[tiny_dir]
    judged = row["judges"]["reward"]  # the function's part: its name
    # same seed, same samples: every comparison is a tie, the gain 0, the KL 0
    assert judged["win_rate"] == 0.5 and judged["gain"] == 0.0 and row["kl"] == pytest.approx(0.0, abs=1e-6)
    assert row["score"] == judged["mean"] and judged["se"] > 0


def test_rewarder_logs_the_gold_part_without_optimising_it(tokenizer, tmp_path, monkeypatch):
    """--gold-reward-fn is a part of its own: in the parts PPO and GRPO log, never in the score they optimise."""
    (tmp_path / "judges.py").write_text("def length(prompts, responses):\n    return [len(r) for r in responses]\n"
                                        "def shouty(prompts, responses):\n    return [r.count('!') for r in responses]\n")
    monkeypatch.chdir(tmp_path)
    from nanorlhf.rewards import Rewarder
    rewarder = Rewarder(tokenizer, reward_fn="judges:length", gold_fn="judges:shouty")
    messages = [[{"role": "user", "content": "Hi"}]] * 2
    responses = [tokenizer(t, add_special_tokens=False).input_ids for t in ("Yes!!", "No")]
    scores, parts, texts = rewarder(messages, [[1], [1]], responses, [True, True], 2)
    assert texts == ["Yes!!", "No"]
    assert scores.tolist() == [5.0, 2.0] and parts["length"].tolist() == [5.0, 2.0]
    assert parts["gold"].tolist() == [2.0, 0.0]
