import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from transformers import AutoConfig, AutoModelForSequenceClassification

import train_rm
from nanorlhf import model as M
from nanorlhf.cli import UserError
from nanorlhf.data import collate, load_examples, tokenize
from nanorlhf.lora import add_lora, lora_layers
from nanorlhf.loop import Loop

TIMING = ("step_time", "tokens_per_s", "peak_mem_gb")


def pairs(path, n=16, margins=False):
    """Learnable pairs: every chosen reply praises with "wonderful", no rejected reply does."""
    fruits = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "melon"]
    rows = []
    for i in range(n):
        fruit = fruits[i % len(fruits)]
        row = {"prompt": f"What do you think of the {fruit} number {i}?",
               "chosen": f"The {fruit} is wonderful, truly wonderful.",
               "rejected": f"No comment on {fruit} {i}." if i % 2 else "I refuse to answer."}
        if margins and i % 3 == 0:
            row["margin"] = 0.5 * (i % 4)
        rows.append(row)
    path.write_text("\n".join(map(json.dumps, rows)))
    return str(path)


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------- the math


def test_sigmoid_loss_values_and_gradient():
    chosen = torch.tensor([1.0, 0.0, -0.5], requires_grad=True)
    rejected = torch.tensor([0.0, 0.0, 0.5], requires_grad=True)  # r_c - r_r = 1, 0, -1
    loss = train_rm.reward_loss(chosen, rejected)
    # -log σ(x) = log(1 + e^-x): x = 1, 0, -1
    torch.testing.assert_close(loss, torch.tensor([0.31326168751822286, 0.6931471805599453, 1.3132616875182228]))
    loss.sum().backward()
    # d/dx -log σ(x) = -σ(-x): -σ(-1), -σ(0), -σ(1); r_r gets the opposite sign
    expected = torch.tensor([-0.2689414213699951, -0.5, -0.7310585786300049])
    torch.testing.assert_close(chosen.grad, expected)
    torch.testing.assert_close(rejected.grad, -expected)

    chosen.grad = None
    margin = torch.tensor([0.5, 0.0, 1.0])  # x = 1 - 0.5, 0 - 0, -1 - 1
    loss = train_rm.reward_loss(chosen, rejected, margin, loss_type="sigmoid")
    torch.testing.assert_close(loss, torch.tensor([0.47407698418010663, 0.6931471805599453, 2.1269280110429727]))
    loss.sum().backward()
    torch.testing.assert_close(chosen.grad, torch.tensor([-0.3775406687981454, -0.5, -0.8807970779778823]))
    no_margin = train_rm.reward_loss(chosen, rejected)
    torch.testing.assert_close(train_rm.reward_loss(chosen, rejected, torch.zeros(3)), no_margin)


def test_margin_ranking_loss_values_and_gradient():
    chosen = torch.tensor([1.0, 0.0, -0.5, 2.0], requires_grad=True)
    rejected = torch.tensor([0.0, 0.0, 0.5, 0.5], requires_grad=True)  # r_c - r_r = 1, 0, -1, 1.5
    loss = train_rm.reward_loss(chosen, rejected, loss_type="margin-ranking")  # max(0, 1 - diff)
    torch.testing.assert_close(loss, torch.tensor([0.0, 1.0, 2.0, 0.0]))
    loss.sum().backward()
    torch.testing.assert_close(chosen.grad, torch.tensor([0.0, -1.0, -1.0, 0.0]))  # separated pairs: no gradient
    torch.testing.assert_close(rejected.grad, torch.tensor([0.0, 1.0, 1.0, 0.0]))

    chosen.grad = None
    margin = torch.tensor([0.5, 0.0, 1.0, 0.5])  # m = 0.5 + margin = 1, 0.5, 1.5, 1
    loss = train_rm.reward_loss(chosen, rejected, margin, loss_type="margin-ranking", ranking_margin=0.5)
    torch.testing.assert_close(loss, torch.tensor([0.0, 0.5, 2.5, 0.0]))
    loss.sum().backward()
    torch.testing.assert_close(chosen.grad, torch.tensor([0.0, -1.0, -1.0, 0.0]))
    with pytest.raises(ValueError, match="unknown loss_type"):
        train_rm.reward_loss(chosen, rejected, loss_type="hinge")


def test_init_head_std_is_one_over_sqrt_d_plus_one():
    head = torch.nn.Linear(4095, 1)
    torch.nn.init.constant_(head.bias, 3.0)
    torch.manual_seed(0)
    train_rm.init_head(head)
    w = head.weight.detach()
    assert abs(w.std().item() - 1 / 64) < 0.05 / 64  # 1/√(4095+1); the std's relative s.e. here is ~1%
    assert abs(w.mean().item()) < 4 / 64 / 4095 ** 0.5 and head.bias.item() == 0.0


def test_rewards_match_hf_pooling_forward_and_backward(tiny_dir):
    """Our scores == HF's *ForSequenceClassification (last non-pad token) for right, left and no padding."""
    model, tok = M.load_model(tiny_dir, kind="reward")
    add_lora(model, r=4, alpha=8, verbose=False)
    for _, m in lora_layers(model):
        torch.nn.init.normal_(m.lora_B["default"].weight, std=0.05)
    train_rm.init_head(model.score)
    model.score.requires_grad_(True)
    ids = torch.randint(3, 1000, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0  # right padding
    mask[1, :3] = 0  # left padding
    ids = ids.masked_fill(mask == 0, tok.pad_token_id)
    weights = torch.tensor([1.0, -2.0, 0.5])

    ours = M.reward_scores(model, ids, mask)
    (ours * weights).sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    ref = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, 0]
    (ref * weights).sum().backward()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for ours_g, p in zip(grads, [p for p in model.parameters() if p.requires_grad]):
        torch.testing.assert_close(ours_g, p.grad, atol=1e-5, rtol=1e-5)
    assert model.score.weight.grad.abs().sum() > 0


def test_score_head_missing_is_a_clear_error():
    with pytest.raises(UserError, match="no one-output linear `score` head"):
        train_rm.score_head(torch.nn.Module())


# ---------------------------------------------------------------- training


def test_rm_separates_pairs_and_saves_a_loadable_model(tiny_dir, tokenizer, tmp_path):
    data, out = pairs(tmp_path / "pairs.jsonl"), str(tmp_path / "rm")
    args = train_rm.Args(model=tiny_dir, data=data, eval_data=data, out=out, max_steps=10, batch_size=8,
                         grad_accum=2, lr=1e-2, warmup=0, max_length=64, log_every=10)
    train_rm.train(args)
    logged = metrics(out)
    final = next(r for r in logged if "final_eval_accuracy" in r)
    assert final["final_eval_accuracy"] == 1.0, logged  # all 16 training pairs ranked right
    assert [r["loss"] for r in logged if "loss" in r][-1] < 0.2
    assert {"rewards/chosen", "rewards/rejected", "rewards/margin", "accuracy"} <= set(logged[1])

    # The saved folder is a plain HF reward model: same scores as `rewards`, right-padded, several lengths.
    assert train_rm.is_reward_model(AutoConfig.from_pretrained(out)) and not train_rm.is_reward_model(
        AutoConfig.from_pretrained(tiny_dir))
    hf = AutoModelForSequenceClassification.from_pretrained(out)
    rows = tokenize(load_examples(data, "pairs"), tokenizer, 64)[0]
    batch = collate([(r.prompt, r.chosen) for r in rows] + [(r.prompt, r.rejected) for r in rows],
                    hf.config.pad_token_id)
    assert len(set(batch["attention_mask"].sum(-1).tolist())) > 3
    with torch.no_grad():
        theirs = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        ours = M.reward_scores(hf, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # reward_mean/std: over the 32 training replies (fewer than --norm-samples), recomputed from the saved model
    assert hf.config.reward_mean == pytest.approx(theirs.mean().item(), abs=1e-5)
    assert hf.config.reward_std == pytest.approx(theirs.std().item(), abs=1e-5)


def test_rm_resume_is_exact(tiny_dir, tmp_path, monkeypatch):
    data = pairs(tmp_path / "pairs.jsonl", n=6, margins=True)  # 4 pairs per step: steps cross an epoch
    kw = dict(model=tiny_dir, data=data, max_steps=4, batch_size=2, grad_accum=2, lr=1e-2, eval_frac=0,
              max_length=64, save_every=2, log_every=100)
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train_rm.train(train_rm.Args(out=straight, **kw))

    end_step = Loop.end_step

    def sigterm_in_step_2(self, m):
        if self.step + 1 == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the Loop's handler: finish the step, checkpoint, return
        end_step(self, m)

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with monkeypatch.context() as patch:
            patch.setattr(Loop, "end_step", sigterm_in_step_2)
            train_rm.train(train_rm.Args(out=resumed, **kw))  # returns after the checkpoint
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert "config.json" not in os.listdir(resumed)
    train_rm.train(train_rm.Args(out=resumed, resume=True, **kw))

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
    a, b = strip(metrics(straight)), strip(metrics(resumed))
    assert [r["step"] for r in b if "loss" in r] == [1, 2, 3, 4]
    assert a == b  # every logged number, losses included, bit for bit


def test_rm_script_smoke_ranked_data(tiny_dir, tmp_path):
    """Ranked lists expand to pairs; margin-ranking loss; eval every step; statistics from SFT data."""
    ranked = tmp_path / "ranked.jsonl"
    ranked.write_text("\n".join(json.dumps({"prompt": f"Rate colour {i}.", "responses": ["Great!", "Fine.", "Bad."],
                                            "rank": [1, 2, 3]}) for i in range(4)))  # 4 lists x 3 pairs
    sft = tmp_path / "sft.json"
    sft.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": f"{i}."} for i in range(8)]))
    out = tmp_path / "rm"
    cmd = [sys.executable, "train_rm.py", "--model", tiny_dir, "--data", str(ranked), "--out", str(out),
           "--max-steps", "2", "--batch-size", "2", "--grad-accum", "2", "--eval-frac", "0.25", "--eval-every", "1",
           "--max-length", "48", "--loss", "margin-ranking", "--ranking-margin", "0.5", "--norm-data", str(sft),
           "--norm-samples", "5"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "kept 9 (0 truncated)" in r.stdout  # 12 pairs, 3 held out
    logged = metrics(out)
    assert len([m for m in logged if "loss" in m]) == 2
    assert [m["step"] for m in logged if "eval_accuracy" in m] == [0, 1, 2]
    assert logged[-1]["norm_samples"] == 5 and "final_eval_accuracy" in logged[-2]
    config = AutoConfig.from_pretrained(out)
    assert config.reward_mean == logged[-1]["reward_mean"] and config.reward_std > 0
    # the PEFT adapter carries the score head, so adapter + base == the merged model
    peft = pytest.importorskip("peft")
    merged = AutoModelForSequenceClassification.from_pretrained(out)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1)  # a random score head
    base.config.pad_token_id = merged.config.pad_token_id
    tuned = peft.PeftModel.from_pretrained(base, str(out / "adapter"))
    ids = torch.randint(3, 1000, (2, 10))
    torch.testing.assert_close(tuned(ids).logits, merged(ids).logits, atol=1e-5, rtol=1e-5)


def test_rm_refuses_sft_data(tiny_dir, tmp_path):
    sft = tmp_path / "sft.json"
    sft.write_text(json.dumps([{"instruction": "Hi.", "input": "", "output": "Hello."}]))
    with pytest.raises(UserError, match="cannot be used as pairs"):
        train_rm.train(train_rm.Args(model=tiny_dir, data=str(sft), out=str(tmp_path / "rm")))
