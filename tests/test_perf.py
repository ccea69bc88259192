"""The FLOP estimate behind every MFU number, against a count by hand and torch's own FLOP counter; peak memory
that is the process's own."""
import math
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, tiny_llama
from torch.utils.flop_counter import FlopCounterMode

from nanorlhf import perf
from nanorlhf.lora import add_lora, use_adapter

V = 49152


@pytest.fixture
def lora_llama():
    """The tiny Llama (hidden 64, MLP 128, 2 layers, 4 query and 2 key/value heads of 16) with a rank-4 adapter."""
    model = tiny_llama(V)
    model.config._attn_implementation = "eager"  # plain matmuls, which FlopCounterMode sees
    add_lora(model, 4, 8, name="policy", verbose=False)
    return model


def test_shape_counts_by_hand(lora_llama):
    s = perf.shape(lora_llama)
    # per layer: q 64·64, k and v 64·32, o 64·64, gate, up and down 64·128
    assert s.base == 2 * (4096 + 2048 + 2048 + 4096 + 3 * 8192)  # 73,728
    assert s.head == V * 64
    # r·(in + out) per projection: q, o 4·128; k, v 4·96; gate, up, down 4·192
    assert s.lora == {"policy": 2 * (2 * 512 + 2 * 384 + 3 * 768)}  # 8,192
    assert (s.layers, s.attn_dim) == (2, 64)
    # T = 3 tokens: 2·N·T for the matmuls + 2·L·d·T·(T+1) for causal attention
    n = 73728 + V * 64 + 8192
    assert s.forward([3], 3, adapter="policy") == 2 * n * 3 + 2 * 2 * 64 * 3 * 4
    assert s.forward([3, 5]) == 2 * 73728 * 8 + 2 * 2 * 64 * (3 * 4 + 5 * 6)
    # the lm_head only on the tokens with a target: here 1 of the 3
    assert s.forward([3], 1, adapter="policy") == 2 * (n - V * 64) * 3 + 2 * V * 64 + 2 * 2 * 64 * 3 * 4
    # backward: input gradients of the frozen base and head (2·N), both gradients of the adapter (4·N_lora), 2×
    # attention
    assert s.backward([3], 3, adapter="policy") == 2 * (73728 + V * 64) * 3 + 4 * 8192 * 3 + 4 * 2 * 64 * 3 * 4
    # generation: the forward of the prompt and the response but its last token (never fed back: 4 + 3 - 1 = 6
    # positions) without the head, the head on the 3 positions the response tokens are sampled from
    assert s.generate([4], [3]) == 2 * 73728 * 6 + 2 * 2 * 64 * 6 * 7 + 2 * V * 64 * 3
    # two samples of one 4-token prompt (GRPO's group), 3 and 2 tokens: the prompt's prefill once, then 2 and 1 fed
    # tokens at positions 4, 5 and 4, each 4·L·d per key it attends over (5, 6 and 5)
    assert s.generate([4, 4], [3, 2], prefill_lengths=[4]) == (2 * 73728 * 4 + 2 * 2 * 64 * 4 * 5
                                                               + 2 * 73728 * 3 + 4 * 2 * 64 * (5 + 6 + 5)
                                                               + 2 * V * 64 * 5)


def test_forward_matmuls_match_torchs_flop_counter(lora_llama):
    """FlopCounterMode counts every matmul the forward runs. Eager attention computes the whole T × T score matrix
    (4·L·d·T² for QKᵀ and AV), where our model FLOPs count the causal half; the rest must agree exactly."""
    T = 7
    ids = torch.randint(0, V, (1, T))
    with use_adapter(lora_llama, "policy"), FlopCounterMode(display=False) as counter:
        lora_llama(ids)
    s = perf.shape(lora_llama)
    matmuls = s.forward([T], T, adapter="policy") - 2 * s.layers * s.attn_dim * T * (T + 1)
    assert counter.get_total_flops() - 4 * s.layers * s.attn_dim * T * T == matmuls


def test_backward_through_frozen_base_matches_torchs_flop_counter(lora_llama):
    """Autograd computes no weight gradient for the frozen base; its count is within 5 % of ours (ours also counts
    the input gradients of the first layer's q, k, v and its adapters, which autograd skips: the embeddings
    are frozen)."""
    T = 7
    ids = torch.randint(0, V, (1, T))
    with use_adapter(lora_llama, "policy"):
        with FlopCounterMode(display=False) as fwd:
            logits = lora_llama(ids).logits
        with FlopCounterMode(display=False) as bwd:
            logits.sum().backward()
    s = perf.shape(lora_llama)
    attention_full_minus_causal = 2 * 4 * s.layers * s.attn_dim * T * T - 4 * s.layers * s.attn_dim * T * (T + 1)
    ours = s.backward([T], T, adapter="policy") + attention_full_minus_causal  # the logits of every token
    assert bwd.get_total_flops() == pytest.approx(ours, rel=0.05)
    assert bwd.get_total_flops() < 1.2 * fwd.get_total_flops()  # not the 2× of full training


def test_generation_matmuls_match_torchs_flop_counter(lora_llama):
    """Two samples of one 5-token prompt, 4 tokens each, through the engine: the prompt is prefilled once, then each
    row feeds its first 3 sampled tokens (the 4th is never fed back), and the lm_head runs on the 4 positions each
    row samples from. FlopCounterMode sees every matmul; eager attention's (4·L·d per query and key: the 5 × 5
    prefill, then per row 1 query over 6, 7, 8 keys) is counted apart, as our causal count is."""
    from types import SimpleNamespace

    from nanorlhf.engine import generate
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=None)
    lora_llama.generation_config.eos_token_id = None  # no stop token: every response runs to max_new_tokens
    with use_adapter(lora_llama, "policy"), FlopCounterMode(display=False) as counter:
        out = generate(lora_llama, tokenizer, [[5, 6, 7, 8, 9]] * 2, max_new_tokens=4, seeds=[0, 1])
    assert out["lengths"].tolist() == [4, 4]
    s = perf.shape(lora_llama)
    attention = 4 * s.layers * s.attn_dim * (5 * 5 + 2 * (6 + 7 + 8))
    causal = 2 * s.layers * s.attn_dim * (5 * 6 + 2 * (8 * 9 - 5 * 6))
    matmuls = s.generate([5, 5], [4, 4], adapter="policy", prefill_lengths=[5]) - causal
    assert counter.get_total_flops() - attention == matmuls


def test_phases_report_tokens_rate_and_mfu():
    phases = perf.Phases(torch.device("cpu"), torch.float32)
    assert phases.peak > 1e8  # any CPU does 0.1 GFLOP/s
    with phases.time("update"):
        phases.add("update", 100, phases.peak * 0.01)
        torch.randn(256, 256) @ torch.randn(256, 256)
    m = phases.metrics()
    assert m["perf/update_tokens"] == 100
    assert m["perf/update_tokens_per_s"] == pytest.approx(100 / m["time/update"])
    assert m["perf/update_mfu"] == pytest.approx(0.01 / m["time/update"])
    assert phases.metrics() == {}  # reset for the next iteration


def test_an_iterations_passes_by_hand(monkeypatch):
    """Two sequences of 2 + 1 and 1 + 2 tokens (prompt + response) through a made-up Shape: base 10 weights, lm_head
    5, adapter 2, one layer, attention width 1. A forward of T tokens is 2·n·T + 2·T·(T + 1), a backward through
    the frozen base 2·n_frozen·T + 4·n_lora·T + 4·T·(T + 1), and the lm_head 2·5 each way on each of the 3 response
    tokens alone; tokens count once per pass."""
    policy = perf.Shape(base=10, head=5, lora={"policy": 2}, layers=1, attn_dim=1)
    batch = {"queries": torch.tensor([[7, 8], [0, 9]]), "query_mask": torch.tensor([[1, 1], [0, 1]]),
             "mask": torch.tensor([[1, 0], [1, 1]])}
    monkeypatch.setattr(perf, "peak_flops", lambda device, dtype: 1.0)  # the counts alone: no peak to measure
    phases = perf.Phases(torch.device("cpu"), torch.float32)
    phases.add_iteration(batch, policy, [(policy, True, "policy"), (policy, True, None)], [(policy, True, "policy")],
                         epochs=2)
    # generate: every token but each response's last, which is never fed, without the lm_head (n = 12, 2 positions a
    # sequence: 2·12·2 + 2·2·3 = 60) + the lm_head on the 3 positions the response tokens are sampled from
    assert phases.flops["generate"] == 2 * 60 + 2 * 5 * 3 and phases.tokens["generate"] == 6
    # score: the policy (n = 12: 96 a sequence), the reference (n = 10: 84), each with the head on 3 tokens (30)
    assert phases.flops["score"] == 2 * 96 + 30 + 2 * 84 + 30 and phases.tokens["score"] == 12
    # update, 2 epochs: forward 96 a sequence + 30, backward 2·10·3 + 4·2·3 + 4·12 = 132 a sequence + 30
    assert phases.flops["update"] == 2 * (2 * 96 + 30 + 2 * 132 + 30) and phases.tokens["update"] == 12
    # the same prompt twice (a GRPO group of 2): its prefill (1 token, n = 12: 2·12 + 2·2 = 28) runs once, then 0 and
    # 1 fed tokens (the second at position 1: 2·12 + 2·(2·3 - 1·2) = 32), and the lm_head on the 3 response tokens
    phases.add_iteration(dict(batch, queries=torch.tensor([[0, 9], [0, 9]]), query_mask=torch.tensor([[0, 1]] * 2)),
                         policy, [], [], epochs=1)
    assert phases.flops["generate"] - (2 * 60 + 2 * 5 * 3) == 28 + 32 + 2 * 5 * 3


def test_peak_memory_is_the_processs_own():
    """A child started by a parent that holds 1.5 GiB reports its own peak (VmHWM starts afresh in a new program),
    not the parent's (ru_maxrss carries it across fork and exec)."""
    big = torch.ones(1536 * 2**20 // 4)  # 1.5 GiB, touched
    parent = perf.peak_memory_gb(torch.device("cpu"))
    assert parent > 1.5
    child = subprocess.run([sys.executable, "-c", "import torch; from nanorlhf import perf; print(perf.peak_memory_gb(torch.device('cpu')))"],
                           cwd=ROOT, capture_output=True, text=True, check=True)
    assert float(child.stdout) < parent - 1.0
    del big


def test_measuring_the_peak_leaves_the_random_stream_alone(monkeypatch):
    """Phases are made after a resume restores the RNG: measuring must not draw from it."""
    monkeypatch.setattr(perf, "_PEAK", {})
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    perf.peak_flops(torch.device("cpu"), torch.float32, seconds=0.05)
    torch.testing.assert_close(torch.rand(3), expected)


def test_the_peak_is_measured_even_when_the_warm_up_outlasts_the_budget(monkeypatch):
    """On a busy machine the first matmul can take longer than `seconds`; the peak must still be a rate, never 0
    (a 0 divided every MFU by zero and crashed a demo's PPO stage after its first iteration)."""
    monkeypatch.setattr(perf, "_PEAK", {})
    peak = perf.peak_flops(torch.device("cpu"), torch.float32, seconds=0.0)
    assert peak > 1e8  # any CPU does 1024³ matmuls faster than 0.1 GFLOP/s
    phases = perf.Phases(torch.device("cpu"), torch.float32)
    with phases.time("update"):
        phases.add("update", tokens=10, flops=1e6)
    assert math.isfinite(phases.metrics()["perf/update_mfu"])
