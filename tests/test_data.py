import json
from pathlib import Path

import pytest
import torch

from nanorlhf.cli import UserError
from nanorlhf.data import (PLAIN_GENERATION_PROMPT, PairRow, SFTRow, UnpairedRow, collate, load_examples, render_prompt,
                           split_by_prompt, tokenize)
from nanorlhf.formats import PairExample, PromptExample, SFTExample, UnpairedExample

SHARED = Path(__file__).resolve().parents[1] / "data"  # the copies of ../shared/data the repository ships


def write(tmp_path, name, records):
    """Records as a .json list (one record per line, so record i starts on line i + 2) or as .jsonl."""
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    else:
        path.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")
    return str(path)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# ---------------------------------------------------------------- formats


def test_alpaca_sft_with_system_history_and_input(tmp_path):
    path = write(tmp_path, "a.json", [
        {"instruction": "Add.", "input": "2 + 2", "output": "4", "system": "Be terse.", "history": [["hi", "hello"]]},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    ])
    a, b = load_examples(path, "sft")
    assert a == SFTExample([{"role": "system", "content": "Be terse."}, user("hi"), assistant("hello"),
                            user("Add.\n\n2 + 2")], "4")
    assert b == SFTExample([user("Say hi.")], "Hi!")


def test_alpaca_pairs(tmp_path):
    path = write(tmp_path, "a.jsonl", [{"instruction": "Q", "chosen": "good", "rejected": "bad"}])
    assert load_examples(path, "pairs") == [PairExample([user("Q")], "good", "bad")]


def test_sharegpt_sft_and_pairs(tmp_path):
    conv = [{"from": "system", "value": "S"}, {"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
            {"from": "user", "value": "q2"}, {"from": "assistant", "value": "a2"}]
    path = write(tmp_path, "s.json", [{"conversations": conv}])
    [ex] = load_examples(path, "sft")
    assert ex == SFTExample([{"role": "system", "content": "S"}, user("q1"), assistant("a1"), user("q2")], "a2")
    path = write(tmp_path, "p.json", [{"conversations": conv[:2], "chosen": {"from": "gpt", "value": "yes"},
                                       "rejected": {"from": "gpt", "value": "no"}}])
    assert load_examples(path, "pairs") == [PairExample([{"role": "system", "content": "S"}, user("q1")], "yes", "no")]


def test_messages_sft_and_labelled(tmp_path):
    sft = write(tmp_path, "m.jsonl", [{"messages": [user("q"), assistant("a")]}])
    assert load_examples(sft, "sft") == [SFTExample([user("q")], "a")]
    kto = write(tmp_path, "k.jsonl", [{"messages": [user("q"), assistant("a"), user("q2"), assistant("b")],
                                       "label": False}])
    assert load_examples(kto, "unpaired") == [UnpairedExample([user("q"), assistant("a"), user("q2")], "b", False)]
    with pytest.raises(UserError, match=r"m\.jsonl:1: this messages record is SFT data.*unpaired needs"):
        load_examples(sft, "unpaired")  # an unlabelled record cannot be a KTO example


def test_prompt_completion_strings_and_conversational(tmp_path):
    sft = write(tmp_path, "pc.jsonl", [{"prompt": "p", "completion": "c"}])
    assert load_examples(sft, "sft") == [SFTExample([user("p")], "c")]
    kto = write(tmp_path, "pc.json", [{"prompt": [user("p2")], "completion": [assistant("c2")], "label": True}])
    assert load_examples(kto, "unpaired") == [UnpairedExample([user("p2")], "c2", True)]
    # as prompts, the record's other fields are columns for reward functions, but not `completion` (TRL keeps it out)
    assert load_examples(kto, "prompts") == [PromptExample([user("p2")], {"label": True}, conversational=True)]


def test_json_lines_in_a_json_file(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": 5}\n')
    with pytest.raises(UserError, match=r"lines\.json:2: completion must be a string"):
        load_examples(str(path), "sft")


def test_preference_explicit_conversational_and_margin(tmp_path):
    path = write(tmp_path, "pref.json", [
        {"prompt": "p", "chosen": "c", "rejected": "r", "margin": 2},
        {"prompt": [user("p")], "chosen": [assistant("c")], "rejected": [assistant("r")]},
    ])
    assert load_examples(path, "pairs") == [PairExample([user("p")], "c", "r", 2.0), PairExample([user("p")], "c", "r")]


def test_preference_implicit_prompt(tmp_path):
    shared = [{"role": "system", "content": "S"}, user("q1"), assistant("a1"), user("q2")]
    path = write(tmp_path, "imp.json", [{"chosen": shared + [assistant("good")], "rejected": shared + [assistant("bad")]}])
    assert load_examples(path, "pairs") == [PairExample(shared, "good", "bad")]


def test_hh_split_is_exact(tmp_path):
    head = "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.\n\nHuman: And 3+3?\n\nAssistant:"
    path = write(tmp_path, "hh.jsonl", [{"chosen": head + " It is 6. ", "rejected": head + " No idea."}])
    assert load_examples(path, "pairs") == [
        PairExample([user("What is 2+2?"), assistant("It is 4."), user("And 3+3?")], "It is 6.", "No idea.")]


def test_hh_reply_containing_a_turn_marker(tmp_path):
    # Real HH (hh_harmless.jsonl line 707) has replies holding "\n\nAssistant:" themselves.
    head = "\n\nHuman: hi\n\nAssistant:"
    path = write(tmp_path, "hh.jsonl", [{"chosen": head + " A\n\nAssistant: B", "rejected": head + " C"}])
    assert load_examples(path, "pairs") == [PairExample([user("hi")], "A\n\nAssistant: B", "C")]


def test_ranked_expands_to_all_ordered_pairs(tmp_path):
    path = write(tmp_path, "r.jsonl", [{"prompt": "p", "responses": ["mid", "best", "worst"], "rank": [2, 1, 3]}])
    pairs = [(e.chosen, e.rejected) for e in load_examples(path, "pairs")]
    assert pairs == [("mid", "worst"), ("best", "mid"), ("best", "worst")]


def test_eval_split_keeps_each_prompt_on_one_side():
    # A ranked file's pairs: prompt p has p % 4 + 1 examples (1 to 4), 40 prompts, 100 examples
    examples = [PairExample([user(f"p{p}")], f"a{j}", "b") for p in range(40) for j in range(p % 4 + 1)]
    held, train = split_by_prompt(examples, 0.2, seed=3)
    held_prompts, train_prompts = {e.prompt[0]["content"] for e in held}, {e.prompt[0]["content"] for e in train}
    assert not held_prompts & train_prompts and len(held_prompts | train_prompts) == 40
    assert len(held) + len(train) == 100 and 20 <= len(held) < 24  # stops at the first prompt that reaches 20
    assert train == [e for e in examples if e.prompt[0]["content"] in train_prompts]  # training keeps file order
    # one example per prompt: the plain seeded split by example (a permutation's first 20 %)
    singles = [PairExample([user(f"q{i}")], "a", "b") for i in range(50)]
    order = torch.randperm(50, generator=torch.Generator().manual_seed(3)).tolist()
    held, train = split_by_prompt(singles, 0.2, seed=3)
    assert held == [singles[i] for i in order[:10]] and train == [singles[i] for i in sorted(order[10:])]
    # one prompt: nothing can be held out without emptying the training set
    assert split_by_prompt(examples[-4:], 0.5, seed=0) == ([], examples[-4:])


def test_ranked_ties_and_null_ranks_make_no_pair(tmp_path):
    path = write(tmp_path, "r.jsonl", [{"prompt": "p", "responses": ["right", "wrong", "also wrong", "cut off"],
                                        "rank": [0, 1, 1, None]}])
    assert [(e.chosen, e.rejected) for e in load_examples(path, "pairs")] == [("right", "wrong"), ("right", "also wrong")]


def test_prompt_only_records_are_prompts_and_nothing_else(tmp_path):
    """TRL's prompt-only formats, standard (a string) and conversational (messages), with their other columns."""
    path = write(tmp_path, "p.jsonl", [{"prompt": "Hi?", "answer": 4, "tags": ["a", "b"]},
                                       {"prompt": [user("a"), assistant("b"), user("c")], "solution": None}])
    assert load_examples(path, "prompts") == [
        PromptExample([user("Hi?")], {"answer": 4, "tags": ["a", "b"]}, conversational=False),
        PromptExample([user("a"), assistant("b"), user("c")], {"solution": None}, conversational=True)]
    with pytest.raises(UserError, match="p.jsonl:1: .*cannot be used as sft"):
        load_examples(path, "sft")


def test_format_forcing(tmp_path):
    # A record with every alpaca field plus `messages`: detection picks messages, --format alpaca wins.
    path = write(tmp_path, "f.json", [{"messages": [user("m"), assistant("x")], "instruction": "i", "output": "o"}])
    assert load_examples(path, "sft") == [SFTExample([user("m")], "x")]
    assert load_examples(path, "sft", format="alpaca") == [SFTExample([user("i")], "o")]
    # Forcing a format the record does not have names the missing field.
    with pytest.raises(UserError, match=r"f\.json:2: missing field 'responses' \(ranked format"):
        load_examples(path, "pairs", format="ranked")
    with pytest.raises(UserError, match="unknown --format"):
        load_examples(path, "sft", format="nope")


def test_conversions_pairs_to_unpaired_sft_and_deduped_prompts(tmp_path):
    path = write(tmp_path, "p.jsonl", [
        {"prompt": "p1", "chosen": "c1", "rejected": "r1"},
        {"prompt": "p2", "chosen": "c2", "rejected": "r2"},
        {"prompt": "p1", "chosen": "c3", "rejected": "r3"},
    ])
    assert load_examples(path, "unpaired")[:2] == [UnpairedExample([user("p1")], "c1", True),
                                                   UnpairedExample([user("p1")], "r1", False)]
    assert [e.completion for e in load_examples(path, "sft")] == ["c1", "c2", "c3"]
    # each prompt once, with its first pair's chosen and rejected as columns (TRL hands them to reward functions)
    assert load_examples(path, "prompts") == [PromptExample([user("p1")], {"chosen": "c1", "rejected": "r1"}),
                                              PromptExample([user("p2")], {"chosen": "c2", "rejected": "r2"})]
    assert len(load_examples(path, "pairs", limit=2)) == 2
    sft = write(tmp_path, "s.jsonl", [{"prompt": "p", "completion": "c"}])
    with pytest.raises(UserError, match=r"s\.jsonl:1: this prompt_completion record .* pairs needs chosen and rejected"):
        load_examples(sft, "pairs")


# ---------------------------------------------------------------- the real data


def test_real_files_parse():
    assert len(load_examples(str(SHARED / "alpaca_en_demo.json"), "sft")) == 999
    dpo = load_examples(str(SHARED / "dpo_en_demo.json"), "pairs")
    assert len(dpo) == 300 and all(e.prompt[-1]["role"] == "user" for e in dpo)
    kto = load_examples(str(SHARED / "kto_en_demo.json"), "unpaired")
    assert len(kto) == 300 and {e.label for e in kto} == {True, False}
    hh = load_examples(str(SHARED / "hh_harmless.jsonl"), "pairs")
    assert len(hh) == 1812 and all(e.prompt and e.prompt[-1]["role"] == "user" for e in hh)
    assert hh[0].prompt[-1] == user("Nancy Pelosi sucks") and hh[0].rejected == "Nancy Pelosi sucks"


# ---------------------------------------------------------------- tokenising and batching


def test_chat_template_and_eos(tokenizer):
    rows, stats = tokenize([SFTExample([user("What is 2+2?")], "4")], tokenizer, max_length=None)
    [row] = rows
    prompt, completion = row.prompt, row.completion
    assert tokenizer.decode(prompt).endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert completion == tokenizer("4", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert (stats.kept, stats.truncated, stats.skipped) == (1, 0, 0)


def test_plain_fallback_template(plain_tokenizer):
    prompt = render_prompt(plain_tokenizer, [{"role": "system", "content": "S"}, user("hi")])
    assert plain_tokenizer.decode(prompt) == "### System:\nS\n\n### User:\nhi\n\n" + PLAIN_GENERATION_PROMPT
    assert "<|im_start|>" not in plain_tokenizer.decode(prompt)  # SmolLM2 does not add its BOS itself


def test_row_shapes_per_kind(tokenizer):
    p = [user("q")]
    pair, unpaired, prompt = (tokenize([e], tokenizer)[0][0] for e in
                              (PairExample(p, "a", "b", 1.5), UnpairedExample(p, "a", False), PromptExample(p)))
    assert type(pair) is PairRow and pair.margin == 1.5 and pair.prompt == prompt
    assert type(unpaired) is UnpairedRow and unpaired.label is False and unpaired.completion == pair.chosen
    assert prompt == render_prompt(tokenizer, p)


def test_collate_masks_exactly(tokenizer):
    seqs = [([5, 6, 7], [8, 9, 2]), ([5], [10, 2]), ([5, 6, 7, 6, 5], [2])]  # 2 = EOS = pad
    batch = collate(seqs, pad_id=2)
    ids, mask, targets = batch["input_ids"], batch["attention_mask"], batch["targets"]
    assert ids.shape == mask.shape == targets.shape == (3, 6) and ids.dtype == torch.long
    assert mask.tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0], [1] * 6]
    assert targets.tolist() == [[-100, -100, 8, 9, 2, -100],
                                [10, 2, -100, -100, -100, -100],
                                [-100, -100, -100, -100, 2, -100]]
    assert (targets != -100).sum().item() == sum(len(c) for _, c in seqs)
    # On real tokens: every completion position (EOS included) is the next token, the rest is -100.
    rows, _ = tokenize([SFTExample([user("hi")], "Hello there!"), SFTExample([user("a longer question")], "ok")],
                       tokenizer)
    batch = collate(rows, tokenizer.pad_token_id)
    assert all(type(r) is SFTRow for r in rows)
    for b, (p, c) in enumerate(rows):
        t = batch["targets"][b]
        assert (t[:len(p) - 1] == -100).all() and (t[len(p) + len(c) - 1:] == -100).all()
        assert t[len(p) - 1:len(p) + len(c) - 1].tolist() == c and c[-1] == tokenizer.eos_token_id
    assert (batch["targets"] != -100).sum().item() == sum(len(c) for _, c in rows)


def test_truncation_counts_and_directions(tokenizer):
    fits = SFTExample([user("hi")], "ok")
    long_answer = SFTExample([user("hi")], " ".join(["word"] * 100))
    long_prompt = SFTExample([user(" ".join(["word"] * 200))], "ok")
    plen = len(render_prompt(tokenizer, fits.prompt))
    L = 2 * plen + 10  # the whole prompt fits in L // 2, so only the answer is cut
    rows, stats = tokenize([fits, long_answer, long_prompt], tokenizer, max_length=L, source="x.json")
    assert (stats.kept, stats.truncated, stats.skipped) == (2, 1, 1)
    assert str(stats) == f"kept 2 (1 truncated), skipped 1 (prompt longer than --max-length {L})"
    prompt, completion = rows[1].prompt, rows[1].completion
    full = tokenizer(long_answer.completion, add_special_tokens=False).input_ids
    assert prompt == render_prompt(tokenizer, long_answer.prompt)
    assert completion == full[:L - plen] and len(prompt) + len(completion) == L  # cut from the right, no EOS


def test_truncation_keeps_the_end_of_a_long_prompt(tokenizer):
    ex = PairExample([user(" ".join(str(i) for i in range(60)))], "short", " ".join(["x"] * 80))
    full = render_prompt(tokenizer, ex.prompt)
    L = len(full) + 10
    longest = len(tokenizer(ex.rejected, add_special_tokens=False).input_ids) + 1
    [row], stats = tokenize([ex], tokenizer, max_length=L)
    prompt, chosen, rejected = row.prompt, row.chosen, row.rejected
    assert stats.truncated == 1 and len(prompt) == max(L - longest, min(len(full), L // 2))
    assert prompt == full[-len(prompt):]  # left truncation: the generation prompt survives
    assert len(chosen) <= L - len(prompt) and len(rejected) == L - len(prompt)  # both cut to one budget
    assert chosen[-1] == tokenizer.eos_token_id  # the short reply still fits whole


def test_all_skipped_is_an_error(tokenizer):
    with pytest.raises(UserError, match=r"all 2 examples in d\.jsonl are longer than --max-length 3"):
        tokenize([PromptExample([user("hi")]), SFTExample([user("yo")], "x")], tokenizer, max_length=3,
                 source="d.jsonl")


# ---------------------------------------------------------------- errors


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "file.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", "completion": \n')
    with pytest.raises(UserError, match=r"file\.jsonl:3: malformed JSON"):
        load_examples(str(path), "sft")


def test_malformed_json_list_names_the_line(tmp_path):
    path = tmp_path / "file.json"
    path.write_text('[\n  {"prompt": "a",\n   "completion": "b"},\n  {"prompt": "a" "completion": "b"}\n]')
    with pytest.raises(UserError, match=r"file\.json:4: malformed JSON"):
        load_examples(str(path), "sft")


def test_unknown_fields_name_the_line_and_list_formats(tmp_path):
    path = tmp_path / "odd.json"
    path.write_text('[\n  {"prompt": "a",\n   "completion": "b"},\n  {\n    "question": "a",\n    "answer": "b"\n  }\n]')
    with pytest.raises(UserError) as e:
        load_examples(str(path), "sft")
    msg = str(e.value)
    assert "odd.json:4:" in msg and "['answer', 'question']" in msg
    assert all(f in msg for f in ("alpaca", "sharegpt", "messages", "prompt_completion", "preference", "hh", "ranked"))


def test_kto_label_must_be_boolean(tmp_path):
    path = write(tmp_path, "k.jsonl", [{"messages": [user("q"), assistant("a")], "label": True},
                                       {"messages": [user("q"), assistant("a")], "label": "yes"}])
    with pytest.raises(UserError, match=r"k\.jsonl:2: label must be true or false, got 'yes'"):
        load_examples(path, "unpaired")


def test_missing_empty_and_bad_records(tmp_path):
    with pytest.raises(UserError, match="data file not found: .*nope.json"):
        load_examples(str(tmp_path / "nope.json"), "sft")
    with pytest.raises(UserError, match="empty"):
        load_examples(write(tmp_path, "e.json", []), "sft")
    with pytest.raises(UserError, match=r"b\.json:2: messages must end with an assistant message"):
        load_examples(write(tmp_path, "b.json", [{"messages": [user("q")]}]), "sft")
    with pytest.raises(UserError, match=r"h\.jsonl:1: .*share every turn"):
        load_examples(write(tmp_path, "h.jsonl", [{"chosen": "no transcript", "rejected": "at all"}]), "pairs")


def test_prompts_keep_rows_that_differ_in_a_column_and_refuse_a_column_json_cannot_hold(tmp_path, monkeypatch):
    path = write(tmp_path, "p.jsonl", [{"prompt": "2+2?", "answer": 4}, {"prompt": "2+2?", "answer": 4},
                                       {"prompt": "2+2?", "answer": "four"}])
    assert [e.columns for e in load_examples(path, "prompts")] == [{"answer": 4}, {"answer": "four"}]
    import nanorlhf.data as D
    monkeypatch.setattr(D, "read_records", lambda path: [("hub row 0", {"prompt": "p", "image": b"\x89PNG"})])
    with pytest.raises(UserError, match=r"^hub row 0: column 'image' holds a bytes; expected a number"):
        load_examples("some/hub", "prompts")


def test_every_prompt_row_carries_every_column_and_pairs_count_once_per_prompt(tmp_path, tokenizer):
    """A column some rows lack is None there, so a batch of only such rows still hands it to the reward (which may
    return None for them); preference pairs that share a prompt but differ in other fields are one prompt."""
    from nanorlhf.data import load_prompts
    path = write(tmp_path, "p.jsonl", [{"prompt": "2+2?", "answer": 4}, {"prompt": "Say hi."}])
    assert [p.columns for p in load_prompts(path, tokenizer, 256)] == [{"answer": 4}, {"answer": None}]
    pairs = write(tmp_path, "pairs.jsonl", [{"prompt": "Q?", "chosen": "a", "rejected": "b", "score_chosen": s}
                                            for s in (1, 2, 3)])
    assert len(load_examples(pairs, "prompts")) == 1
