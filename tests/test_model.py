import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from nanorlhf import model as M
from nanorlhf.cli import UserError
from nanorlhf.engine import generate
from nanorlhf.lora import add_lora, lora_layers


def test_smollm2_gguf_converts_and_answers(smollm2_dir):
    """The embedded GGUF becomes a plain folder that transformers loads, and the model is the real one."""
    assert os.path.isfile(os.path.join(smollm2_dir, "config.json"))
    model, tok = M.load_model(smollm2_dir)
    assert model.config.hidden_size == 576 and model.config.vocab_size == 49152 and len(tok) == 49152
    assert tok.pad_token_id != tok.eos_token_id  # docs/ppo-details.md §4
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
    assert M.resolve("smollm2") == smollm2_dir  # cached: converted once


def test_gguf_without_accelerate_is_one_line(tmp_path, monkeypatch):
    """transformers' GGUF reader raises deep inside without accelerate; we name the package and the extra first."""
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "accelerate" else find_spec(name, *a))
    monkeypatch.setenv("NANORLHF_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(UserError, match=r"m\.gguf: reading a \.gguf model needs the accelerate package: pip install"):
        M.resolve(str(gguf))


def test_resolve_errors(tmp_path):
    with pytest.raises(UserError, match="--actor .*not a model folder"):
        M.resolve(str(tmp_path), flag="--actor")
    with pytest.raises(UserError, match="GGUF file not found"):
        M.resolve(str(tmp_path / "x.gguf"))
    with pytest.raises(UserError, match="no such model folder"):
        M.resolve(str(tmp_path / "missing"))


def test_load_model_settings(tiny_dir):
    model, tok = M.load_model(tiny_dir, gradient_checkpointing=True)
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert tok.pad_token_id not in (None, tok.eos_token_id) and model.config.pad_token_id == tok.pad_token_id
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_logprobs_match_hf_logits_with_left_and_right_padding(tiny_dir):
    model, tok = M.load_model(tiny_dir)
    ids = torch.randint(3, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding on row 0
    mask[1, -2:] = 0  # right padding on row 1
    targets = torch.where(mask.bool(), ids.roll(-1, 1), -100)
    targets[:, -1] = -100
    targets[0, :3] = -100
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    ref = torch.log_softmax(logits / 0.7, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0] * (targets != -100)
    torch.testing.assert_close(M.logprobs(model, ids, mask, targets, temperature=0.7), ref, atol=1e-5, rtol=1e-5)


def test_lm_head_refusals(tiny_dir):
    model, _ = M.load_model(tiny_dir)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(UserError, match="soft-capping"):
        M.lm_head(model)
    model.config.final_logit_softcapping = None
    model.lm_head = torch.nn.Linear(64, model.config.vocab_size, bias=True)
    with pytest.raises(UserError, match="bias"):
        M.lm_head(model)


def test_save_model_merged_and_adapter(tiny_dir, tmp_path):
    peft = pytest.importorskip("peft")
    model, tok = M.load_model(tiny_dir, load_in_4bit=True)
    add_lora(model, r=4, alpha=8)
    for _, m in lora_layers(model):
        torch.nn.init.normal_(m.lora_B["default"].weight, std=0.05)
    ids = torch.randint(3, 1000, (1, 8))
    ours = model(ids).logits.detach()
    generate(model, tok, [[5, 6, 7]], max_new_tokens=3)  # an inference pass first, as PPO's rollouts do
    M.save_model(model, tok, str(tmp_path / "out"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(merged(ids).logits, ours, atol=1e-4, rtol=1e-4)
    with open(tmp_path / "out" / "adapter" / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == tiny_dir
    base, _ = M.load_model(tiny_dir, load_in_4bit=True)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "out" / "adapter")
    torch.testing.assert_close(loaded(ids).logits, ours, atol=1e-4, rtol=1e-4)


def test_inference_keeps_4bit_layers_on_their_training_kernel(tiny_dir, monkeypatch):
    """On AVX512-BF16 CPUs bitsandbytes 0.50 moves a 4-bit layer to a bf16 kernel at its first no-grad eval forward,
    and that kernel passes no gradient to its input. The CPU capability is faked here, so this runs on any CPU:
    after a generation, the LoRA gradients must equal those of a model that never ran inference."""
    import bitsandbytes.nn.modules as bnb_modules
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    ids = torch.randint(3, 1000, (2, 8), generator=torch.Generator().manual_seed(0))
    grads = []
    for generate_first in (False, True):
        model, tok = M.load_model(tiny_dir, load_in_4bit=True)
        torch.manual_seed(0)
        add_lora(model, r=4, alpha=8)
        for i, (_, m) in enumerate(lora_layers(model)):
            torch.nn.init.normal_(m.lora_B["default"].weight, std=0.05, generator=torch.Generator().manual_seed(i))
        if generate_first:
            generate(model, tok, [[5, 6, 7]], max_new_tokens=3)
            assert not any(getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)
                           for m in model.modules() if hasattr(m, "weight"))
        model.train()
        model(ids).logits.pow(2).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 14
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=0, rtol=0)


def test_4bit_unavailable_is_a_clear_error(monkeypatch, tiny_dir):
    import builtins
    real_import = builtins.__import__

    def no_bnb(name, *a, **k):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(UserError, match="--load-in-4bit: bitsandbytes cannot be imported"):
        M.load_model(tiny_dir, load_in_4bit=True)


def test_gradient_checkpointing_replays_the_forward_adapter(tiny_dir):
    """Two adapters, one backward after both contexts closed: checkpointed grads equal plain grads."""
    grads = []
    for checkpointing in (False, True):
        model, _ = M.load_model(tiny_dir, gradient_checkpointing=checkpointing)
        model.train()
        torch.manual_seed(0)  # the same A init in both runs
        add_lora(model, r=4, alpha=8, name="policy")
        add_lora(model, r=4, alpha=8, name="value")
        for i, (_, m) in enumerate(lora_layers(model)):
            for name in ("policy", "value"):
                torch.nn.init.normal_(m.lora_B[name].weight, std=0.1, generator=torch.Generator().manual_seed(i))
        ids = torch.randint(3, 1000, (2, 8), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        from nanorlhf.lora import use_adapter
        with use_adapter(model, "policy"):
            a = M.hidden_states(model, ids, mask).pow(2).mean()
        with use_adapter(model, "value"):
            b = M.hidden_states(model, ids, mask).mean()
        (a + b).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 4 * 14
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)


def test_native_bf16_reads_the_cpu_flags(tmp_path):
    """Both paths, whatever this machine's CPU: flags with AVX512-BF16 or AMX-BF16 mean native bf16, without not."""
    for flags, expected in (("fpu avx512f avx512_bf16 sse", True), ("fpu amx_bf16 amx_tile", True),
                            ("fpu avx2 avx512f avx512_vnni", False)):
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert M.native_bf16(torch.device("cpu"), str(tmp_path / "cpuinfo")) is expected
    assert M.native_bf16(torch.device("cpu"), str(tmp_path / "missing")) is False
    assert M.pick_dtype(torch.device("cpu")) == torch.float32  # auto stays fp32 on every CPU (docs/benchmarks.md)


def test_compiled_layers_train_and_score_as_eager_and_sample_eagerly(tiny_dir):
    """--compile: every decoder layer compiled (one trace shared by all, dynamic shapes): in fp32 the policy's and the
    reference's logprobs and the adapter's gradients equal the eager model's to rounding, and sampling, which runs
    the layers eagerly, draws the same responses."""
    from nanorlhf.rollout import response_logprobs
    runs = []
    for compiled in (False, True):
        model, tok = M.load_model(tiny_dir, compile=compiled)
        torch.manual_seed(0)
        add_lora(model, r=4, alpha=8, name="policy", verbose=False)
        for i, (_, m) in enumerate(lora_layers(model)):
            torch.nn.init.normal_(m.lora_B["policy"].weight, std=0.05, generator=torch.Generator().manual_seed(i))
        from nanorlhf.lora import use_adapter
        with use_adapter(model, "policy"):
            out = generate(model, tok, [[5, 6, 7], [8, 9], [10, 11, 12, 13]], 6, 1.0, seeds=[1, 2, 3])
        batch = {k: out[k] for k in ("queries", "query_mask", "responses", "mask")}
        model.train()
        logprobs = response_logprobs(model, batch, 1.0, "policy")
        logprobs.sum().backward()
        ref_logprobs = response_logprobs(model, batch, 1.0, None)
        grads = torch.cat([m.lora_A["policy"].weight.grad.flatten() for _, m in lora_layers(model)])
        runs.append((out["responses"], logprobs.detach(), ref_logprobs.detach(), grads))
    (responses, logprobs, ref_logprobs, grads), compiled = runs
    assert torch.equal(responses, compiled[0])
    torch.testing.assert_close(compiled[1], logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled[2], ref_logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled[3], grads, atol=1e-6, rtol=1e-4)
    assert grads.abs().sum() > 0
