"""The demo: its stage commands parse with the scripts they call and chain outputs to inputs, its data split
keeps held-out prompts out of every stage, and a tiny-budget run goes end to end."""
import importlib
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

from nanorlhf import cli, demo


def test_every_demo_stage_parses_with_its_script(tmp_path):
    paths = demo.prepare(os.path.join(ROOT, "data"), str(tmp_path), heldout=64)
    for scale, runs in ((1.0, 4), (4.0, 12)):  # above scale 1, every method at three β
        stages = demo.stages("/o", paths, scale, "smollm2")
        assert len(stages) == runs + 3
        for name, argv in stages:
            module = argv[1] if argv[0] == "-m" else argv[0].removesuffix(".py")
            args = cli.parse(importlib.import_module(module).Args, argv[2:] if argv[0] == "-m" else argv[1:])
            assert args.out == f"/o/{name}"
            if name != "labels":
                assert args.max_steps >= 1
            if name not in ("sft",):  # every later stage starts from the SFT output
                assert getattr(args, "model") == "/o/sft", name
    stages = dict(demo.stages("/o", paths, 1.0, "smollm2", "bfloat16", seed=1))
    assert list(stages) == ["sft", "labels", "rm", "ppo_rm", "ppo_gold", "dpo", "kto"]
    for name, argv in stages.items():  # every stage in the demo's one compute dtype
        module = argv[1] if argv[0] == "-m" else argv[0].removesuffix(".py")
        parsed = cli.parse(importlib.import_module(module).Args, argv[2 if argv[0] == "-m" else 1:])
        assert (parsed.dtype, parsed.seed) == ("bfloat16", 1)
    ppo_rm = cli.parse(importlib.import_module("train_ppo").Args, stages["ppo_rm"][1:])
    assert ppo_rm.rm == ["/o/rm"] and ppo_rm.reward_fn == [] and ppo_rm.gold_reward_fn == demo.GOLD
    ppo_gold = cli.parse(importlib.import_module("train_ppo").Args, stages["ppo_gold"][1:])
    assert ppo_gold.rm == [] and ppo_gold.reward_fn == [demo.GOLD]


def test_held_out_prompts_reach_no_stage(tmp_path):
    paths = demo.prepare(os.path.join(ROOT, "data"), str(tmp_path), heldout=64)
    held = {json.loads(line)["prompt"] for line in open(paths["heldout"])}
    train = {json.loads(line)["prompt"] for line in open(paths["prompts"])}
    sft = json.load(open(paths["sft"]))
    sft_prompts = {r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "") for r in sft}
    assert len(held) == 64 and not held & train and not held & sft_prompts
    assert all(len(r["output"].split()) <= 40 for r in sft)  # concise answers that end in time


def test_a_stage_log_keeps_its_seconds_for_a_resumed_demo(tmp_path, capsys):
    """`run` ends a stage's log with its exit code and seconds, so a later demo that skips the finished stage still
    reports how long it took; a failed stage, or a log without that line, has no time."""
    log = str(tmp_path / "stage.log")
    took = demo.run(["-c", "import time; time.sleep(0.3); print('working', end='')"], log)  # no newline at the end
    lines = open(log).read().splitlines()
    assert lines[1] == "working" and lines[-1].startswith(demo.DONE)
    assert took >= 0.3 and demo.logged_seconds(log) == took  # to 0.1 s, as returned
    with pytest.raises(SystemExit):
        demo.run(["-c", "raise SystemExit(3)"], log)
    assert open(log).read().splitlines()[-1].startswith(f"{demo.DONE} exit 3 in ")
    assert demo.logged_seconds(log) is None
    (tmp_path / "old.log").write_text("$ python train_sft.py\nsaved\n")
    assert demo.logged_seconds(str(tmp_path / "old.log")) is None
    assert demo.logged_seconds(str(tmp_path / "missing.log")) is None
    assert demo.shown_seconds(None) == "–" and demo.shown_seconds(12.6) == "13"


def test_concise_keeps_whole_first_sentences():
    text = "One two three. Four five six seven. " + "word " * 50
    assert demo.concise(text, max_words=8) == "One two three. Four five six seven."
    assert demo.concise("word " * 50, max_words=5) == "word word word word word"


@pytest.fixture(scope="module")
def moody_dir(tokenizer, tmp_path_factory):
    """A tiny random Llama that mostly says a few words of clear sentiment, and EOS: its samples differ in gold
    reward and often end, so the labeller finds pairs (a random model never ends and says nothing of feeling)."""
    import torch
    from conftest import tiny_llama
    model = tiny_llama(len(tokenizer), seed=3)
    words = [" good", " bad", " love", " hate", " happy", " sad", " great", " awful"]
    ids = [tokenizer(w, add_special_tokens=False).input_ids[0] for w in words] + [tokenizer.eos_token_id]
    with torch.no_grad():
        model.get_input_embeddings().weight[ids] *= 15
    path = tmp_path_factory.mktemp("moody")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.slow  # about 2 min (two demo runs); .ci/run runs the main job from a clone on every CI run
def test_demo_smoke_from_a_clone_with_nothing_beside_it(moody_dir, tmp_path):
    """The repository copied alone into an empty folder (no ../shared, as a clone from GitHub) runs the main job end
    to end: every stage, the evaluation, the table and the frontier, at tiny budgets on a tiny model."""
    pytest.importorskip("vaderSentiment")
    clone = tmp_path / "clone" / "nanorlhf"
    shutil.copytree(ROOT, clone, ignore=shutil.ignore_patterns(".git", ".venv", "out", "__pycache__", "*.egg-info",
                                                               ".pytest_cache"))
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONPATH=str(clone))  # this copy's nanorlhf, not the installed one
    r = subprocess.run([sys.executable, "-m", "nanorlhf.demo", "--out", str(out), "--model", moody_dir, "--scale",
                        "0.05", "--heldout", "16"], cwd=clone, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not (tmp_path / "clone" / "shared").exists()
    report = (out / "results.md").read_text()
    for name in ("ppo_rm", "ppo_gold", "dpo", "kto"):
        assert f"| {name} |" in report
    assert (out / "frontier.png").stat().st_size > 0
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["settings"]["prompts"] == 16
    rm = evaluation[str(out / "ppo_rm")]["judges"]["rm"]  # the RM judged against gold on that model's pairs
    assert rm["agreement_n"] <= 16 and (rm["agreement_n"] == 0 or 0 <= rm["agreement"] <= 1)
    assert json.loads((out / "sft" / "args.json").read_text())["data"].startswith(str(out))  # from the copy's data/
    # again: every stage is finished and skipped, and the table keeps each one's time from the run that made it
    r = subprocess.run([sys.executable, "-m", "nanorlhf.demo", "--out", str(out), "--model", moody_dir, "--scale",
                        "0.05", "--heldout", "16"], cwd=clone, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0 and r.stdout.count("is finished; skipping") == 7, r.stdout[-3000:] + r.stderr[-3000:]
    again = (out / "results.md").read_text()
    assert "resuming finished stages" in again
    for name in ("ppo_rm", "ppo_gold", "dpo", "kto"):
        assert row_of(again, name).split("|")[-2].strip() == row_of(report, name).split("|")[-2].strip() != "–"


def row_of(report, name):
    return next(line for line in report.splitlines() if line.startswith(f"| {name} |"))


def test_a_finished_stage_made_by_another_command_is_not_skipped(tmp_path):
    """A resumed demo skips a finished stage only if its log's command is the one the demo would run now: another
    β or seed stops the demo with one line naming the stage and the setting, and nothing is overwritten. A copied
    folder (other paths, same settings) resumes."""
    paths = demo.prepare(os.path.join(ROOT, "data"), str(tmp_path / "old"), heldout=64)
    before = dict(demo.stages(str(tmp_path / "old"), paths, 1.0, "smollm2", "bfloat16"))["ppo_gold"]
    before[before.index("--kl-coef") + 1] = "0.05"  # the stage as an older default made it
    out = tmp_path / "new"
    shutil.copytree(tmp_path / "old", out)  # a copy: every path in the logged command is the old folder's
    log = out / "ppo_gold.log"
    log.write_text(demo.COMMAND + " ".join(before) + f"\nsaved\n\n{demo.DONE} exit 0 in 480.0 s\n")
    now = dict(demo.stages(str(out), paths, 1.0, "smollm2", "bfloat16"))["ppo_gold"]
    with pytest.raises(cli.UserError, match=r"ppo_gold was made by another command: 0\.05 where this demo runs 0\.02 "
                                            r"\(after --kl-coef"):
        demo.check_same_command(now, str(log))
    demo.check_same_command(now + ["--overwrite"], str(log).replace("ppo_gold", "missing"))  # no log: nothing to check
    before[before.index("--kl-coef") + 1] = "0.02"
    log.write_text(demo.COMMAND + " ".join(before + ["--overwrite"]) + "\nsaved\n")
    demo.check_same_command(now, str(log))  # same settings, other paths, a redo's --overwrite: resumes
    log.write_text(demo.COMMAND + " ".join(before[:-2]) + "\n")  # the seed flag missing
    with pytest.raises(cli.UserError, match=r"made by another command: \(nothing\) where this demo runs --seed"):
        demo.check_same_command(now, str(log))
    log.write_text(demo.COMMAND + " ".join(["train_dpo.py"] + before[1:]) + "\n")  # another script
    with pytest.raises(cli.UserError, match=r"train_dpo\.py where this demo runs train_ppo\.py \(after nothing;"):
        demo.check_same_command(now, str(log))
