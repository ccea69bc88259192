"""Reward functions in TRL's GRPOTrainer contract: keyword arguments with the data's columns, standard and
conversational data, weights, None, and one-line errors; through the Rewarder and through GRPO steps."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from test_grpo import actor_dir, make_args  # noqa: F401  (actor_dir is a fixture)

import train_grpo
from nanorlhf.cli import UserError
from nanorlhf.data import load_prompts
from nanorlhf.rewards import Rewarder, part_means

# Written here with the signatures of TRL's documented examples (a length reward, a regex format reward, an
# accuracy reward reading a column); `text` lets one function serve standard (strings) and conversational data
# ([{"role": "assistant", "content": ...}]), as a TRL user would write it for the data they have.
TRL_FUNCTIONS = r'''
import re

SEEN = []


def text(completion):
    return completion if isinstance(completion, str) else completion[0]["content"]


def length_reward(completions, **kwargs):
    return [float(len(text(c))) for c in completions]


def format_reward(completions, **kwargs):
    return [1.0 if re.fullmatch(r"<think>.*?</think>\s*<answer>.*?</answer>", text(c), re.S) else 0.0
            for c in completions]


def accuracy_reward(prompts, completions, solution, **kwargs):
    SEEN.append(dict(prompts=prompts, completions=completions, solution=solution, **kwargs))
    found = [re.search(r"<answer>(.*?)</answer>", text(c)) for c in completions]
    return [float(m is not None and m.group(1).strip() == str(s)) for m, s in zip(found, solution)]


def maybe(completions, solution, **kwargs):
    """Applies only to rows with a solution: None elsewhere."""
    return [None if s is None else float(len(text(c)) % 3) for c, s in zip(completions, solution)]


def never(completions, **kwargs):
    return [None] * len(completions)


def needs_answer(completions, answer):
    return [0.0] * len(completions)


def reads_answer(completions, **kwargs):
    return [float(a) for a in kwargs["answer"]]


def old_style(prompts, responses):
    return [float(p == "What is 2+2?") for p in prompts]


def old_style_catch_all(prompts, responses, **kwargs):
    SEEN.append(dict(prompts=prompts, responses=responses, **kwargs))
    return [float(len(r)) for r in responses]


def progress(completions, trainer_state, log_metric, log_extra, **kwargs):
    """A reward that grows with training, as TRL's documentation shows one, logging a metric and a column."""
    SEEN.append((trainer_state.global_step, trainer_state.epoch, trainer_state.max_steps))
    log_metric("progress/step_seen", trainer_state.global_step)
    log_extra("why", [f"{len(text(c))} characters" for c in completions])
    return [trainer_state.global_step + 0.5] * len(completions)


def clash(completions, log_metric, **kwargs):
    log_metric("reward", 1.0)
    return [0.0] * len(completions)


def uses_environments(completions, environments, **kwargs):
    return [0.0] * len(completions)


def reads_state(completions, **kwargs):
    return [float(kwargs["trainer_state"].global_step)] * len(completions)


def pair_columns(prompts, completions, chosen, rejected, **kwargs):
    """1 for the preferred reply of the prompt's preference pair, -1 for the rejected one, 0 for anything else."""
    return [float(c == a) - float(c == b) for c, a, b in zip(completions, chosen, rejected)]


TURNS = []


async def first(completions, **kwargs):
    """Two async judges that can only finish together: each waits for the other to have started."""
    import asyncio
    TURNS.append("first")
    while "second" not in TURNS:
        await asyncio.sleep(0.01)
    return [1.0] * len(completions)


async def second(completions, **kwargs):
    import asyncio
    TURNS.append("second")
    while "first" not in TURNS:
        await asyncio.sleep(0.01)
    return [2.0] * len(completions)


async def async_reads_answer(completions, **kwargs):
    return [float(a) for a in kwargs["answer"]]
'''


@pytest.fixture
def trl_module(tmp_path, monkeypatch):
    (tmp_path / "trl_rewards.py").write_text(TRL_FUNCTIONS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("trl_rewards", None)  # each test's own copy, SEEN empty
    yield
    sys.modules.pop("trl_rewards", None)


def user(text):
    return {"role": "user", "content": text}


def write_data(path, conversational, n=2):
    """n rows of a TRL prompt-only dataset with a `solution` column, standard or conversational."""
    rows = [{"prompt": [{"role": "system", "content": "Think first."}, user(f"What is {i}+{i}?")] if conversational
             else f"What is {i}+{i}?", "solution": 2 * i} for i in range(2, 2 + n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


COMPLETIONS = ["<think>2+2</think> <answer>4</answer>", "<answer>4</answer>",  # prompt 0, solution 4
               "<think>hm</think><answer>7</answer>", "six"]                      # prompt 1, solution 6


@pytest.mark.parametrize("conversational", [False, True])
def test_trl_functions_through_the_rewarder_weighted_and_named(tokenizer, tmp_path, trl_module, conversational):
    prompts = load_prompts(write_data(tmp_path / "d.jsonl", conversational), tokenizer, 256)
    rows = [p for p in prompts for _ in range(2)]  # two completions per prompt, as GRPO's groups
    ids = [tokenizer(c, add_special_tokens=False).input_ids for c in COMPLETIONS]
    specs = ["trl_rewards:length_reward", "trl_rewards:format_reward", "trl_rewards:accuracy_reward"]
    rewarder = Rewarder(tokenizer, reward_fn=specs, reward_weights=[0.01, 0.5, 2.0])
    scores, parts, texts = rewarder(rows, [p.ids for p in rows], ids, [True] * 4, 4)
    assert texts == COMPLETIONS
    lengths = [float(len(c)) for c in COMPLETIONS]
    assert parts["length_reward"].tolist() == lengths
    assert parts["format_reward"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert parts["accuracy_reward"].tolist() == [1.0, 1.0, 0.0, 0.0]
    expected = [0.01 * n + 0.5 * f + 2.0 * a for n, f, a in zip(lengths, [1, 0, 1, 0], [1, 1, 0, 0])]
    torch.testing.assert_close(scores, torch.tensor(expected))
    import trl_rewards
    (seen,) = trl_rewards.SEEN  # what TRL would pass: the column as a list, ids, and the data's own shapes
    assert seen["solution"] == [4, 4, 6, 6] and seen["completion_ids"] == ids
    if conversational:
        assert seen["prompts"][0] == [{"role": "system", "content": "Think first."}, user("What is 2+2?")]
        assert seen["completions"][1] == [{"role": "assistant", "content": "<answer>4</answer>"}]
    else:
        assert seen["prompts"] == ["What is 2+2?"] * 2 + ["What is 3+3?"] * 2 and seen["completions"] == COMPLETIONS


def test_old_style_functions_still_get_two_lists_of_strings(tokenizer, tmp_path, trl_module):
    prompts = load_prompts(write_data(tmp_path / "d.jsonl", conversational=True), tokenizer, 256)
    rewarder = Rewarder(tokenizer, reward_fn="trl_rewards:old_style")
    scores, parts, _ = rewarder(prompts, [p.ids for p in prompts], [[1], [1]], [True, True], 2)
    assert scores.tolist() == [1.0, 0.0] and list(parts) == ["old_style"]  # the last user message, as before


def test_none_partly_and_all_none(tokenizer, tmp_path, trl_module, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "solution": 1}) + "\n" + json.dumps({"prompt": "b"}) + "\n")
    prompts = load_prompts(str(data), tokenizer, 256)  # the second row lacks the column: None there
    ids = [tokenizer(t, add_special_tokens=False).input_ids for t in ("abcd", "abcde")]
    # partly None: `maybe` applies to row 0 only; row 1 still gets the length reward, and nothing from `maybe`
    rewarder = Rewarder(tokenizer, reward_fn=["trl_rewards:maybe", "trl_rewards:length_reward"],
                        reward_weights=[10.0, 1.0])
    scores, parts, _ = rewarder(prompts, [p.ids for p in prompts], ids, [True, True], 2)
    assert scores.tolist() == [10.0 * (4 % 3) + 4.0, 5.0]
    assert parts["maybe"][0].item() == 1.0 and math.isnan(parts["maybe"][1].item())
    assert capsys.readouterr().err == ""
    # no function applies to row 1: no score at all (NaN, as TRL marks it), not a 0 that would pass for a verdict,
    # and a warning that says what the caller does with it
    rewarder = Rewarder(tokenizer, reward_fn=["trl_rewards:maybe", "trl_rewards:never"], unscored="so they are X")
    scores, parts, _ = rewarder(prompts, [p.ids for p in prompts], ids, [True, True], 2)
    assert scores[0].item() == 1.0 and math.isnan(scores[1].item()) and parts["never"].isnan().all()
    err = capsys.readouterr().err
    assert err.startswith("warning: no --reward-fn applies to 1 of 2 responses (every function returned None), so "
                          "they are X; e.g. the prompt 'b'"), err


NUMBER = r'''
import re


def number(completions, answer, **kwargs):
    """1 for the right number, 0 for a wrong one, None where the completion holds no number: nothing to judge."""
    found = [re.search(r"-?\d+", c) for c in completions]
    return [None if m is None else float(int(m.group()) == a) for m, a in zip(found, answer)]
'''


def test_a_response_no_function_scores_gets_advantage_0_outside_the_baseline(tokenizer, tmp_path, monkeypatch):
    """Issue #37's reproduction, TRL >= 1.6's rule: "no idea" holds no number, so it has no score; the group's
    baseline and std are over the three scored responses, it gets advantage 0, and the logged reward leaves it out."""
    (tmp_path / "number_reward.py").write_text(NUMBER)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "What is 6 times 7?", "answer": 42}) + "\n")
    (prompt,) = load_prompts(str(data), tokenizer, 256)
    texts = ["42", "41", "no idea", "42"]
    rewarder = Rewarder(tokenizer, reward_fn="number_reward:number")
    scores, _, _ = rewarder([prompt] * 4, [prompt.ids] * 4,
                            [tokenizer(t, add_special_tokens=False).input_ids for t in texts], [True] * 4, 4)
    assert scores.isnan().tolist() == [False, False, True, False]
    # GRPO: mean 2/3 and std sqrt(1/3) of (1, 0, 1): (1 - 2/3) / 0.57735 = 0.57735, (0 - 2/3) / 0.57735 = -1.1547
    torch.testing.assert_close(train_grpo.group_advantages(scores, 4), torch.tensor([0.57735, -1.1547, 0.0, 0.57735]),
                               atol=2e-4, rtol=0)  # eps 1e-4 in the std
    # RLOO: each minus the mean of its other *scored* siblings: 1 - (0 + 1)/2, 0 - (1 + 1)/2, -, 1 - (1 + 0)/2
    torch.testing.assert_close(train_grpo.group_advantages(scores, 4, "rloo"), torch.tensor([0.5, -1.0, 0.0, 0.5]))
    assert part_means({"reward": scores}) == {"reward": pytest.approx(2 / 3)}


def test_old_contract_with_a_catch_all_is_called_the_old_way_and_each_contract_is_said_once(
        tokenizer, tmp_path, trl_module, capsys):
    """f(prompts, responses, **kwargs) names `responses`, which TRL never passes: it is nanorlhf's own contract, two
    lists of strings, not a TRL function that lacks a column. Each function's contract is said once."""
    prompts = load_prompts(write_data(tmp_path / "d.jsonl", conversational=True), tokenizer, 256)
    rewarder = Rewarder(tokenizer, reward_fn=["trl_rewards:old_style_catch_all", "trl_rewards:length_reward"])
    ids = [tokenizer(t, add_special_tokens=False).input_ids for t in ("four", "six!")]
    for _ in range(2):
        scores, parts, _ = rewarder(prompts, [p.ids for p in prompts], ids, [True, True], 2)
    assert parts["old_style_catch_all"].tolist() == [4.0, 4.0]
    import trl_rewards
    assert trl_rewards.SEEN[0] == {"prompts": ["What is 2+2?", "What is 3+3?"], "responses": ["four", "six!"]}
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("--reward-fn")]
    assert said == ["--reward-fn trl_rewards:old_style_catch_all: called as f(prompts, responses), nanorlhf's own "
                    "contract (it names `responses`, not `completions`): the last user message and the decoded "
                    "response, two lists of strings",
                    "--reward-fn trl_rewards:length_reward: called as TRL's GRPOTrainer calls a reward function, with "
                    "prompts, completions, completion_ids, solution"]


def test_trainer_state_log_metric_and_log_extra_in_a_training_run(tokenizer, tmp_path, trl_module):
    """TRL's keywords that are not columns, given a run's state: the step and epoch, a metric for the run's log (the
    mean of a step's values), a column for the samples table; take_logged hands them over once."""
    from nanorlhf.rewards import TrainerState
    prompts = load_prompts(write_data(tmp_path / "d.jsonl", conversational=False), tokenizer, 256)
    rewarder = Rewarder(tokenizer, reward_fn=["trl_rewards:progress", "trl_rewards:reads_state"])
    ids = [tokenizer(t, add_special_tokens=False).input_ids for t in ("four", "six")]
    for step in (3, 5):  # two calls before the run takes what was logged
        scores, parts, _ = rewarder(prompts, [p.ids for p in prompts], ids, [True, True], 2,
                                    state=TrainerState(global_step=step, max_steps=10, epoch=step / 4))
    assert parts["progress"].tolist() == [5.5, 5.5] and parts["reads_state"].tolist() == [5.0, 5.0]
    import trl_rewards
    assert trl_rewards.SEEN == [(3, 0.75, 10), (5, 1.25, 10)]
    metrics, extra = rewarder.take_logged({"loss": 0.1})
    assert metrics == {"loss": 0.1, "progress/step_seen": 4.0}
    assert extra == {"why": ["4 characters", "3 characters"] * 2}
    assert rewarder.take_logged({}) == ({}, {})  # taken: the next step starts empty
    rewarder = Rewarder(tokenizer, reward_fn="trl_rewards:clash")
    rewarder(prompts, [p.ids for p in prompts], ids, [True, True], 2, state=TrainerState(0, 1, 0.0))
    with pytest.raises(UserError, match=r"^--reward-fn trl_rewards:clash logged 'reward' through log_metric, a "
                                        r"metric the run logs itself; expected another name"):
        rewarder.take_logged({"reward": 0.5})


@pytest.mark.parametrize("name, why", [
    ("progress", "'trainer_state', which is not passed here: only a training run (train_grpo.py, train_ppo.py) has "
                 "a step and an epoch to pass"),
    ("reads_state", "'trainer_state', which is not passed here: only a training run"),  # kwargs["trainer_state"]
    ("uses_environments", "'environments', which is not passed here: TRL passes it only with an "
                          "environment_factory (tool-calling rollouts), and nanorlhf samples no tool calls"),
])
def test_what_cannot_be_passed_is_said_not_add_the_column(tokenizer, tmp_path, trl_module, name, why):
    """Outside a training run (the labeller, the evaluation) there is no trainer_state, and nowhere environments: the
    error says so, instead of asking for a column the data cannot hold."""
    prompts = load_prompts(write_data(tmp_path / "d.jsonl", conversational=False), tokenizer, 256)
    rewarder = Rewarder(tokenizer, reward_fn=f"trl_rewards:{name}")
    with pytest.raises(UserError, match=f"^--reward-fn trl_rewards:{name} needs {re.escape(why)}") as e:
        rewarder(prompts, [p.ids for p in prompts], [[1], [1]], [True, True], 2)
    assert "add it" not in str(e.value)


def test_async_functions_are_awaited_together(tokenizer, tmp_path, trl_module):
    """Two async judges that finish only once both have started: run one after the other, they would never end.
    An async function reading a column the data lacks is the same one line as a plain one."""
    prompts = load_prompts(write_data(tmp_path / "d.jsonl", conversational=False), tokenizer, 256)
    rewarder = Rewarder(tokenizer, reward_fn=["trl_rewards:first", "trl_rewards:second"], reward_weights=[1.0, 10.0])
    scores, parts, _ = rewarder(prompts, [p.ids for p in prompts], [[1], [1]], [True, True], 2)
    assert parts["first"].tolist() == [1.0, 1.0] and parts["second"].tolist() == [2.0, 2.0]
    assert scores.tolist() == [21.0, 21.0]
    rewarder = Rewarder(tokenizer, reward_fn="trl_rewards:async_reads_answer")
    with pytest.raises(UserError, match=r"^--reward-fn trl_rewards:async_reads_answer needs the column 'answer'"):
        rewarder(prompts, [p.ids for p in prompts], [[1], [1]], [True, True], 2)


def test_preference_data_keeps_chosen_and_rejected_for_reward_functions(tokenizer, tmp_path, trl_module):
    """Prompts read from preference pairs keep every column but the prompt: a function can score against the pair."""
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon.",
                                "source": "quiz"}) + "\n")
    (prompt,) = load_prompts(str(data), tokenizer, 256)
    assert prompt.columns == {"chosen": "Paris.", "rejected": "Lyon.", "source": "quiz"}
    rewarder = Rewarder(tokenizer, reward_fn="trl_rewards:pair_columns")
    texts = ["Paris.", "Lyon.", "Nice."]
    _, parts, _ = rewarder([prompt] * 3, [prompt.ids] * 3,
                           [tokenizer(t, add_special_tokens=False).input_ids for t in texts], [True] * 3, 3)
    assert parts["pair_columns"].tolist() == [1.0, -1.0, 0.0]


def test_a_missing_column_or_bad_weights_are_one_line(tokenizer, tmp_path, trl_module):
    prompts = load_prompts(write_data(tmp_path / "d.jsonl", conversational=False), tokenizer, 256)
    for name in ("needs_answer", "reads_answer"):  # a parameter, or kwargs["answer"] under **kwargs
        rewarder = Rewarder(tokenizer, reward_fn=f"trl_rewards:{name}")
        with pytest.raises(UserError, match=rf"^--reward-fn trl_rewards:{name} needs the column 'answer', which "
                                            r"the data lacks \(its columns: solution\)"):
            rewarder(prompts, [p.ids for p in prompts], [[1], [1]], [True, True], 2)
    with pytest.raises(UserError, match=r"^--reward-weight: got 1 weights for 2 --reward-fn functions"):
        Rewarder(tokenizer, reward_fn=["trl_rewards:maybe", "trl_rewards:never"], reward_weights=[1.0])
    with pytest.raises(UserError, match=r"another reward already logs under the name 'never'"):
        Rewarder(tokenizer, reward_fn=["trl_rewards:never", "trl_rewards:never"])


@pytest.mark.parametrize("conversational", [False, True])
def test_one_grpo_step_with_trl_functions(actor_dir, tmp_path, trl_module, conversational):  # noqa: F811
    """Each function logged as reward/<name>, and the logged reward is their weighted sum (no None here)."""
    weights = [0.01, 0.5, 2.0]
    args = make_args(tmp_path, actor_dir, data=write_data(tmp_path / "d.jsonl", conversational, n=4), max_steps=1,
                     reward_fn=["trl_rewards:length_reward", "trl_rewards:format_reward",
                                "trl_rewards:accuracy_reward"], reward_weight=weights, ppo_epochs=2,
                     minibatch_size=8, importance_sampling_level="sequence" if conversational else "token")
    train_grpo.train(args)
    (row,) = [json.loads(line) for line in open(os.path.join(args.out, "metrics.jsonl"))]
    names = ["length_reward", "format_reward", "accuracy_reward"]
    assert row["reward/length_reward"] > 0 and math.isfinite(row["loss"])
    assert row["reward"] == pytest.approx(sum(w * row[f"reward/{n}"] for w, n in zip(weights, names)), rel=1e-5)
    import trl_rewards
    (seen,) = trl_rewards.SEEN
    solutions = seen["solution"]  # each prompt's own, on each of its k = 4 responses, every prompt once
    assert sorted(solutions) == [4] * 4 + [6] * 4 + [8] * 4 + [10] * 4
    assert all(solutions[i] == solutions[i - i % 4] for i in range(16))
    asked = [(p if isinstance(p, str) else p[-1]["content"]) for p in seen["prompts"]]
    assert asked == [f"What is {s // 2}+{s // 2}?" for s in solutions]
    assert isinstance(seen["completions"][0], list) == conversational


@pytest.mark.parametrize("script", ["grpo", "ppo"])
def test_a_run_passes_its_state_and_logs_what_functions_send(actor_dir, tmp_path, trl_module, capsys,  # noqa: F811
                                                               script):
    """In GRPO and PPO: trainer_state holds the iterations done and the epochs so far (4 prompts, 2 an iteration),
    log_metric's value is in metrics.jsonl, log_extra's column under each response of the samples table."""
    import train_ppo
    from test_ppo import make_args as ppo_args
    kw = dict(data=write_data(tmp_path / "d.jsonl", conversational=False, n=4), reward_fn=["trl_rewards:progress"],
              max_steps=2, sample_every=1)
    if script == "grpo":
        args = make_args(tmp_path, actor_dir, rollout_batch_size=1, num_generations=2, **kw)
        train_grpo.train(args)
    else:
        args = ppo_args(tmp_path, actor_dir, rollout_batch_size=2, minibatch_size=2, batch_size=2, **kw)
        train_ppo.train(args)
    import trl_rewards
    expected = [(0, 0.25, 2), (1, 0.5, 2)] if script == "grpo" else [(0, 0.5, 2), (1, 1.0, 2)]
    assert trl_rewards.SEEN == expected
    rows = [json.loads(line) for line in open(os.path.join(args.out, "metrics.jsonl"))]
    assert [r["progress/step_seen"] for r in rows] == [0.0, 1.0]
    out = capsys.readouterr().out
    assert len(re.findall(r"\n    why: '\d+ characters'", out)) == 2 * 2  # two responses shown, twice
    assert out.count("--reward-fn trl_rewards:progress: called as TRL's GRPOTrainer") == 1


@pytest.mark.parametrize("extra, expected", [
    (["--reward-fn", "trl_rewards:needs_answer"], "error: --reward-fn trl_rewards:needs_answer needs the column "
                                                  "'answer', which the data lacks (its columns: solution)"),
    (["--reward-fn", "trl_rewards:format_reward", "--reward-fn", "trl_rewards:length_reward", "--reward-weight",
      "1", "2", "3"], "error: --reward-weight: got 3 weights for 2 --reward-fn functions"),
])
def test_script_bad_reward_input_is_one_line(actor_dir, tmp_path, trl_module, extra, expected):  # noqa: F811
    cmd = [sys.executable, os.path.join(ROOT, "train_grpo.py"), "--actor", actor_dir, "--data",
           write_data(tmp_path / "d.jsonl", False), "--out", str(tmp_path / "o"), "--max-steps", "1",
           "--rollout-batch-size", "2", "--num-generations", "2", "--max-new-tokens", "2"] + extra
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith(expected), r.stderr[-2000:]


def test_readme_own_reward_example_runs_as_shown(actor_dir, tokenizer, tmp_path, monkeypatch):  # noqa: F811
    """The README's functions and command, taken from the README: the command parses, the functions score the
    shipped arithmetic data as their docstrings say, and one GRPO step runs with them on that data."""
    import shlex

    from nanorlhf import cli
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme[readme.index("## Your own reward"):readme.index("## More than one GPU")]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    command = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    (tmp_path / "my_rewards.py").write_text(code)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = shlex.split(command)
    assert argv[:2] == ["python", "train_grpo.py"]
    args = cli.parse(train_grpo.Args, argv[2:])
    assert args.reward_fn == ["my_rewards:format_reward", "my_rewards:accuracy"] and args.reward_weight == [0.2, 1.0]
    prompts = load_prompts(os.path.join(ROOT, args.data), tokenizer, 256, limit=2)
    answer = prompts[0].columns["answer"]
    texts = [f"{answer} cards. The answer is {answer}.", "The answer is 99.", "I am not sure"]
    rewarder = Rewarder(tokenizer, reward_fn=args.reward_fn, reward_weights=args.reward_weight)
    scores, parts, _ = rewarder([prompts[0]] * 3, [prompts[0].ids] * 3,
                                [tokenizer(t, add_special_tokens=False).input_ids for t in texts], [True] * 3, 3)
    assert parts["format_reward"].tolist() == [1.0, 1.0, 0.0] and parts["accuracy"].tolist() == [1.0, 0.0, 0.0]
    torch.testing.assert_close(scores, torch.tensor([1.2, 0.2, 0.0]))
    run = make_args(tmp_path, actor_dir, data=os.path.join(ROOT, args.data), reward_fn=args.reward_fn,
                    reward_weight=args.reward_weight, max_steps=1, limit=8, rollout_batch_size=2, num_generations=2)
    train_grpo.train(run)
    (row,) = [json.loads(line) for line in open(os.path.join(run.out, "metrics.jsonl"))]
    assert {"reward/format_reward", "reward/accuracy"} <= set(row)


def test_ppo_and_label_use_the_same_contract(actor_dir, tmp_path, trl_module):  # noqa: F811
    """One PPO step logs each function as score/<name> and optimises their weighted sum; the labeller hands the
    same functions each prompt's column, once per sampled response."""
    import train_ppo
    from test_ppo import make_args as ppo_args

    from nanorlhf import label as L
    data = write_data(tmp_path / "d.jsonl", conversational=True, n=8)
    weights = [0.01, 2.0]
    args = ppo_args(tmp_path, actor_dir, data=data, max_steps=1, reward_weight=weights,
                    reward_fn=["trl_rewards:length_reward", "trl_rewards:accuracy_reward"])
    train_ppo.train(args)
    (row,) = [json.loads(line) for line in open(os.path.join(args.out, "metrics.jsonl"))]
    assert row["score_raw"] == pytest.approx(0.01 * row["score/length_reward"] + 2.0 * row["score/accuracy_reward"],
                                             rel=1e-5)
    import trl_rewards
    trl_rewards.SEEN.clear()
    L.label(L.Args(model=actor_dir, data=data, k=2, reward_fn=["trl_rewards:accuracy_reward"], max_new_tokens=3,
                   limit=3, out=str(tmp_path / "labels")))
    (seen,) = trl_rewards.SEEN
    assert seen["solution"] == [4, 4, 6, 6, 8, 8]
    assert [p[-1]["content"] for p in seen["prompts"]] == [f"What is {s // 2}+{s // 2}?" for s in seen["solution"]]


def test_a_generator_of_scores_is_read_once(tmp_path, monkeypatch):
    """A function may yield its scores; they are read into a list before checking, not spent by the first pass."""
    from nanorlhf.rewards import RewardFunction
    (tmp_path / "gen_reward.py").write_text("def reward(prompts, responses):\n    return (len(r) for r in responses)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    f = RewardFunction("gen_reward:reward")
    assert f.check((v for v in [1, 2, None]), 3).tolist()[:2] == [1.0, 2.0]


def test_part_means_leave_out_none_and_parts_that_applied_nowhere():
    """A judge's logged mean is over the samples it applies to: (1 + 3) / 2, not NaN; one that applied to none of
    them this step is left out of the metrics, not logged as NaN (metrics.jsonl would hold invalid JSON)."""
    nan = float("nan")
    parts = {"rm": torch.tensor([0.5, -1.5, 2.5]), "maybe": torch.tensor([1.0, nan, 3.0]),
             "never": torch.tensor([nan, nan, nan])}
    assert part_means(parts, "score") == {"score/rm": 0.5, "score/maybe": 2.0}
    assert part_means(parts) == {"rm": 0.5, "maybe": 2.0}  # no prefix: the names as they are
