"""What only a GPU can check (marker `cuda`: tests/conftest.py skips these where CUDA is unavailable): the fused
kernel against eager in bf16, one step of SFT, DPO, PPO and GRPO in bf16, the 4-bit (QLoRA) merge, and a stage under
torchrun on NCCL. Tiny models throughout: about a minute on one GPU."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, tiny_llama
from test_dpo import args_for as dpo_args
from test_grpo import make_args as grpo_args
from test_kernels import eager_reference, fused, make, run
from test_lora import tokens
from test_ppo import make_args as ppo_args
from test_ppo import tiny_actor
from test_sft import alpaca

import train_dpo
import train_grpo
import train_ppo
import train_sft
from nanorlhf import model as M
from nanorlhf.lora import add_lora, lora_layers, merge

pytestmark = pytest.mark.cuda
BF16 = dict(device="cuda", dtype="bfloat16")


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_fused_kernel_matches_eager_in_bf16(trainable):
    """bf16 inputs at a real model's vocabulary: fp32 logprobs and entropy as eager fp32 math on the same inputs, and
    bf16 gradients within bf16's rounding of eager's."""
    hidden, weight, targets = (t.cuda() for t in make((4, 256), 256, 32768, dtype=torch.bfloat16))
    logp, ent, grads = run(fused, hidden, weight, targets, trainable, True, temperature=0.7)
    ref_logp, ref_ent, ref_grads = run(eager_reference, hidden, weight, targets, trainable, True, temperature=0.7)
    assert logp.is_cuda and logp.dtype == ent.dtype == torch.float32
    torch.testing.assert_close(logp, ref_logp, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(ent, ref_ent, atol=2e-3, rtol=2e-3)
    for g, ref_g in zip(grads, ref_grads):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), ref_g.float(), atol=2e-2, rtol=2e-2)


@pytest.fixture(scope="module")
def actor_dir(tokenizer, tmp_path_factory):
    return tiny_actor(tokenizer, tmp_path_factory.mktemp("actor"))


@pytest.mark.parametrize("stage", ["sft", "dpo", "ppo", "grpo"])
def test_one_bf16_step_of_each_stage(stage, tiny_dir, tiny_rm_dir, actor_dir, tmp_path, monkeypatch):
    """One optimizer step in bf16 on the GPU: finite metrics, and a saved bf16 model that transformers loads."""
    (tmp_path / "cuda_reward.py").write_text("def reward(prompts, responses):\n"
                                            "    return [float(len(r) % 3) for r in responses]\n")
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "out")
    module, args = {
        "sft": lambda: (train_sft, train_sft.Args(model=tiny_dir, data=alpaca(tmp_path / "a.json"), out=out,
                                                  max_steps=1, batch_size=4, eval_frac=0, samples=1, **BF16)),
        "dpo": lambda: (train_dpo, dpo_args(tiny_dir, tmp_path, out=out, max_steps=1, **BF16)),
        "ppo": lambda: (train_ppo, ppo_args(tmp_path, actor_dir, rm=[tiny_rm_dir], out=out, max_steps=1, **BF16)),
        "grpo": lambda: (train_grpo, grpo_args(tmp_path, actor_dir, reward_fn="cuda_reward:reward", beta=0.1,
                                               out=out, max_steps=1, **BF16)),
    }[stage]()
    module.train(args)
    rows = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert rows[-1]["step"] == 1
    for row in rows:
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, (int, float))), row
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_4bit_merge_matches_the_quantised_model(tmp_path, tokenizer):
    """NF4 base + LoRA on the GPU (as --load-in-4bit loads it): the merged model, in memory and saved, computes what
    the quantised model with its adapter computes, to bf16 rounding."""
    from transformers import AutoModelForCausalLM
    tiny_llama(len(tokenizer)).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    model, tok = M.load_model(str(tmp_path / "base"), device="cuda", load_in_4bit=True)
    assert any(type(p).__name__ == "Params4bit" for p in model.parameters())
    add_lora(model, 4, 8, verbose=False)
    torch.manual_seed(0)
    for _, m in lora_layers(model):  # B starts at 0; give the adapter something to merge
        torch.nn.init.normal_(m.lora_B["default"].weight, std=0.1)
    ids = tokens().cuda()
    with torch.no_grad():
        quantised = model.eval()(ids).logits.float()
        torch.testing.assert_close(merge(model)(ids).logits.float(), quantised, atol=1e-2, rtol=1e-2)
    M.save_model(model, tok, str(tmp_path / "out"))
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map={"": "cuda"})
    assert not any(type(p).__name__ == "Params4bit" for p in saved.parameters())
    with torch.no_grad():
        torch.testing.assert_close(saved(ids).logits.float(), quantised, atol=1e-2, rtol=1e-2)


def test_torchrun_one_process_on_nccl(tiny_dir, tmp_path):
    """SFT under torchrun in the group dist.init makes on CUDA (NCCL for CUDA tensors, gloo beside it for the
    numbers every stage sums). With one process dist.init joins no group, so the launcher makes it first."""
    launcher = tmp_path / "launch.py"
    launcher.write_text(
        "import runpy, sys\nimport torch\nimport torch.distributed as td\nfrom nanorlhf import dist\n"
        "torch.cuda.set_device(0)\ntd.init_process_group(dist.backend(cuda=True))\n"
        "print('backend', td.get_backend_config(), flush=True)\n"
        "sys.argv = ['train_sft.py'] + sys.argv[1:]\nrunpy.run_path('train_sft.py', run_name='__main__')\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", str(launcher),
           "--model", tiny_dir, "--data", alpaca(tmp_path / "a.json"), "--out", str(out), "--max-steps", "2",
           "--batch-size", "2", "--eval-frac", "0.25", "--samples", "0", "--device", "cuda"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=os.environ | {"PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "nccl" in r.stdout, r.stdout[-2000:]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [row["step"] for row in rows if "loss" in row][-1] == 2
    assert any("eval_loss" in row for row in rows), rows  # the evaluation's sums crossed the group too
