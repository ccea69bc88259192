"""The verifiable task: every generated problem's answer is read back from its words; the reward is exact match."""
import json
import os

from conftest import ROOT

from nanorlhf import arithmetic as A


def test_answers_read_back_from_each_template():
    assert A.answer("Ana has 12 apples. Ana gets 30 more apples. How many apples does Ana have now?") == 42
    assert A.answer("Ben had 37 coins and gave away 9 of them. How many coins are left?") == 28
    assert A.answer("There are 6 boxes with 7 cards in each box. How many cards are there in all?") == 42
    assert A.answer("Gus shares 48 cookies equally among 8 friends. How many cookies does each friend get?") == 6
    assert A.answer("What is the capital of France?") is None


def test_reward_is_exact_match_on_the_last_number():
    p = "Ana has 12 apples. Ana gets 30 more apples. How many apples does Ana have now?"
    assert A.reward([p] * 5, ["42", "12 + 30 = 42.", "The answer is 42 apples", "42 or 41", "forty-two"]) == \
        [1.0, 1.0, 1.0, 0.0, 0.0]


def test_generated_sets_are_distinct_and_answerable():
    train = A.make(300, seed=0)
    test = A.make(100, seed=1, exclude=[r["prompt"] for r in train])
    prompts = [r["prompt"] for r in train + test]
    assert len(set(prompts)) == 400 and all(A.answer(p) is not None and A.answer(p) >= 0 for p in prompts)
    read = lambda name: [json.loads(line) for line in open(os.path.join(ROOT, "data", name))]  # noqa: E731
    shipped_train, shipped_test = read("arithmetic.jsonl"), read("arithmetic_test.jsonl")
    assert shipped_train == A.make(500, 0)  # the shipped files are what the documented commands write
    assert shipped_test == A.make(200, 1, exclude=[r["prompt"] for r in shipped_train])
