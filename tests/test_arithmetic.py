"""The verifiable task: every generated problem's `answer` column matches what its words ask; the reward is exact
match against that column."""
import json
import os
import re

from conftest import ROOT

from nanorlhf import arithmetic as A


OPERATIONS = {"gets": "+", "gave away": "-", "boxes with": "*", "equally among": "/"}  # the wording that says which


def read_back(problem):
    """An independent oracle: the result a problem asks for, read from its own words."""
    op = next(o for phrase, o in OPERATIONS.items() if phrase in problem)
    a, b = [int(x) for x in re.findall(r"\d+", problem)][:2]
    return {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]


def test_accuracy_is_exact_match_on_the_last_number_against_the_answer_column():
    completions = ["42", "12 + 30 = 42.", "The answer is 42 apples", "42 or 41", "forty-two"]
    assert A.accuracy(completions=completions, answer=[42] * 5, prompts=["p"] * 5) == [1.0, 1.0, 1.0, 0.0, 0.0]
    conversational = [[{"role": "assistant", "content": c}] for c in ("It is 7.", "7", "8")]
    assert A.accuracy(completions=conversational, answer=[7, 8, 8]) == [1.0, 0.0, 1.0]


def test_generated_sets_are_distinct_and_answerable():
    train = A.make(300, seed=0)
    test = A.make(100, seed=1, exclude=[r["prompt"] for r in train])
    prompts = [r["prompt"] for r in train + test]
    assert len(set(prompts)) == 400 and all(r["answer"] == read_back(r["prompt"]) >= 1 for r in train + test)
    read = lambda name: [json.loads(line) for line in open(os.path.join(ROOT, "data", name))]  # noqa: E731
    shipped_train, shipped_test = read("arithmetic.jsonl"), read("arithmetic_test.jsonl")
    assert shipped_train == A.make(500, 0)  # the shipped files are what the documented commands write
    assert shipped_test == A.make(200, 1, exclude=[r["prompt"] for r in shipped_train])
