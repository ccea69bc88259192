"""Where a step's time goes: the model FLOPs of each pass, the machine's peak matmul rate, MFU, peak memory.

MFU, model-FLOPs utilisation (Chowdhery et al. 2022, App. B; nanoGPT's `estimate_mfu`), is the FLOPs the
model's math needs divided by seconds × the peak FLOP/s of the device in the compute dtype. Padding is not
counted: it is waste, and MFU should show it. For one sequence of T real tokens, with N the weights of the
linear maps a pass runs (the frozen base's projections, the active LoRA adapter's A and B), L layers, attention
width d = heads × head_dim, and the V·H lm_head run only on the tokens whose logprob the pass needs (in RL the
response tokens; `kernels.token_logprobs` skips the others):

    forward    2·N·T + 2·L·d·T·(T+1)      the matmuls; causal attention, QKᵀ and AV over t+1 keys at position t
               + 2·V·H per token with a target
    backward   through a frozen base with LoRA: the base's matmuls need only the gradient of their input (2·N_base
               per token, not the 4 of full training), the adapters both theirs (4·N_lora), attention both
               operands (2× its forward)
    generate   as nanorlhf/engine.py runs it: the forward of each distinct prompt once (GRPO's k samples of a
               prompt share its prefill), then each response's tokens but the last fed one at a time through the
               KV cache (the last sampled token is never fed back), each attending over the tokens before it; the
               lm_head on the response (each token sampled from the position before it)

A reward model's or critic's pass has no lm_head (a 1-wide head instead, negligible).
"""
import os
import resource
import time
from dataclasses import dataclass

import torch
from torch import nn

from .lora import LoRALinear


@dataclass
class Shape:
    """The counts the FLOP estimate needs, read off a model once."""
    base: int  # weights of the base's linear maps, lm_head excluded
    head: int  # weights of the lm_head (V·H)
    lora: dict  # adapter name -> weights of its A and B matrices over every layer
    layers: int
    attn_dim: int  # heads × head_dim

    def forward(self, lengths, head_tokens=0, adapter=None):
        """FLOPs of one forward over sequences of these real lengths (an iterable of ints), `head_tokens` of their
        tokens through the lm_head."""
        n = self.base + self.lora.get(adapter, 0)
        return 2 * self.head * head_tokens + sum(2 * n * T + 2 * self.layers * self.attn_dim * T * (T + 1)
                                                 for T in lengths)

    def backward(self, lengths, head_tokens=0, adapter=None):
        """FLOPs of one backward through the frozen base and lm_head (input gradients) and the adapter (both)."""
        n_frozen, n_lora = self.base, self.lora.get(adapter, 0)
        return 2 * self.head * head_tokens + sum(
            2 * n_frozen * T + 4 * n_lora * T + 4 * self.layers * self.attn_dim * T * (T + 1) for T in lengths)

    def generate(self, prompt_lengths, response_lengths, adapter=None, prefill_lengths=None):
        """FLOPs of sampling with a KV cache: the prefill of each distinct prompt (prefill_lengths; default every
        row's own), then each row's r - 1 fed response tokens, the one at position t attending over t + 1 keys (a
        response of r tokens is sampled from the prompt's last position and r - 1 fed tokens: the last sampled one is
        never fed), and the lm_head on those r positions. Without shared prompts, the forward of p + r - 1 tokens."""
        prefill = self.forward(prompt_lengths if prefill_lengths is None else prefill_lengths, adapter=adapter)
        n = self.base + self.lora.get(adapter, 0)
        decode = sum(2 * n * (r - 1) + 2 * self.layers * self.attn_dim * ((p + r - 1) * (p + r) - p * (p + 1))
                     for p, r in zip(prompt_lengths, response_lengths))
        return prefill + decode + 2 * self.head * sum(response_lengths)


def shape(model):
    """The `Shape` of a (possibly LoRA-wrapped, possibly 4-bit) causal LM or sequence classifier."""
    cfg = model.config
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    loras = [m for m in model.modules() if isinstance(m, LoRALinear)]
    adapter_ids = {id(x) for m in loras for x in (*m.lora_A.values(), *m.lora_B.values())}
    lora = {}
    for m in loras:
        for name, A in m.lora_A.items():
            lora[name] = lora.get(name, 0) + A.weight.numel() + m.lora_B[name].weight.numel()
    base = 0
    for m in model.modules():
        if isinstance(m, nn.Linear) and m is not head and id(m) not in adapter_ids:
            base += m.in_features * m.out_features  # not numel: a 4-bit weight packs two values per byte
        elif type(m).__name__ == "Conv1D":
            base += m.weight.numel()
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return Shape(base=base, head=head.in_features * head.out_features if head is not None else 0, lora=lora,
                 layers=cfg.num_hidden_layers, attn_dim=heads * head_dim)


_PEAK = {}


def peak_flops(device, dtype, seconds=1.0):
    """This device's matmul rate in FLOP/s for `dtype`, measured once per process in about `seconds`: the best of
    repeated square matmuls (n = 1024 on a CPU, 4096 on a GPU), the denominator of MFU. Measured rather than
    looked up, so a CPU without native bf16 shows its own (lower) bf16 rate."""
    key = (str(device), dtype)
    if key not in _PEAK:
        n = 4096 if device.type == "cuda" else 1024
        g = torch.Generator(device).manual_seed(0)  # not the global stream: measuring must not change a run's samples
        a, b = (torch.randn(n, n, device=device, generator=g).to(dtype) for _ in range(2))
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        best, start = 0.0, time.perf_counter()
        a @ b  # warm-up: the first call pays for kernel selection
        while best == 0.0 or time.perf_counter() - start < seconds:  # at least one timing on a slow or busy machine
            sync()
            t0 = time.perf_counter()
            for _ in range(4):
                a @ b
            sync()
            best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
        _PEAK[key] = best
    return _PEAK[key]


class Phases:
    """Per-phase accounting of one RL iteration: `add(phase, tokens, flops)` as passes run, `time(phase)` around
    them; `metrics()` gives perf/<phase>_tokens, _tokens_per_s and _mfu for each phase, and resets."""

    def __init__(self, device, dtype):
        self.peak = peak_flops(device, dtype)
        self.tokens, self.flops, self.seconds = {}, {}, {}

    def add(self, phase, tokens, flops):
        self.tokens[phase] = self.tokens.get(phase, 0) + tokens
        self.flops[phase] = self.flops.get(phase, 0) + flops

    def time(self, phase):
        return _Timer(self, phase)

    def add_iteration(self, batch, policy, score, train, epochs):
        """One RL iteration's tokens and model FLOPs (PPO, GRPO): sampling with `policy`'s adapter "policy" (each
        distinct prompt of batch["queries"] prefilled once); the no-grad passes `score`; per epoch a forward and a
        backward of each of `train`. A pass is (Shape, with the lm_head, adapter); the lm_head runs on the response
        tokens. A sequence's tokens count once per pass, a forward with its backward being one pass. Lengths are real
        tokens, prompt and response: padding is not model work."""
        prompts, responses = batch["query_mask"].sum(1).tolist(), batch["mask"].sum(1).tolist()
        lengths = [p + r for p, r in zip(prompts, responses)]
        tokens, heads = sum(lengths), sum(responses)
        distinct = {tuple(q[m.bool()].tolist()) for q, m in zip(batch["queries"], batch["query_mask"])}
        self.add("generate", tokens, policy.generate(prompts, responses, "policy", [len(q) for q in distinct]))
        self.add("score", tokens * len(score), sum(m.forward(lengths, heads * h, a) for m, h, a in score))
        self.add("update", tokens * len(train) * epochs, epochs * sum(
            m.forward(lengths, heads * h, a) + m.backward(lengths, heads * h, a) for m, h, a in train))

    def metrics(self):
        out = {}
        for phase, s in self.seconds.items():
            out[f"time/{phase}"] = s
            out[f"perf/{phase}_tokens"] = self.tokens.get(phase, 0)
            out[f"perf/{phase}_tokens_per_s"] = self.tokens.get(phase, 0) / max(s, 1e-9)
            out[f"perf/{phase}_mfu"] = self.flops.get(phase, 0) / max(s, 1e-9) / self.peak
        self.tokens, self.flops, self.seconds = {}, {}, {}
        return out


class _Timer:
    def __init__(self, phases, phase):
        self.phases, self.phase = phases, phase

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # GPU work is asynchronous: time what ran, not what was queued
        seconds = self.phases.seconds
        seconds[self.phase] = seconds.get(self.phase, 0.0) + time.perf_counter() - self.t0


def peak_memory_gb(device):
    """Peak memory of this process alone on `device`: allocated GPU memory on CUDA, else the resident high-water
    mark (a CPU run on a machine with a GPU measures the CPU's).

    On Linux that is VmHWM from /proc/self/status, which a new program starts afresh. ru_maxrss does not: it
    survives fork and exec, so a child started by a large parent reports the parent's peak until it passes it
    (tests/test_perf.py)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if os.uname().sysname == "Darwin" else 2**20)
