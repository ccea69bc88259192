"""The benchmarks are scripts the suite does not run (they take minutes). What rots first is the arguments they
hand the stages, so check here, in milliseconds, that every stage still takes them."""
import importlib
import importlib.util
import os
import sys

import pytest
from conftest import ROOT

from nanorlhf.cli import parse


def bench(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tests", "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_taken(stage, kwargs):
    """train_<stage>.Args accepts every keyword and holds the value given."""
    args = importlib.import_module(f"train_{stage}").Args(**kwargs)
    assert {k: getattr(args, k) for k in kwargs} == kwargs


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "grpo", "ppo"])
def test_bench_trl_arguments(stage):
    spec = dict(stage=stage, model="m", data="d.jsonl", work="w", warmup=2, steps=8, batch_size=4, seq_len=256,
                lora_r=16, lora_alpha=32.0, seed=0, grpo_prompts=4, num_generations=4, max_new_tokens=32,
                temperature=0.1, lr=3e-5, sft="s", rm="r", iterations=15, rollouts=32, minibatches=4, epochs=1,
                forward_batch=32, max_prompt_length=256, kl_coef=0.05, critic="adapter")
    assert_taken(stage, bench("bench_trl").ours_args(spec, "out"))


def trl_ppo_venv():
    """The environment bench_trl.py builds for trl 1.12.0's PPOTrainer, when this checkout has one."""
    b = bench("bench_trl")
    path = os.path.join(ROOT, ".cache", f"trl-{b.TRL_PPO}")
    if not os.path.isfile(os.path.join(path, "bin", "python")):
        pytest.skip(f"needs trl {b.TRL_PPO}'s environment at {path}, which bench_trl.py --stages ppo builds (network)")
    return path


def test_bench_trl_ppo_with_another_trl_skips_only_ppo(tiny_dir, tiny_rm_dir, tmp_path, monkeypatch, capsys):
    """An environment holding another trl: one line on stderr that names the release and how to make it, the other
    stages run as asked, exit status 1."""
    b = bench("bench_trl")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("#!/bin/sh\necho 1.13.0\n")  # what a trl 1.13 environment answers
    (venv / "bin" / "python").chmod(0o755)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hi."}\n')
    ran = []
    monkeypatch.setattr(b, "trainer_stages", lambda a, stages: ran.append(stages) or True)
    monkeypatch.setattr(sys, "argv", ["bench_trl.py", "--stages", "rm,ppo", "--sft", tiny_dir, "--rm", tiny_rm_dir,
                                      "--prompts", str(prompts), "--trl-venv", str(venv)])
    with pytest.raises(SystemExit) as exit:
        b.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 1 and ran == [["rm"]]
    assert len(err) == 1 and "needs trl==1.12.0" in err[0] and "has trl 1.13.0" in err[0] and "pip install" in err[0]


def test_bench_trl_ppo_environment_that_cannot_be_built(tiny_dir, tiny_rm_dir, tmp_path):
    """Offline (pip may read no index): one line with pip's reason and the command, exit 1, no half-built folder."""
    import subprocess
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hi."}\n')
    venv = tmp_path / "trl"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "benchmarks", "bench_trl.py"), "--stages", "ppo",
                        "--sft", tiny_dir, "--rm", tiny_rm_dir, "--prompts", str(prompts), "--trl-venv", str(venv)],
                       capture_output=True, text=True, timeout=300, env=os.environ | {"PIP_NO_INDEX": "1"})
    err = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(err) == 1, r.stderr[-2000:]
    assert "could not be built" in err[0] and "No matching distribution" in err[0] and "trl==1.12.0" in err[0]
    assert os.listdir(tmp_path) == ["p.jsonl"]


def test_bench_trl_ppo_runs_both_sides(tiny_dir, tiny_rm_dir, tmp_path):
    """Two iterations a side on the tiny models, so the calls it times cannot drift from the real ones: the same
    prompts in the same order on both sides (checked inside), the same trainable parameters, the table."""
    import re
    import subprocess
    venv = trl_ppo_venv()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'{{"prompt": "Say {i} nice things."}}\n' for i in range(8)))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "benchmarks", "bench_trl.py"), "--stages", "ppo",
                        "--sft", tiny_dir, "--rm", tiny_rm_dir, "--prompts", str(prompts), "--trl-venv", venv,
                        "--ppo-iterations", "2", "--ppo-rollouts", "4", "--ppo-minibatches", "2", "--ppo-forward-batch",
                        "4", "--ppo-max-new-tokens", "6", "--lora-r", "4", "--lora-alpha", "8"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    trainable = re.search(r"trainable params +([\d,]+) +([\d,]+)", r.stdout)
    assert trainable and trainable.group(1) == trainable.group(2), r.stdout
    assert "gold reward, iteration 2" in r.stdout and "ppo, not matched:" in r.stdout


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "kto", "ppo", "grpo"])
def test_validate_memory_arguments(stage):
    args, _ = bench("validate_memory").stage_args("m", "rm", "tiny", stage, True, "w")
    assert_taken(stage, args)


def test_bench_torchrun_arguments():
    script, *argv = bench("bench_torchrun").sft_command("smollm2", 8)
    stage = script.removeprefix("train_").removesuffix(".py")
    args = parse(importlib.import_module(f"train_{stage}").Args, argv + ["--batch-size", "4", "--out", "o"])
    assert (args.max_steps, args.grad_accum, args.eval_frac, args.samples) == (8, 1, 0.0, 0)


def test_bench_eval_batches_counts_padding_and_runs(tiny_dir, tiny_rm_dir, tmp_path):
    """Its padding count, by hand: lengths 1, 2, 3, 10 in sorted batches of 2 compute 2·2 + 2·10 = 24 tokens; and
    it runs end to end on tiny models, so the evaluation calls it times cannot drift from the real ones."""
    import json
    import subprocess
    import sys
    assert bench("bench_eval_batches").padded([10, 1, 3, 2], 2) == 24
    assert bench("bench_eval_batches").padded([10, 1, 3, 2], 4) == 40
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {i} things."}) + "\n" for i in range(4)))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "benchmarks", "bench_eval_batches.py"),
                        "--baseline", tiny_dir, "--model", tiny_dir, "--rm", tiny_rm_dir, "--data", str(data),
                        "--limit", "4", "--rows", "4,2", "--batch-size", "4", "--dtype", "float32"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    table = [line for line in r.stdout.splitlines() if line.startswith("| 4 |") or line.startswith("| 2 |")]
    assert len(table) == 2 and table[0].endswith("| 1.00 |")  # the first setting is the ratios' reference


def test_bench_generate_runs(tiny_dir):
    """It runs end to end on the tiny model (so the calls it times cannot drift from the real ones): a table row per
    generator and shape, each with its ratio to the plain loop, and the same random prompts of the length asked."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "benchmarks", "bench_generate.py"), "--model",
                        tiny_dir, "--dtype", "float32", "--shapes", "2x1x3,2x2x3", "--prompt-tokens", "5",
                        "--decode", "eager", "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line.split(" | ") for line in r.stdout.splitlines() if line.startswith("| 2x")]
    assert [(row[0], row[1], row[2]) for row in rows] == [
        ("| 2x1x3", "5", "plain loop"), ("| 2x1x3", "5", "engine, eager"),
        ("| 2x2x3", "5", "plain loop"), ("| 2x2x3", "5", "engine, eager")], r.stdout
    assert all(row[-1].strip() == "1.00 |" for row in rows[::2])  # the plain loop is each shape's baseline


def test_bench_layout_runs_and_its_layouts_agree(tiny_dir, tmp_path):
    """It runs end to end on the tiny model, and in fp32 the side-by-side layout it times against and the packed one
    of rollout.join give the same logprobs, so the two timings are of the same computation."""
    import json
    import re
    import subprocess
    import sys
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": "Say " + "more " * i + "things."}) + "\n" for i in range(4)))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "benchmarks", "bench_layout.py"), "--sft",
                        tiny_dir, "--data", str(data), "--rollouts", "4", "--batch-size", "2", "--max-new-tokens", "6",
                        "--repeats", "1", "--dtype", "float32"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith(("| side by side |", "| packed |"))]
    assert len(rows) == 2 and "(1.00x)" in rows[0], r.stdout
    assert float(re.search(r"layouts: (\S+)", r.stdout).group(1)) < 1e-4, r.stdout
