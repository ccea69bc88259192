import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from nanorlhf.cli import UserError
from transformers import AutoModelForCausalLM

import train_sft


def alpaca(path, n=8):
    rows = [{"instruction": f"Name the color number {i}.", "input": "", "output": f"Color {i} is {c}."}
            for i, c in enumerate(["red", "blue", "green", "black", "white", "pink", "gray", "gold"][:n])]
    path.write_text(json.dumps(rows))
    return str(path)


def losses(out, key="loss"):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r[key] for r in map(json.loads, f) if key in r]


def test_sft_loss_is_mean_completion_nll():
    logprobs = torch.tensor([[0.0, -1.0, -2.0, 0.0], [0.0, 0.0, -3.0, 0.0]], requires_grad=True)
    targets = torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, -100]])
    loss = train_sft.sft_loss(logprobs, targets, n_tokens=3)
    assert loss.item() == pytest.approx((1 + 2 + 3) / 3)
    loss.backward()
    expected = torch.tensor([[0, -1, -1, 0], [0, 0, -1, 0]]) / 3
    torch.testing.assert_close(logprobs.grad, expected)


def test_sft_overfits_eight_examples(tiny_dir, tmp_path):
    # Full fine-tuning: a random tiny model's frozen tied head caps how far LoRA alone can move the logits.
    out = str(tmp_path / "sft")
    args = train_sft.Args(model=tiny_dir, data=alpaca(tmp_path / "d.json"), out=out, max_steps=30, batch_size=8,
                          grad_accum=1, lr=1e-2, lora_r=0, eval_frac=0, max_length=64, samples=0, log_every=10)
    train_sft.train(args)
    loss = losses(out)
    assert len(loss) == 30 and loss[-1] < 0.5 * loss[0], loss
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == 49152


def test_sft_script_smoke(tiny_dir, tmp_path):
    peft = pytest.importorskip("peft")
    out = tmp_path / "sft"
    cmd = [sys.executable, "train_sft.py", "--model", tiny_dir, "--data", alpaca(tmp_path / "d.json"), "--out",
           str(out), "--max_steps", "2", "--batch-size", "2", "--grad-accum", "2", "--eval-frac", "0.25",
           "--max-length", "48", "--samples", "1", "--max-new-tokens", "4", "--lr", "1e-2"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--- response" in r.stdout
    assert len(losses(out)) == 2 and len(losses(out, "eval_loss")) == 1  # step 0
    assert {"adapter", "args.json", "config.json", "metrics.jsonl", "model.safetensors"} <= set(os.listdir(out))
    # the merged folder and the PEFT adapter on the original base are the same model
    merged = AutoModelForCausalLM.from_pretrained(out)
    tuned = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), str(out / "adapter"))
    ids = torch.randint(3, 1000, (2, 10))
    torch.testing.assert_close(tuned(ids).logits, merged(ids).logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(AutoModelForCausalLM.from_pretrained(tiny_dir)(ids).logits, merged(ids).logits)


def test_sft_help_documents_every_flag():
    r = subprocess.run([sys.executable, "train_sft.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0
    for flag in ["--model", "--data", "--eval-data", "--eval-frac", "--out", "--max-steps", "--epochs",
                 "--batch-size", "--grad-accum", "--lr", "--warmup", "--max-length", "--lora-r", "--lora-alpha",
                 "--load-in-4bit", "--load-in-8bit", "--optim", "--gradient-checkpointing", "--device", "--seed",
                 "--save-every", "--eval-every", "--resume"]:
        assert flag in r.stdout
    # What SFT learns with comes first; the plumbing every script shares follows under its own heading.
    own, shared = r.stdout.index("  --lr LR"), r.stdout.index("RunArgs options:")
    assert own < shared < r.stdout.index("  --lora-r LORA_R") and own < r.stdout.index("  --max-length") < shared


@pytest.mark.slow
def test_smollm2_qlora_sft_learns_and_loads(smollm2_dir, tmp_path):
    """The real model, 4-bit base + LoRA (QLoRA on CPU): eval loss on the training rows falls, and the merged
    output opens in transformers and answers like the model that was trained."""
    data, out = alpaca(tmp_path / "d.json"), str(tmp_path / "sft")
    train_sft.train(train_sft.Args(model=smollm2_dir, data=data, eval_data=data, out=out, max_steps=8,
                                   batch_size=4, grad_accum=2, lr=1e-3, load_in_4bit=True, samples=0))
    first, last = losses(out, "eval_loss")[0], losses(out, "final_eval_loss")[-1]
    assert last < 0.7 * first, (first, last)
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.config.vocab_size == 49152


def test_sft_whose_every_step_is_skipped_saves_no_model(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train_sft, "sft_loss", lambda logprobs, targets, n: logprobs.sum() * float("nan"))
    out = tmp_path / "sft"
    args = train_sft.Args(model=tiny_dir, data=alpaca(tmp_path / "d.json"), out=str(out), max_steps=2, batch_size=2,
                          grad_accum=1, eval_frac=0, max_length=48, samples=0, log_every=100)
    with pytest.raises(UserError, match="all 2 optimizer steps .* skipped"):
        train_sft.train(args)
    assert (out / "metrics.jsonl").exists() and not (out / "config.json").exists()
