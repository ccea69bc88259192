"""Issue 6: exact resume, signals, kill during save, and one-line errors for bad input."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import ROOT

from nanorlhf.loop import Loop, checkpoints


def write_json(path, rows):
    path.write_text(json.dumps(rows))
    return str(path)


def sft_data(tmp_path):
    return write_json(tmp_path / "sft.json", [{"instruction": f"Count to {i}.", "output": " ".join(map(str, range(i)))}
                                             for i in range(1, 9)])


def metric(out, key="loss"):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(r["step"], r[key]) for r in map(json.loads, f) if key in r]


def stop_after(monkeypatch, step):
    """Make the run behave as if SIGTERM arrived during `step`: checkpoint, then return."""
    real = Loop.end_step

    def end_step(self, metrics):
        self.stop = self.stop or self.step + 1 == step
        return real(self, metrics)

    monkeypatch.setattr(Loop, "end_step", end_step)


def run_straight_and_resumed(monkeypatch, module, make_args, tmp_path, steps=4, stop=2):
    straight = make_args(str(tmp_path / "straight"))
    module.train(straight)
    resumed = make_args(str(tmp_path / "resumed"))
    with monkeypatch.context() as m:
        stop_after(m, stop)
        module.train(resumed)  # returns after the checkpoint, without the final save
    assert "config.json" not in os.listdir(resumed.out)
    assert [os.path.basename(c) for c in checkpoints(resumed.out)] == [f"checkpoint-{stop}"]
    resumed.resume = True
    module.train(resumed)
    return metric(straight.out), metric(resumed.out)


def test_sft_resume_gives_identical_losses(tiny_dir, tmp_path, monkeypatch):
    import train_sft
    data = sft_data(tmp_path)

    def make_args(out):
        return train_sft.Args(model=tiny_dir, data=data, out=out, max_steps=4, batch_size=2, grad_accum=2, lr=1e-2,
                              eval_frac=0, max_length=48, samples=0, log_every=100)

    straight, resumed = run_straight_and_resumed(monkeypatch, train_sft, make_args, tmp_path)
    assert [s for s, _ in straight] == [1, 2, 3, 4] and straight == resumed
    assert straight[0][1] != straight[-1][1]  # it trained


def test_ppo_resume_gives_identical_losses(tiny_dir, tmp_path, lengthy, monkeypatch):
    import train_ppo
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}."}) + "\n" for i in range(12)))

    def make_args(out):
        return train_ppo.Args(model=tiny_dir, data=str(prompts), out=out, max_steps=4, rollout_batch_size=4,
                              minibatch_size=2, batch_size=2, max_new_tokens=4, ppo_epochs=1, lr=1e-3,
                              reward_fn=lengthy, sample_every=0, log_every=100, target_kl=1.0)

    straight, resumed = run_straight_and_resumed(monkeypatch, train_ppo, make_args, tmp_path)
    assert [s for s, _ in straight] == [1, 2, 3, 4] and straight == resumed
    # the sampled responses (hence scores) and the adaptive KL coefficient resumed exactly too
    for key in ("score", "kl_coef", "kl"):
        assert metric(str(tmp_path / "straight"), key) == metric(str(tmp_path / "resumed"), key)


def sft_cmd(tiny_dir, data, out, *extra):
    return [sys.executable, "train_sft.py", "--model", tiny_dir, "--data", data, "--out", str(out), "--batch-size",
            "2", "--grad-accum", "1", "--eval-frac", "0", "--max-length", "48", "--samples", "0", *extra]


def test_sigterm_checkpoints_and_resumes(tiny_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(sft_cmd(tiny_dir, sft_data(tmp_path), out, "--max-steps", "500"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.5)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    assert "resume with:" in stdout and "--resume" in stdout
    (ckpt,) = checkpoints(out)
    k = int(ckpt.rsplit("-", 1)[1])
    assert k == len(metric(out)) and k < 500
    r = subprocess.run(sft_cmd(tiny_dir, sft_data(tmp_path), out, "--max-steps", str(k + 2), "--resume"), cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [s for s, _ in metric(out)] == list(range(1, k + 3))
    assert (out / "config.json").exists()


def test_kill_during_save_keeps_the_previous_checkpoint(tiny_dir, tmp_path):
    out = tmp_path / "run"
    argv = sft_cmd(tiny_dir, sft_data(tmp_path), out, "--max-steps", "6", "--save-every", "2")[1:]
    child = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.argv = {argv!r}
        real_save, calls = torch.save, []
        def dying_save(obj, f, *a, **k):
            calls.append(1)
            if len(calls) == 2:  # the second checkpoint: write part of it, then die hard
                f.write(b"partial"); f.flush(); os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *a, **k)
        torch.save = dying_save
        import train_sft
        from nanorlhf.cli import main
        main(train_sft.train, train_sft.Args)
    """)
    r = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL
    assert [os.path.basename(c) for c in checkpoints(out)] == ["checkpoint-2"]
    assert (out / ".tmp-checkpoint-4").exists()
    r = subprocess.run([sys.executable] + argv + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout and "checkpoint-2" in r.stdout
    assert [s for s, _ in metric(out)] == [1, 2, 3, 4, 5, 6]


@pytest.fixture(scope="module")
def bad_inputs(tiny_dir, tiny_rm_dir, tmp_path_factory):
    """(name, argv, expected message) for every bad-input case of issue 6."""
    d = tmp_path_factory.mktemp("bad")
    good = sft_data(d)
    (d / "broken.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n')
    (d / "fields.jsonl").write_text('{"question": "a", "answer": "b"}\n')
    (d / "empty.json").write_text("[]")
    long = write_json(d / "long.json", [{"instruction": "word " * 400, "output": "x"}])
    kto = write_json(d / "kto.json", [{"prompt": "a", "completion": "b", "label": "yes"}])
    (d / "notmodel").mkdir()
    (d / "finished").mkdir()
    (d / "finished" / "config.json").write_text("{}")
    (d / "nobnb" / "bitsandbytes").mkdir(parents=True)
    (d / "nobnb" / "bitsandbytes" / "__init__.py").write_text("raise ImportError('simulated: no CUDA build')\n")
    prompts = d / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    (d / "a_file.txt").write_text("mine")
    other_rm = d / "other_rm"  # a reward model whose tokenizer has a token the actor's lacks
    shutil.copytree(tiny_rm_dir, other_rm)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_rm_dir)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other_rm)
    sft = ["train_sft.py", "--model", tiny_dir, "--max-steps", "1"]
    out = lambda name: ["--out", str(d / name)]  # noqa: E731
    return [
        ("missing data", sft + ["--data", str(d / "nope.json")] + out("o1"), "data file not found"),
        ("malformed json", sft + ["--data", str(d / "broken.jsonl")] + out("o2"), "broken.jsonl:2: malformed JSON"),
        ("missing fields", sft + ["--data", str(d / "fields.jsonl")] + out("o3"), "fields.jsonl:1: cannot tell the format"),
        ("empty dataset", sft + ["--data", str(d / "empty.json")] + out("o4"), "empty"),
        ("all too long", sft + ["--data", long, "--max-length", "32"] + out("o5"), "longer than --max-length 32"),
        ("kto label", ["train_kto.py", "--model", tiny_dir, "--data", kto] + out("o6"), "label must be true or false"),
        ("model not a folder", sft + ["--data", good, "--model", str(d / "notmodel")] + out("o7"),
         "--model .*notmodel: not a model folder"),
        ("actor not a folder", ["train_ppo.py", "--actor", str(d / "notmodel"), "--reward-fn", "x:y", "--data",
                                str(prompts)] + out("o8"), "--actor .*notmodel: not a model folder"),
        ("rm not a folder", ["train_ppo.py", "--actor", tiny_dir, "--rm", str(d / "notmodel"), "--data",
                             str(prompts)] + out("o9"), "--rm .*notmodel: not a model folder"),
        ("rm not seq-cls", ["train_ppo.py", "--actor", tiny_dir, "--rm", tiny_dir, "--data", str(prompts)]
         + out("o10"), "not a sequence-classification model"),
        ("finished out", sft + ["--data", good] + out("finished"), "already holds a finished run"),
        ("lr", sft + ["--data", good, "--lr", "0"] + out("o11"), "--lr must be > 0"),
        ("batch size", sft + ["--data", good, "--batch-size", "0"] + out("o12"), "--batch-size must be > 0"),
        ("lora r", sft + ["--data", good, "--lora-r", "-1"] + out("o13"), "--lora-r must be >= 0"),
        ("beta", ["train_dpo.py", "--model", tiny_dir, "--data", good, "--beta", "0"] + out("o14"), "--beta must be > 0"),
        ("temperature", ["train_ppo.py", "--actor", tiny_dir, "--data", str(prompts), "--temperature", "0"]
         + out("o15"), "--temperature must be > 0"),
        ("resume nothing", sft + ["--data", good, "--resume"] + out("o16"), "no checkpoint"),
        ("4-bit without bitsandbytes", sft + ["--data", good, "--load-in-4bit"] + out("o17"),
         "--load-in-4bit: bitsandbytes cannot be imported", str(d / "nobnb")),
        ("data is a folder", sft + ["--data", str(d / "notmodel")] + out("o18"), "notmodel is a folder; expected a"),
        ("out is a file", sft + ["--data", good, "--out", str(d / "a_file.txt")], "--out .*a_file.txt is a file"),
        ("4 and 8 bit", sft + ["--data", good, "--load-in-4bit", "--load-in-8bit"] + out("o19"),
         "--load-in-4bit and --load-in-8bit contradict"),
        ("critic without rm", ["train_ppo.py", "--actor", tiny_dir, "--reward-fn", "x:y", "--critic-from-rm",
                               "--data", str(prompts)] + out("o21"), "--critic-from-rm starts the critic from"),
        ("critic from another tokenizer", ["train_ppo.py", "--actor", tiny_dir, "--rm", str(other_rm),
                                           "--critic-from-rm", "--data", str(prompts)] + out("o22"),
         "--critic-from-rm: --rm .*other_rm has another tokenizer"),
        # the tiny model has 1024 positions: refused before anything is written (checked below)
        ("response past the context", ["train_grpo.py", "--actor", tiny_dir, "--reward-fn", "x:y", "--data",
                                       str(prompts), "--max-new-tokens", "2000"] + out("o23"),
         r"--max-prompt-length 256 \+ --max-new-tokens 2000 = 2256 tokens exceed the model's context of 1024"),
        ("prompt fills the context", ["-m", "nanorlhf.evaluate", "--model", tiny_dir, "--baseline", tiny_dir,
                                      "--reward-fn", "x:y", "--data", str(prompts), "--max-length", "1024",
                                      "--max-new-tokens", "8", "--out", str(d / "o24.json")],
         r"--max-prompt-length 1024 \+ --max-new-tokens 8 = 1032 tokens exceed"),
        ("k larger than a batch", ["-m", "nanorlhf.label", "--model", tiny_dir, "--data", str(prompts), "--reward-fn",
                                   "x:y", "--k", "8", "--batch-size", "4"] + out("o25"),
         "--k 8 is more than --batch-size 4"),
    ]


def run_case(case):
    name, argv, expected, *pythonpath = case
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(pythonpath + [ROOT]))
    return subprocess.run([sys.executable] + argv, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def test_bad_input_is_one_line_exit_2_no_traceback(bad_inputs):
    with ThreadPoolExecutor(2) as pool:  # two cores: two interpreters at a time
        results = list(pool.map(run_case, bad_inputs))
    for (name, _, expected, *_), r in zip(bad_inputs, results):
        errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
        assert r.returncode == 2, (name, r.returncode, r.stderr[-1500:])
        assert "Traceback" not in r.stderr, (name, r.stderr[-1500:])
        assert len(errors) == 1 and re.search(expected, errors[0]), (name, r.stderr[-1500:])
    for name in ("response past the context", "prompt fills the context", "k larger than a batch"):
        argv = next(argv for case, argv, *_ in bad_inputs if case == name)
        assert not os.path.exists(argv[argv.index("--out") + 1]), name  # nothing written, not even a folder
    finished = next(argv[argv.index("--out") + 1] for name, argv, *_ in bad_inputs if name == "finished out")
    assert open(os.path.join(finished, "config.json")).read() == "{}"  # untouched
    a_file = next(argv[argv.index("--out") + 1] for name, argv, *_ in bad_inputs if name == "out is a file")
    assert open(a_file).read() == "mine"
