"""The memory planner: hand-computed weights, LoRA and KV sizes, what autograd really saves, and 8B in 24 GiB.

Estimates against measured CPU runs: tests/benchmarks/validate_memory.py (slow, not in this suite)."""
import json

import pytest
import torch
from conftest import tiny_llama

from nanorlhf import memory
from nanorlhf import model as M
from nanorlhf.cli import UserError
from nanorlhf.lora import add_lora

GiB = 2**30
# H 8, 2 layers, 2 heads of 4 (q 8), 1 kv head (k, v 4), MLP 16, vocab 32, untied: small enough to count by hand.
SMALL = dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=16,
             vocab_size=32, tie_word_embeddings=False)
# Settings under which every stage of Llama-3-8B, nf4 base + LoRA r=16, fits a 24 GiB card (our recommendation);
# GRPO generates 8 prompts × 4, the same 32 sequences as PPO.
FITS_8B = dict(load_in_4bit=True, lora_r=16, gradient_checkpointing=True, batch_size=4, max_length=1024,
               max_new_tokens=256, rollout_batch_size=32)
GRPO_8B = dict(rollout_batch_size=8, num_generations=4)


def test_weight_bytes_by_hand():
    # per layer q 64 + k 32 + v 32 + o 64 + gate 128 + up 128 + down 128 = 576 linear weights
    linear, other = 2 * 576, 32 * 8 + 32 * 8 + 5 * 8  # embeddings, lm_head, 5 RMSNorms
    assert memory.weight_bytes(SMALL, 2) == (linear + other) * 2  # bf16: 2 B/param
    assert memory.weight_bytes(SMALL, 2, bits=8) == linear * 1 + 4 * 2 * 64 + other * 2  # int8 + fp32 row scales
    assert memory.weight_bytes(SMALL, 2, bits=4) == pytest.approx(linear * 0.5159 + other * 2, abs=0.1)
    assert memory.NF4 == pytest.approx(0.52, abs=0.005)  # embeddings and lm_head stay 16-bit
    assert memory.weight_bytes(SMALL, 2, lm_head=False) == (linear + other - 32 * 8) * 2  # reward model: no lm_head


def test_weight_bytes_match_a_real_model():
    model = tiny_llama(1000)  # tied: the lm_head is the embedding
    real = sum(p.numel() * p.element_size() for p in model.parameters())
    assert memory.weight_bytes(json.loads(model.config.to_json_string()), 4) == real


def test_lora_params_match_add_lora():
    model = tiny_llama(1000)
    trainable, _ = add_lora(model, 16, 32, verbose=False)
    # r · L · Σ(in + out): q 64+64, k 64+32, v 64+32, o 64+64, gate 64+128, up 64+128, down 128+64 = 1024
    assert trainable == 16 * 2 * 1024 == memory.lora_params(model.config.to_dict(), 16)


def test_kv_cache_by_hand():
    cfg = memory.load_config("8b")  # 32 layers, 8 kv heads of 128: K and V: 4·L·kv_dim bytes/token in bf16
    assert memory.kv_cache_bytes(cfg, 2, 1000) == 4 * 32 * 1024 * 1000


def test_tiles_are_the_kernels():
    from nanorlhf.kernels import TILE_BYTES, chunk_rows
    assert memory.TILE_BYTES == TILE_BYTES
    for V in (1000, 49152, 128256, 152064):
        for n in (1, 100, 480, 481, 8192):
            assert memory.chunk_rows(n, V) == chunk_rows(n, V)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_activations_match_autograd(dtype):
    """What one forward saves for backward, counted by autograd itself, against the planner's formula."""
    model = tiny_llama(1000).to(dtype)
    add_lora(model, 8, 16, verbose=False)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    B, T = 2, 64
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, -5:] = 0  # padding: transformers passes a mask, so SDPA saves it and k, v are repeated
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        M.hidden_states(model, torch.randint(0, 1000, (B, T)), mask)
    cfg = model.config.to_dict()
    estimate = memory.activation_bytes(cfg, 4 if dtype == torch.float32 else 2, B * T, T, lora=8)
    rope = 2 * B * T * 16 * (4 if dtype == torch.float32 else 2)  # cos and sin, shared by all layers: not modelled
    assert estimate == pytest.approx(sum(saved.values()) - rope, rel=0.01)


@pytest.mark.parametrize("stage", memory.STAGES)
def test_8b_nf4_lora_fits_24gb_at_recommended_settings(stage):
    b = memory.estimate(memory.load_config("8b"), stage, **FITS_8B | (GRPO_8B if stage == "grpo" else {}))
    assert 6 * GiB < b["total"] <= 24 * GiB, b  # above Unsloth's 6 GB floor for the 4-bit weights alone
    assert b["reference"] == 0  # LoRA: the reference is the same model with adapters disabled


def test_too_big_does_not_fit_and_a_fix_is_suggested():
    cfg, kw = memory.load_config("8b"), dict(load_in_4bit=True, batch_size=8, max_length=4096)
    assert memory.estimate(cfg, "dpo", **kw)["total"] > 24 * GiB
    fix = memory.suggest(cfg, "dpo", 24, **kw)
    assert fix["gradient_checkpointing"] and memory.estimate(cfg, "dpo", **(kw | fix))["total"] <= 24 * GiB
    assert memory.estimate(cfg, "sft")["total"] > 24 * GiB  # a bf16 8B base does not fit with any batch


def test_checkpointing_and_4bit_save_memory():
    cfg = memory.load_config("8b")
    plain, ckpt = (memory.estimate(cfg, "sft", gradient_checkpointing=g)["activations"] for g in (False, True))
    assert ckpt < plain / 10
    assert memory.estimate(cfg, "sft", load_in_4bit=True)["weights"] < memory.estimate(cfg, "sft")["weights"] / 2.5


def test_cli_prints_every_stage(capsys, tmp_path):
    memory.main(["--model", "8b", "--load-in-4bit", "--gradient-checkpointing", "--batch-size", "4",
                 "--max-length", "1024", "--max-new-tokens", "256", "--rollout-batch-size", "32", "--all-stages"])
    out = capsys.readouterr().out
    assert out.count("fits in 24 GiB: yes") == 5 and "kv_cache" in out and "weights" in out
    # all but GRPO, whose 32 prompts × 4 generations are 128 sequences in the KV cache: 8 prompts fit (GRPO_8B)
    assert "generation, 128 × 1280 tokens" in out and "--rollout-batch-size 8 (" in out
    memory.main(["--model", "8b", "--stage", "dpo", "--batch-size", "16", "--max-length", "4096"])
    assert "fits in 24 GiB: no" in capsys.readouterr().out
    (tmp_path / "config.json").write_text(json.dumps(SMALL))
    memory.main(["--model", str(tmp_path), "--stage", "ppo", "--dtype", "fp32", "--device", "cpu"])
    assert "fits in 24 GiB: yes" in capsys.readouterr().out


def test_grpo_is_ppo_without_the_critic(capsys):
    """One adapter and no value head, no critic line or pass, and a KV cache of rollout × num_generations rows."""
    cfg = memory.load_config("8b")
    H, kw = cfg["hidden_size"], dict(load_in_4bit=True, gradient_checkpointing=True, batch_size=4, max_length=1024,
                                     max_new_tokens=256)
    ppo = memory.estimate(cfg, "ppo", rollout_batch_size=32, **kw)
    grpo = memory.estimate(cfg, "grpo", rollout_batch_size=8, num_generations=4, **kw)
    # LoRA line: PPO's two adapters + value head (H + 1), 16 B each (fp32 weight, grad, 2 Adam moments)
    assert grpo["lora"] == (ppo["lora"] - 16 * (H + 1)) / 2 == 16 * memory.lora_params(cfg, 16)
    assert "critic" in ppo and "critic" not in grpo and grpo["reward_model"] == ppo["reward_model"]
    # PPO's update peaks in the critic's forward: twice the saved activations + the value head's (N, H) fp32 input
    N = 4 * (1024 + 256)
    assert ppo.notes["transient"] == "at critic forward + backward" and "critic" not in grpo.notes["transient"]
    assert ppo["activations"] == 2 * grpo["activations"] + N * 4 * H
    # Generation: 8 prompts × 4 generations decode into the same 32 sequences' preallocated cache as PPO's 32 prompts,
    # beside the lm_head's fp32 copy, 32 rows of sampler tiles (fp32 logits and probabilities, a float64 CDF) and the
    # one dequantised 4-bit weight; but GRPO prefills only its 8 distinct prompts, so PPO's prefill is its peak here
    V, I = cfg["vocab_size"], cfg["intermediate_size"]
    decode = memory.kv_cache_bytes(cfg, 2, 32 * 1280) + V * H * 4 + 32 * V * 16 + I * H * 2
    assert grpo["kv_cache"] == decode < ppo["kv_cache"]
    more = memory.estimate(cfg, "grpo", rollout_batch_size=8, num_generations=8, **kw)  # twice the generations
    assert more["kv_cache"] - grpo["kv_cache"] == memory.kv_cache_bytes(cfg, 2, 32 * 1280) + 32 * V * 16
    assert memory.estimate(cfg, "grpo", reward_models=0, **kw)["reward_model"] == 0  # a Python reward
    with pytest.raises(UserError, match="full fine-tuning"):
        memory.estimate(cfg, "grpo", lora_r=0)
    memory.main(["--model", "tiny", "--stage", "grpo", "--rollout-batch-size", "4", "--num-generations", "8",
                 "--max-length", "100", "--max-new-tokens", "28"])
    out = capsys.readouterr().out
    assert "generation, 32 × 128 tokens" in out and "critic" not in out and "fits in 24 GiB: yes" in out


def test_head_critic_drops_the_value_adapter_and_its_pass():
    """PPO --critic head: one adapter + the value head, the GRPO-sized activations (no critic forward), and the
    rollout's reference hidden states (rollout × response tokens × H in the compute dtype) on the critic line."""
    cfg = memory.load_config("8b")
    H, kw = cfg["hidden_size"], dict(load_in_4bit=True, gradient_checkpointing=True, batch_size=4, max_length=1024,
                                     max_new_tokens=256, rollout_batch_size=32)
    adapter, head = memory.estimate(cfg, "ppo", **kw), memory.estimate(cfg, "ppo", critic="head", **kw)
    grpo = memory.estimate(cfg, "grpo", **(kw | {"rollout_batch_size": 8}))
    assert head["lora"] == 16 * (memory.lora_params(cfg, 16) + H + 1) == grpo["lora"] + 16 * (H + 1)
    assert head["critic"] == 32 * 256 * H * 2 and adapter["critic"] == 0
    assert head["activations"] == grpo["activations"] and "critic" not in head.notes["transient"]
    assert head["total"] < adapter["total"]
    with pytest.raises(SystemExit):  # a choice it does not know: one line, exit 2
        memory.main(["--stage", "ppo", "--critic", "shared"])


def test_bad_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a preset"):
        memory.load_config(str(tmp_path / "nope"))


def test_per_rank_plan_adds_only_the_allreduce_buffer():
    """Under torchrun each rank holds what one process holds, plus one flat fp32 copy of the trainable grads."""
    cfg = memory.load_config("8b")
    for stage in ("sft", "ppo"):
        one = memory.estimate(cfg, stage, load_in_4bit=True)
        two = memory.estimate(cfg, stage, load_in_4bit=True, nproc=2)
        trainable = one["lora"] / 16  # fp32 weight + grad + two Adam moments: 16 B per trainable parameter
        assert one["allreduce"] == 0 and two["allreduce"] == trainable * 4
        assert two["total"] - one["total"] == pytest.approx(trainable * 4)


def test_scoring_rows_can_set_the_peak():
    """--score-batch-size: PPO scores each rollout in no-grad forwards of that many rows. A few stay below the
    update's forward with grad; many are the peak, holding one layer's temporaries and the kernel's tiles but no
    saved activations and no row gradients."""
    cfg = memory.load_config("smollm2")
    kw = dict(batch_size=2, max_length=128, max_new_tokens=48, rollout_batch_size=32, critic="head")
    default = memory.estimate(cfg, "ppo", **kw)
    assert default["total"] == memory.estimate(cfg, "ppo", score_batch_size=2, **kw)["total"]
    assert "scoring" not in default.peak and default["row_grads"] > 0
    wide = memory.estimate(cfg, "ppo", score_batch_size=256, **kw)
    assert wide.peak == "scoring forward (no grad)" and wide["activations"] == wide["row_grads"] == 0
    # By hand, 256 rows × 176 tokens in bf16 with LoRA: the MLP's widest moment per token (2 bf16 + 2 fp32 values
    # of I = 1536); the kernel in 94 balanced chunks of 480 rows (90 MiB / (4 B × 49152) = 480), one fp32 (480, V)
    # tile of logits (no grad: no gradient tiles), the lm_head's fp32 copy and a (480, H) fp32 chunk of hidden states.
    N = 256 * 176
    assert wide["transient"] == N * (2 * 2 + 2 * 4) * 1536 + 480 * 49152 * 4 + 49152 * 576 * 4 + 480 * 576 * 4
    assert wide["total"] > default["total"]


def test_a_suggestion_brings_scoring_rows_down_when_they_are_the_peak(capsys):
    """8B PPO at the recommended settings fits (test above); with --score-batch-size 64 its scoring forwards are the
    peak and do not fit, and the suggestion keeps every other setting and scores 4 rows at a time."""
    flags = ["--model", "8b", "--stage", "ppo", "--load-in-4bit", "--gradient-checkpointing", "--batch-size", "4",
             "--max-length", "1024", "--max-new-tokens", "256", "--rollout-batch-size", "32"]
    memory.main(flags + ["--score-batch-size", "64"])
    out = capsys.readouterr().out
    assert "peak at scoring forward (no grad); fits in 24 GiB: no" in out
    fitting = memory.estimate(memory.load_config("8b"), "ppo", load_in_4bit=True, gradient_checkpointing=True,
                              batch_size=4, max_length=1024, max_new_tokens=256, rollout_batch_size=32)["total"]
    assert (f"suggestion: --gradient-checkpointing --batch-size 4 --max-length 1024 --rollout-batch-size 32 "
            f"--score-batch-size 4 ({fitting / 2**30:.2f} GiB)") in out
