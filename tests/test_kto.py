import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from test_dpo import assert_same_answers, column, records, spy_reference, without_timing
from transformers import AutoModelForCausalLM

import train_kto
from nanorlhf.cli import build_parser
from nanorlhf.data import UnpairedRow


def labelled(path, n=16):
    """kto_en_demo's layout (messages, the last one judged, + label): "Yes" answers are desirable, "No" are not."""
    rows = [{"messages": [{"role": "system", "content": "Hi."},
                          {"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": f"Yes {i}." if i % 2 == 0 else f"No {i}."}],
             "label": i % 2 == 0} for i in range(n)]
    path.write_text(json.dumps(rows))
    return str(path)


def args_for(tiny_dir, tmp_path, name="kto", **kw):
    base = dict(model=tiny_dir, data=labelled(tmp_path / "kto.json"), out=str(tmp_path / name), batch_size=4,
                grad_accum=1, max_length=64, eval_frac=0, warmup=0, log_every=100)
    return train_kto.Args(**(base | kw))


def test_help_documents_the_kto_flags():
    text = build_parser(train_kto.Args).format_help()
    for flag in ["--beta", "--desirable-weight", "--undesirable-weight", "--precompute-ref", "--eval-every"]:
        assert flag in text


def test_kto_loss_and_gradient_hand_computed():
    # β = 0.5, z₀ = 0.2, λ_D = 1.5, λ_U = 2. Log-ratios r: 0.6 (desirable), -1 (undesirable), 0.6 (undesirable).
    policy = torch.tensor([-1.0, -2.0, -1.0], requires_grad=True)
    reference = torch.tensor([-1.6, -1.0, -1.6])
    labels = torch.tensor([True, False, False])
    losses, rewards = train_kto.kto_loss(policy, reference, labels, 0.2, beta=0.5, desirable_weight=1.5,
                                         undesirable_weight=2.0)
    # σ(0.2) = 0.549834, σ(0.6) = 0.645656, σ(-0.2) = 0.450166
    # 1.5·(1 - σ(0.5·(0.6 - 0.2))) = 1.5·0.450166,  2·(1 - σ(0.5·(0.2 + 1))) = 2·0.354344,
    # 2·(1 - σ(0.5·(0.2 - 0.6))) = 2·0.549834
    torch.testing.assert_close(losses, torch.tensor([0.675249, 0.708687, 1.099668]), atol=1e-5, rtol=0)
    torch.testing.assert_close(rewards, torch.tensor([0.3, -0.5, 0.3]))  # β·r
    assert not rewards.requires_grad
    losses.sum().backward()
    # σ'(x) = σ(x)(1 - σ(x)): σ'(0.2) = σ'(-0.2) = 0.247517, σ'(0.6) = 0.228784
    # desirable: -λ_D·β·σ'(0.2); undesirable: +λ_U·β·σ'(β(z₀ - r))
    torch.testing.assert_close(policy.grad, torch.tensor([-1.5 * 0.5 * 0.247517, 2 * 0.5 * 0.228784,
                                                          2 * 0.5 * 0.247517]), atol=1e-6, rtol=0)


def test_mismatched_pairs_skip_matched_ones_and_fit_max_length():
    rows = [UnpairedRow([1, 2, 3], [10], True), UnpairedRow([4, 5], [11, 12], False),
            UnpairedRow([1, 2, 3], [13], True)]
    # completion i after prompt i+1; the last row wraps to row 0, which has its own prompt: left out
    assert train_kto.mismatched(rows, max_length=100) == [([4, 5], [10]), ([1, 2, 3], [11, 12])]
    assert train_kto.mismatched(rows, max_length=4) == [([4, 5], [10]), ([2, 3], [11, 12])]  # prompt cut on the left
    assert train_kto.mismatched(rows[:1], max_length=100) == []  # one example: no z₀
    same = [UnpairedRow([7], [10], True), UnpairedRow([7], [11], False)]
    assert train_kto.mismatched(same, max_length=100) == []  # one prompt only: no z₀


def test_reference_point_falls_back_to_the_last_estimate():
    z0 = train_kto.ReferencePoint()
    assert z0.update(None) == 0.0 and z0.fallbacks == 1  # before any estimate: 0, exact while π = π_ref
    assert z0.update(0.3) == 0.3
    assert z0.update(None) == 0.3 and z0.fallbacks == 2
    again = train_kto.ReferencePoint()
    again.load_state_dict(z0.state_dict())
    assert (again.kl, again.fallbacks) == (0.3, 2)


def test_batch_without_mismatched_pairs_gives_finite_loss_and_the_fallback(tiny_dir, tmp_path):
    # --batch-size 1: TRL's NaN case. Every step falls back to z₀ = 0 and says so.
    args = args_for(tiny_dir, tmp_path, "one", batch_size=1, max_steps=3, lr=1e-3)
    train_kto.train(args)
    steps = [r for r in records(args.out) if "loss" in r]
    assert [r["kl"] for r in steps] == [0.0] * 3 and [r["kl_fallbacks"] for r in steps] == [1, 2, 3]
    assert all(math.isfinite(v) for r in records(args.out) for v in r.values())
    for r in steps:  # one example per step: the other kind's mean reward is left out, not NaN
        assert ("rewards/chosen" in r) != ("rewards/rejected" in r)
    # the same micro-batches, accumulated: z₀ comes from the whole step, so it forms
    args = args_for(tiny_dir, tmp_path, "accum", batch_size=1, grad_accum=4, max_steps=2, lr=1e-3)
    train_kto.train(args)
    assert column(args.out, "kl_fallbacks") == [0, 0] and all(k >= 0 for k in column(args.out, "kl"))


def test_kto_full_finetuning_separates_good_from_bad(tiny_dir, tmp_path):
    data = labelled(tmp_path / "kto.json", n=8)
    args = args_for(tiny_dir, tmp_path, data=data, eval_data=data, lora_r=0, lr=1e-3, batch_size=8, max_steps=3)
    train_kto.train(args)
    start, end = records(args.out)[0], records(args.out)[-1]
    assert start["eval_rewards/chosen"] == start["eval_rewards/rejected"] == 0
    assert end["final_eval_rewards/chosen"] > 0 > end["final_eval_rewards/rejected"]
    assert end["final_eval_loss"] < start["eval_loss"]


@pytest.mark.parametrize("lora_r", [0, 8], ids=["frozen-copy", "lora-disabled"])
def test_reference_stays_fixed_while_the_policy_learns(tiny_dir, tmp_path, monkeypatch, lora_r):
    # One desirable example per step, always the same: the reference must answer with the same bits each step.
    calls = spy_reference(monkeypatch)
    args = args_for(tiny_dir, tmp_path, data=labelled(tmp_path / "one.json", n=1), batch_size=1, lora_r=lora_r,
                    lr=1e-3 if lora_r == 0 else 1e-2, max_steps=3)
    train_kto.train(args)
    assert_same_answers(calls, 3)
    rewards = column(args.out, "rewards/chosen")
    assert rewards[0] == 0 and rewards[0] < rewards[1] < rewards[2]


def test_one_sided_data_is_said_plainly(tiny_dir, tmp_path, capsys):
    """Data with no undesirable example trains (as TRL, with a warning) and names the missing side; no NaN ratio."""
    args = args_for(tiny_dir, tmp_path, data=labelled(tmp_path / "one.json", n=1), batch_size=1, max_steps=1)
    train_kto.train(args)
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "all 1 training examples are desirable, none undesirable" in warnings[0]
    assert "nan" not in out + err


def test_precompute_ref_gives_the_same_losses(tiny_dir, tmp_path):
    kw = dict(lr=1e-2, max_steps=2)
    train_kto.train(args_for(tiny_dir, tmp_path, "live", **kw))
    train_kto.train(args_for(tiny_dir, tmp_path, "pre", precompute_ref=True, **kw))
    for key in ("loss", "kl"):
        live, pre = column(tmp_path / "live", key), column(tmp_path / "pre", key)
        assert len(live) == 2 and pre == pytest.approx(live, rel=1e-6, abs=1e-6), key


def test_resume_is_exact(tiny_dir, tmp_path):
    # Preference pairs split into desirable/undesirable halves; full fine-tuning with its frozen copy. With this
    # seed, steps 3-4 each hold both halves of one pair, so no mismatched pair: they fall back to step 2's z₀,
    # which the resume from checkpoint-2 must carry over.
    pairs = [{"prompt": f"Question {i}?", "chosen": f"Yes {i}.", "rejected": f"No {i}."} for i in range(2)]
    data = str(tmp_path / "pairs.json")
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    kw = dict(data=data, eval_data=data, seed=1, lora_r=0, batch_size=2, lr=1e-3, max_steps=4, save_every=2)
    args = args_for(tiny_dir, tmp_path, **kw)
    train_kto.train(args)
    straight = without_timing(records(args.out))
    kl = column(args.out, "kl")
    assert column(args.out, "kl_fallbacks") == [0, 0, 1, 2] and kl[1] > 0 and kl[1:] == [kl[1]] * 3
    shutil.rmtree(os.path.join(args.out, "checkpoint-4"))
    train_kto.train(args_for(tiny_dir, tmp_path, resume=True, **kw))
    assert len(column(args.out, "loss")) == 4 and without_timing(records(args.out)) == straight


def test_kto_script_smoke(tiny_dir, tmp_path):
    out = tmp_path / "kto"
    cmd = [sys.executable, "train_kto.py", "--model", tiny_dir, "--data", labelled(tmp_path / "d.json", n=8),
           "--out", str(out), "--max-steps", "2", "--batch-size", "2", "--grad-accum", "2", "--eval-frac", "0.25",
           "--max-length", "48", "--eval-every", "1", "--desirable-weight", "1.2"]
    # Eager kernel: the subprocess would spend most of its time compiling it (the kernel tests cover the compiled path).
    env = os.environ | {"NANORLHF_EAGER": "1"}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "λ_D·n_D / (λ_U·n_U)" in r.stdout
    assert [r["step"] for r in records(out) if "loss" in r] == [1, 2]
    assert len(column(out, "eval_kl")) == 3 and len(column(out, "final_eval_loss")) == 1
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == 49152
    assert os.path.isdir(out / "adapter")
