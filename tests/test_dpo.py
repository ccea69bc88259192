import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from transformers import AutoModelForCausalLM

import train_dpo
from nanorlhf import model as M
from nanorlhf.cli import build_parser, main
from nanorlhf.data import PairRow

# Two pairs with β = 0.5. Pair 1: chosen log-ratio -1 - (-1.5) = 0.5, rejected -2 - (-1.5) = -0.5, so h = 1
# and βh = 0.5. Pair 2: chosen -3 - (-2) = -1, rejected -1 - (-2) = 1, so h = -2 and βh = -1.
PC, PR, RC, RR = [-1.0, -3.0], [-2.0, -1.0], [-1.5, -2.0], [-1.5, -2.0]
# -log σ(0.5) = log(1 + e^-0.5) = 0.474077   -log σ(-0.5) = log(1 + e^0.5) = 0.974077
# -log σ(-1) = log(1 + e)       = 1.313262   -log σ(1)    = log(1 + e^-1) = 0.313262
CASES = [
    ("sigmoid", 0.0, [0.474077, 1.313262]),
    ("sigmoid", 0.1, [0.9 * 0.474077 + 0.1 * 0.974077, 0.9 * 1.313262 + 0.1 * 0.313262]),  # 0.524077, 1.213262
    ("robust", 0.1, [(0.9 * 0.474077 - 0.1 * 0.974077) / 0.8, (0.9 * 1.313262 - 0.1 * 0.313262) / 0.8]),
    ("ipo", 0.0, [0.0, 9.0]),    # (h - 1/(2·0.5))²: (1 - 1)², (-2 - 1)²
    ("hinge", 0.0, [0.5, 2.0]),  # relu(1 - βh): 1 - 0.5, 1 + 1
]


def pairs(path, n=16):
    """Learnable pairs: every prompt prefers "Yes" to "No". A short system prompt keeps rows ~25 tokens."""
    rows = [{"prompt": [{"role": "system", "content": "Hi."}, {"role": "user", "content": f"Question {i}?"}],
             "chosen": f"Yes {i}.", "rejected": f"No {i}."} for i in range(n)]
    path.write_text(json.dumps(rows))
    return str(path)


def records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def column(out, key):
    return [r[key] for r in records(out) if key in r]


def args_for(tiny_dir, tmp_path, name="dpo", **kw):
    base = dict(model=tiny_dir, data=pairs(tmp_path / "pairs.json"), out=str(tmp_path / name), batch_size=4,
                grad_accum=1, max_length=64, eval_frac=0, warmup=0, log_every=100)
    return train_dpo.Args(**(base | kw))


@pytest.mark.parametrize("loss_type, eps, expected", CASES)
def test_dpo_loss_variants_hand_computed(loss_type, eps, expected):
    losses, chosen, rejected = train_dpo.dpo_loss(*map(torch.tensor, (PC, PR, RC, RR)), beta=0.5,
                                                  loss_type=loss_type, label_smoothing=eps)
    torch.testing.assert_close(losses, torch.tensor(expected), atol=1e-5, rtol=0)
    torch.testing.assert_close(chosen, torch.tensor([0.25, -0.5]))  # β·(π - ref)
    torch.testing.assert_close(rejected, torch.tensor([-0.25, 0.5]))


def test_dpo_sigmoid_gradient_hand_computed():
    pc, pr = torch.tensor(PC, requires_grad=True), torch.tensor(PR, requires_grad=True)
    losses, chosen, rejected = train_dpo.dpo_loss(pc, pr, torch.tensor(RC), torch.tensor(RR), beta=0.5)
    losses.sum().backward()
    # d/dπ_c [-log σ(βh)] = -β·σ(-βh): -0.5·σ(-0.5) = -0.5·0.377541 and -0.5·σ(1) = -0.5·0.731059;
    # d/dπ_r is the opposite
    torch.testing.assert_close(pc.grad, torch.tensor([-0.188770, -0.365529]), atol=1e-6, rtol=0)
    torch.testing.assert_close(pr.grad, torch.tensor([0.188770, 0.365529]), atol=1e-6, rtol=0)
    assert not chosen.requires_grad and not rejected.requires_grad


def test_bad_label_smoothing_is_a_one_line_error(tmp_path, capsys):
    for flags, message in [(["--label-smoothing", "0.5"], "must be < 0.5"),
                           (["--loss", "ipo", "--label-smoothing", "0.1"], "applies to --loss sigmoid or robust"),
                           (["--beta", "0"], "--beta must be > 0")]:
        with pytest.raises(SystemExit) as e:
            main(train_dpo.train, train_dpo.Args, ["--data", "x.json", "--out", str(tmp_path / "o"), *flags])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_help_documents_the_dpo_flags():
    text = build_parser(train_dpo.Args).format_help()
    for flag in ["--beta", "--loss", "--label-smoothing", "--precompute-ref", "--lora-r", "--eval-every"]:
        assert flag in text
    assert "{sigmoid,ipo,hinge,robust}" in text


def spy_reference(monkeypatch):
    """Record every reference forward: (inputs, output) per call."""
    calls, real = [], M.reference_logprobs

    def spy(model, ref_model, input_ids, attention_mask, targets, temperature=1.0):
        out = real(model, ref_model, input_ids, attention_mask, targets, temperature)
        calls.append(((input_ids.clone(), attention_mask.clone(), targets.clone()), out.clone()))
        return out
    monkeypatch.setattr(M, "reference_logprobs", spy)
    return calls


def assert_same_answers(calls, n):
    """n reference calls, all on the same batch, all with the same bits."""
    assert len(calls) == n
    (inputs, out), rest = calls[0], calls[1:]
    for later_inputs, later_out in rest:
        assert all(torch.equal(a, b) for a, b in zip(inputs, later_inputs)) and torch.equal(out, later_out)


def test_dpo_full_finetuning_learns_the_pairs(tiny_dir, tmp_path):
    data = pairs(tmp_path / "pairs.json")
    args = args_for(tiny_dir, tmp_path, data=data, eval_data=data, lora_r=0, lr=1e-3, batch_size=8, max_steps=4)
    train_dpo.train(args)
    start, = column(args.out, "eval_rewards/accuracy")
    end, = column(args.out, "final_eval_rewards/accuracy")
    assert start == 0 and end > 0.9  # at step 0 chosen and rejected rewards tie at exactly 0
    assert column(args.out, "eval_rewards/margin") == column(args.out, "eval_rewards/chosen") == [0.0]
    assert column(args.out, "final_eval_loss")[0] < column(args.out, "eval_loss")[0]


@pytest.mark.parametrize("lora_r", [0, 8], ids=["frozen-copy", "lora-disabled"])
def test_reference_stays_fixed_while_the_policy_learns(tiny_dir, tmp_path, monkeypatch, lora_r):
    # One pair per step, always the same: the reference sees the same batch each step and must give the same bits.
    calls = spy_reference(monkeypatch)
    args = args_for(tiny_dir, tmp_path, data=pairs(tmp_path / "one.json", n=1), batch_size=1, lora_r=lora_r,
                    lr=1e-3 if lora_r == 0 else 1e-2, max_steps=3)
    train_dpo.train(args)
    assert_same_answers(calls, 3)
    margin = column(args.out, "rewards/margin")
    assert margin[0] == 0 and margin[0] < margin[1] < margin[2]  # while the policy moves the right way


@pytest.mark.parametrize("lora_r", [0, 8])
def test_precompute_ref_gives_the_same_losses(tiny_dir, tmp_path, lora_r):
    kw = dict(lora_r=lora_r, lr=1e-3, max_steps=2)
    train_dpo.train(args_for(tiny_dir, tmp_path, "live", **kw))
    train_dpo.train(args_for(tiny_dir, tmp_path, "pre", precompute_ref=True, **kw))
    for key in ("loss", "rewards/margin"):
        live, pre = column(tmp_path / "live", key), column(tmp_path / "pre", key)
        assert len(live) == 2 and pre == pytest.approx(live, rel=1e-6, abs=1e-6), key


def without_timing(rows):
    return [{k: v for k, v in r.items() if k not in ("step_time", "tokens_per_s", "peak_mem_gb")} for r in rows]


@pytest.mark.parametrize("kw", [dict(lora_r=0), dict(precompute_ref=True)], ids=["frozen-copy", "precompute"])
def test_resume_is_exact(tiny_dir, tmp_path, kw):
    # A 4-step run checkpoints at 2 and 4; drop checkpoint-4 and resume from 2. The reference must come from the
    # untrained model, not the checkpoint, for steps 3-4 and the final evaluation to repeat bit for bit.
    kw |= dict(batch_size=2, lr=1e-3, max_steps=4, save_every=2, eval_frac=0.25)
    args = args_for(tiny_dir, tmp_path, **kw)
    train_dpo.train(args)
    straight = without_timing(records(args.out))
    shutil.rmtree(os.path.join(args.out, "checkpoint-4"))
    train_dpo.train(args_for(tiny_dir, tmp_path, resume=True, **kw))
    assert len(column(args.out, "loss")) == 4 and without_timing(records(args.out)) == straight


def test_dpo_script_smoke(tiny_dir, tmp_path):
    out = tmp_path / "dpo"
    cmd = [sys.executable, "train_dpo.py", "--model", tiny_dir, "--data", pairs(tmp_path / "d.json", n=8), "--out",
           str(out), "--max-steps", "2", "--batch-size", "2", "--grad-accum", "2", "--eval-frac", "0.25",
           "--max-length", "48", "--loss", "robust", "--label-smoothing", "0.1", "--eval-every", "1"]
    # Eager kernel: the subprocess would spend most of its time compiling it (the kernel tests cover the compiled path).
    env = os.environ | {"NANORLHF_EAGER": "1"}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = records(out)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert len(column(out, "eval_rewards/accuracy")) == 3 and len(column(out, "final_eval_loss")) == 1
    assert {"logps/chosen", "logps/rejected", "rewards/margin", "tokens_per_s"} <= set(rows[1])
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == 49152
    assert os.path.isdir(out / "adapter")


def test_ipo_uses_mean_token_logprobs_hand_computed(tiny_dir):
    """IPO regresses the difference of *mean* token log-ratios to 1/(2β) (TRL since v0.11): with unequal
    completion lengths the summed form gives another loss."""
    from nanorlhf.lora import lora_layers
    from nanorlhf.preference import Reference, summed_logprobs
    model, tok = M.load_model(tiny_dir)
    from nanorlhf.lora import add_lora
    add_lora(model, r=4, alpha=8)
    for i, (_, m) in enumerate(lora_layers(model)):  # a policy that differs from its reference
        torch.nn.init.normal_(m.lora_B["default"].weight, std=0.1, generator=torch.Generator().manual_seed(i))
    prompt = [5, 6, 7]
    rows = [PairRow(prompt, [11, 12, 2], [13, 2], None),  # lengths 3|2
            PairRow(prompt, [14, 2], [15, 16, 17, 18, 2], None)]  # 2|5
    args = train_dpo.Args(loss="ipo", beta=0.5)
    reference = Reference(model, tok.pad_token_id)
    losses, _ = train_dpo.dpo_step(model, reference, rows, args, tok.pad_token_id)
    seqs = train_dpo.pair_seqs(rows)
    with torch.no_grad():
        pi = summed_logprobs(model, seqs, tok.pad_token_id)
        ref = reference(seqs)
    n = torch.tensor([3.0, 2.0, 2.0, 5.0])  # chosen lengths, then rejected lengths
    r = (pi - ref) / n
    h = r[:2] - r[2:]
    expected = (h - 1 / (2 * 0.5)) ** 2
    torch.testing.assert_close(losses.detach(), expected, atol=1e-5, rtol=1e-5)
    summed_h = (pi - ref)[:2] - (pi - ref)[2:]
    assert not torch.allclose(expected, (summed_h - 1.0) ** 2, atol=1e-3)  # the case tells the two forms apart
