"""A small verifiable task: arithmetic word problems with an exact-match reward on the final number.

    python -m nanorlhf.arithmetic --n 500 --seed 0 --out data/arithmetic.jsonl         # the training prompts
    python -m nanorlhf.arithmetic --n 200 --seed 1 --exclude data/arithmetic.jsonl --out data/arithmetic_test.jsonl
    python train_grpo.py --model smollm2 --data data/arithmetic.jsonl --reward-fn nanorlhf.arithmetic:accuracy ...

Each problem is one of four templates (add, take away, multiply, share equally) over small numbers, sized so
that SmolLM2-135M gets about one in five right (a task it already solves sometimes: a group of samples then
holds both right and wrong answers, which is what a group baseline learns from). Each record carries its result
in an `answer` column, and `accuracy` is a reward function in TRL's GRPOTrainer contract that reads it: the worked
example of a verifiable reward of your own (README, "Your own reward"). It compares the last number in each
completion with the answer (1.0 right, 0.0 wrong or missing).
"""
import argparse
import json
import random
import re

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena"]
THINGS = ["apples", "books", "marbles", "pencils", "stickers", "cookies", "coins", "shells", "cards", "stamps"]
ASK = " Give the answer as a number."
# (template, operation); {a} is always the first number in the text and {b} the second
TEMPLATES = [
    ("{name} has {a} {things}. {name} gets {b} more {things}. How many {things} does {name} have now?", "+"),
    ("{name} had {a} {things} and gave away {b} of them. How many {things} are left?", "-"),
    ("There are {a} boxes with {b} {things} in each box. How many {things} are there in all?", "*"),
    ("{name} shares {a} {things} equally among {b} friends. How many {things} does each friend get?", "/"),
]
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def make(n, seed=0, exclude=()):
    """n distinct problems as {"prompt": text, "answer": result} records, none of them in `exclude`; results are
    whole numbers from 1 to 25."""
    rng, out, seen = random.Random(seed), [], set(exclude)
    while len(out) < n:
        template, op = rng.choice(TEMPLATES)
        if op == "+":
            a, b = rng.randint(1, 12), rng.randint(1, 12)
        elif op == "-":
            a = rng.randint(3, 20)
            b = rng.randint(1, a - 1)
        elif op == "*":
            a, b = rng.randint(2, 5), rng.randint(2, 5)
        else:
            b = rng.randint(2, 5)
            a = b * rng.randint(1, 5)
        text = template.format(name=rng.choice(NAMES), things=rng.choice(THINGS), a=a, b=b) + ASK
        if text not in seen:
            seen.add(text)
            out.append({"prompt": text, "answer": {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]})
    return out


def final_number(response):
    """The last number in the response, or None."""
    numbers = NUMBER.findall(response.replace(",", ""))
    return float(numbers[-1]) if numbers else None


def accuracy(completions, answer, **kwargs):
    """1.0 where a completion's last number is its row's `answer` column, else 0.0: a reward function for
    --reward-fn as TRL's GRPOTrainer calls one (keyword arguments; completions are strings, or one assistant
    message each for conversational data; **kwargs takes the other columns and completion_ids)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(got is not None and got == want) for got, want in zip(map(final_number, texts), answer)]


reward = accuracy  # the name the commands in the README and docs/ were run with


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=500, help="Number of problems.")
    p.add_argument("--seed", type=int, default=0, help="Random seed (another seed gives another set).")
    p.add_argument("--exclude", help="A file of problems to leave out (e.g. the training set, for a held-out set).")
    p.add_argument("--out", required=True,
                   help="JSON-lines file to write ({\"prompt\": ..., \"answer\": ...} per line).")
    args = p.parse_args(argv)
    exclude = [json.loads(line)["prompt"] for line in open(args.exclude)] if args.exclude else []
    with open(args.out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in make(args.n, args.seed, exclude))
    print(f"wrote {args.n} problems to {args.out}")


if __name__ == "__main__":
    main()
