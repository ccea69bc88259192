"""Will it fit? Peak GPU memory of a nanorlhf stage, from the model's config alone.

    python -m nanorlhf.memory --model 8b --stage dpo --load-in-4bit --gradient-checkpointing --batch-size 2
    python -m nanorlhf.memory --model 8b --load-in-4bit --gradient-checkpointing --all-stages
    python -m nanorlhf.memory --model 1.5b --stage grpo --rollout-batch-size 8 --num-generations 8 --max-length 256

Roughly M ≈ W + 16·P_lora + A_ckpt + A_layer + A_logits + KV: the weights, 16 bytes per trainable LoRA
parameter (fp32 weight, gradient and two AdamW moments), saved activations, the logits' share and the KV
cache of generation. Each term here counts what our
code and transformers' Llama layer really keep (checked tensor by tensor in tests/benchmarks/validate_memory.py):
weights at their bytes per parameter, LoRA with fp32 grads and optimizer state, the tensors autograd saves
for backward, the fused kernel's (chunk, V) tiles, and the KV cache. Tensors that are never alive together
are not added: the total is the static lines plus the largest of the moments a step goes through.
"""
import json
import os
from dataclasses import dataclass

from nanorlhf import cli

GiB = 2**30
F32 = 4  # LoRA weights, norms' upcast inputs, the kernel's tiles and row gradients are fp32 whatever the dtype
NF4 = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes, 8-bit absmax per 64 weights, fp32 absmax per 256 blocks: ≈0.52
TILE_BYTES = 90 * 2**20  # = kernels.TILE_BYTES (copied: the planner runs without importing torch; a test checks)
CUDA_CONTEXT, ALLOCATOR_SLACK = 0.5 * GiB, 0.10  # an allowance (no GPU here to measure): context + cache slack
_L = dict(hidden_size=0, num_hidden_layers=0, num_attention_heads=0, num_key_value_heads=0, intermediate_size=0,
          vocab_size=0, tie_word_embeddings=False)
PRESETS = {  # Llama-style configs; "7b" is Qwen2.5-7B, like 0.5b and 1.5b (Mistral-7B: pass its config.json)
    "tiny": _L | dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=49152, tie_word_embeddings=True),  # tests' tiny_llama
    "smollm2": _L | dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),  # SmolLM2-135M
    "0.5b": _L | dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                      intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),  # Qwen2.5-0.5B
    "1.5b": _L | dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                      intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),  # Qwen2.5-1.5B
    "7b": _L | dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                    intermediate_size=18944, vocab_size=152064),  # Qwen2.5-7B
    "8b": _L | dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    intermediate_size=14336, vocab_size=128256),  # Llama-3-8B
}
STAGES = ("sft", "rm", "dpo", "kto", "ppo", "grpo")
RL = ("ppo", "grpo")  # sample from the policy: prompt + response lengths, reward models, a KV cache


def load_config(model):
    """A preset name, a config.json, or a model folder holding one."""
    if model in PRESETS:
        return dict(PRESETS[model])
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    if not os.path.isfile(path):
        raise cli.UserError(f"--model {model}: not a preset ({', '.join(PRESETS)}), config.json or model folder")
    with open(path) as f:
        cfg = json.load(f)
    if any(k not in cfg for k in list(_L)[:-1]):
        raise cli.UserError(f"--model {model}: needs a Llama-style config (hidden_size, num_hidden_layers, ...)")
    return cfg


def _dims(cfg):
    H, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    d = cfg.get("head_dim") or H // nh
    return H, cfg["num_hidden_layers"], nh * d, cfg["num_key_value_heads"] * d, cfg["intermediate_size"], \
        cfg["vocab_size"], nh


def weight_bytes(cfg, s, bits=16, lm_head=True):
    """Base weights: linears at nf4/int8/s bytes; embeddings, lm_head and norms stay in the compute dtype."""
    H, L, qd, kvd, I, V, _ = _dims(cfg)
    linear = L * (2 * H * qd + 2 * H * kvd + 3 * H * I)
    other = V * H * (1 + (lm_head and not cfg.get("tie_word_embeddings"))) + (2 * L + 1) * H
    if bits == 4:
        return linear * NF4 + other * s
    if bits == 8:  # int8 codes + one fp32 scale per output row (LLM.int8)
        return linear + 4 * L * (qd + 2 * kvd + 2 * H + 2 * I) + other * s
    return (linear + other) * s


def lora_params(cfg, r):
    """r · L · Σ(in + out) over q, k, v, o, gate, up, down (lora.DEFAULT_TARGETS)."""
    H, L, qd, kvd, I, _, _ = _dims(cfg)
    return r * L * (7 * H + 2 * qd + 2 * kvd + 3 * I)


def layer_saved(cfg, s, T, lora=True, bits=16, padded=True):
    """Bytes per token one decoder layer saves for backward (transformers' LlamaDecoderLayer with SDPA)."""
    H, L, qd, kvd, I, V, nh = _dims(cfg)
    norms = 2 * (F32 * H + F32)  # RMSNorm upcasts its input to fp32 and saves it, plus 1/rms
    # SDPA saves q, k, v, output and logsumexp. With a padding mask transformers repeats k, v to all heads
    # (repeat_kv) and SDPA saves its own float copy of the (B, 1, T, T) mask in every layer.
    kv = qd if padded else kvd
    attn = s * (2 * qd + 2 * kv) + F32 * nh + (s * T if padded else 0)
    mlp = 3 * s * I  # gate (SiLU's input), SiLU(gate) and up (the product's inputs)
    if not lora:  # full fine-tuning: linears save their inputs, norms their normalised output
        return norms + attn + mlp + s * (2 * H + I) + 2 * s * H
    # LoRA's A saves its fp32 input and the (N, r) output feeds B. In fp32 q/k/v share one input, gate/up
    # another and o reads SDPA's output; in 16 bits each LoRALinear makes its own fp32 copy (lora.py casts x).
    r = lora
    inputs = F32 * (2 * H + I) if s == F32 else F32 * (5 * H + qd + I)
    int8 = s * (2 * H + I) if bits == 8 and s != F32 else 0  # bnb's int8 matmul keeps its input; nf4 does not
    return norms + attn + mlp + 7 * F32 * r + inputs + int8


def work_bytes(cfg, s, lora, grad):
    """Bytes per token of one layer's temporaries: a no-grad forward (its MLP's widest moment), or a backward
    (dx of down_proj, then d SiLU and d up while it is alive)."""
    H, L, qd, kvd, I, V, nh = _dims(cfg)
    if grad:
        return (2 * s + (F32 if lora and s != F32 else 0)) * I + 2 * F32 * H
    return (2 * s + 2 * F32) * I if lora else 3 * s * I  # LoRA adds its fp32 B output and scaled copy


def chunk_rows(n_tokens, V):
    """Rows of the kernel's (chunk, V) fp32 tiles: kernels.chunk_rows (balanced chunks of <= TILE_BYTES)."""
    n_chunks = -(-n_tokens // max(16, TILE_BYTES // (4 * V) // 16 * 16))
    return -(-n_tokens // n_chunks)


def kernel_bytes(cfg, N, s, tiles):
    """Fused logprob kernel: `tiles` (chunk, V) fp32 tiles + the fp32 copy of a 16-bit lm_head (weight.float())."""
    H, V, chunk = cfg["hidden_size"], cfg["vocab_size"], chunk_rows(N, cfg["vocab_size"])
    return tiles * chunk * V * F32 + (V * H * F32 + chunk * H * F32 if s != F32 else 0)


def activation_bytes(cfg, s, N, T, lora=16, bits=16, padded=True, checkpointing=False):
    """What one forward of N tokens (rows of T) saves for backward: every layer's tensors, or with gradient
    checkpointing only each layer's input; plus the final norm's fp32 input."""
    H, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    if checkpointing:
        return N * (L * s * H + F32 * (H + 1))
    first_norm = F32 * (H + 1) if lora else 0  # layer 0's input norm sees frozen embeddings: saves nothing
    return N * (L * layer_saved(cfg, s, T, lora, bits, padded) - first_norm + F32 * (H + 1))


def kv_cache_bytes(cfg, s, tokens):
    """K and V of every layer: 2 tensors × L layers × kv_dim × bytes per value, per token (4·L·kv_dim in bf16)."""
    H, L, qd, kvd, *_ = _dims(cfg)
    return 2 * L * kvd * s * tokens


class Breakdown(dict):
    """component -> bytes; `notes` says what each line holds, `peak` which moment of the step is the peak."""
    notes: dict
    peak: str


def estimate(cfg, stage, *, load_in_4bit=False, load_in_8bit=False, lora_r=16, batch_size=4, max_length=512,
             max_new_tokens=64, rollout_batch_size=16, num_generations=4, gradient_checkpointing=False,
             optim="adamw", dtype="bf16", device="cuda", reward_models=1, critic="adapter", critic_from_rm=False,
             precompute_ref=False, padded=True, nproc=1, score_batch_size=None):
    """Peak memory of `stage` as a Breakdown (component -> bytes, plus "total"). Lengths as the scripts take them:
    --max-length bounds prompt+response, except for PPO and GRPO where it bounds the prompt (+ --max-new-tokens).
    GRPO is PPO without the critic (no value adapter, head or passes), sampling num_generations per prompt; PPO's
    --critic head is a value head alone on the reference pass's hidden states, which it keeps for the update.
    Per rank under torchrun (nproc > 1): the same, plus the flat fp32 buffer dist.all_sum_grads reduces.
    PPO and GRPO score each rollout in no-grad forwards of score_batch_size rows (default batch_size)."""
    H, L, qd, kvd, I, V, nh = _dims(cfg)
    s, bits = {"fp32": 4, "bf16": 2, "fp16": 2}[dtype], 4 if load_in_4bit else 8 if load_in_8bit else 16
    lora = lora_r or False
    if not lora and (bits < 16 or stage in RL):  # RL's reference is the base with adapters off
        raise cli.UserError("--lora-r 0 (full fine-tuning) needs a 16-bit base and is not offered by PPO or GRPO")
    b, n = Breakdown(), {}
    b["weights"] = weight_bytes(cfg, s, bits, lm_head=stage != "rm")  # a reward model has a score head instead
    n["weights"] = f"{'nf4 %.3f B/param' % NF4 if bits == 4 else 'int8' if bits == 8 else dtype} linears" + (
        f"; embeddings/lm_head {dtype}" if bits < 16 else "")
    state = 4 + (8 if optim == "adamw" else 2)  # fp32 grad + two Adam moments (1 byte each with adamw8bit)
    if lora:
        adapters = 2 if stage == "ppo" and critic == "adapter" else 1  # PPO's value adapter
        P = lora_params(cfg, lora_r) * adapters + (H + 1) * (stage in ("rm", "ppo"))
        b["lora"], n["lora"] = P * (4 + state), f"{P / 1e6:.1f}M fp32 params × {4 + state} B (weight, grad, AdamW)"
    else:
        P = b["weights"] / s
        b["lora"], n["lora"] = P * (s + (2 * s if optim == "adamw" else 2)), "full fine-tuning: grads + AdamW"
    b["allreduce"] = P * F32 if nproc > 1 else 0
    n["allreduce"] = f"{nproc} ranks: one flat fp32 copy of the trainable grads" if nproc > 1 else "one process"
    ref_copy = not lora and (stage == "kto" or stage == "dpo" and not precompute_ref)
    b["reference"] = b["weights"] if ref_copy else 0
    n["reference"] = "frozen copy (full fine-tuning)" if ref_copy else "none: adapters disabled (or precomputed)"
    if stage in RL:
        rm = weight_bytes(cfg, s, bits, lm_head=False)  # reward models like the policy, frozen, no lm_head
        b["reward_model"], n["reward_model"] = reward_models * rm, f"{reward_models} × frozen, same size/bits"
    if stage == "ppo":
        features = rollout_batch_size * max_new_tokens * H * s  # --critic head: (B, R, H) reference hidden states
        b["critic"] = rm if critic_from_rm else features if critic == "head" else 0
        n["critic"] = ("2nd base from --rm (--critic-from-rm)" if critic_from_rm else "value adapter on policy base"
                       if critic == "adapter" else "--critic head: the rollout's reference hidden states")

    # A step's moments; the peak is the largest. Each forward with grad sees N tokens (RM and DPO stack the
    # chosen and rejected rows; the RM runs each prompt once, then both replies under a mask that reaches the cached
    # prompt: always a mask, nanorlhf/prefix.py); what it saves lives until backward, temporaries only at their moment.
    T = max_length + (max_new_tokens if stage in RL else 0)
    N = batch_size * T * (2 if stage in ("rm", "dpo") else 1)
    masked = padded or stage == "rm"
    dense = I * H * s if bits < 16 else 0  # bnb dequantises one linear's weight per matmul
    saved = activation_bytes(cfg, s, N, T, lora, bits, masked, gradient_checkpointing)
    recompute = N * layer_saved(cfg, s, T, lora, bits, masked) if gradient_checkpointing else 0
    entropy, kernel = stage in RL, stage != "rm"  # RL asks for entropy: one more row gradient and tile
    rows = N * (F32 * H * (1 + entropy) if lora else s * H + 8) * kernel
    bwd = N * work_bytes(cfg, s, lora, True) + dense + recompute
    if not lora and kernel:  # a trainable lm_head: backward recomputes tiles and holds an fp32 weight grad
        bwd += kernel_bytes(cfg, N, s, 2) + V * H * F32 + N * H * F32
    moments = {"end of forward (kernel tiles)": (saved, kernel * kernel_bytes(cfg, N, s, 2 + entropy if lora else 1)),
               "backward" + (" (1 layer recomputed)" if recompute else ""): (saved, bwd)}
    if stage == "kto" or stage == "dpo" and not precompute_ref:  # KTO's z0 pairs run the reference anyway
        moments["reference forward (no grad)"] = (saved, N * work_bytes(cfg, s, False, False) + dense
                                                  + kernel_bytes(cfg, N, s, 1))
    # RL's scoring passes (old and reference logprobs, values) end before the update and save nothing: one layer's
    # temporaries and the kernel's one tile (without grad it needs no gradient tiles; entropy comes from the same
    # tile), over --score-batch-size rows, which can be many more than the update's.
    score = "scoring forward (no grad)"
    if stage in RL:
        S = (score_batch_size or batch_size) * T
        moments[score] = (0, S * work_bytes(cfg, s, lora, False) + dense + kernel_bytes(cfg, S, s, 1))
    if stage == "ppo" and critic == "adapter":  # the critic's forward adds its activations and value-head input
        moments["critic forward + backward"] = (2 * saved + N * F32 * H, bwd)
    b.peak = max(moments, key=lambda k: sum(moments[k]) + rows * (k != score))  # no row gradients without grad
    rows *= b.peak != score
    b["activations"], b["row_grads"], b["transient"] = moments[b.peak][0], rows, moments[b.peak][1]
    if b.peak == score:
        n["activations"] = f"none: no grad; {S} tokens scored per forward (--score-batch-size)"
    else:
        n["activations"] = f"{N} tokens{' × 2 (policy, critic)' if 'critic' in b.peak else ''}: " + (
            "each layer's input (checkpointing)" if gradient_checkpointing else "saved by every layer")
    n["row_grads"] = ("kernel's (N, H) fp32 dlogp/dh" + (" + dentropy/dh" if entropy else "")) if rows else "-"
    n["transient"] = f"at {b.peak}"
    peak = b["activations"] + rows + b["transient"]
    if stage in RL:  # generation (nanorlhf/engine.py): a no-grad prefill of the distinct prompts, then decoding into
        # every sequence's preallocated KV cache beside the fp32 copy of a 16-bit lm_head and the sampler's row tiles
        # (fp32 logits and probabilities, a float64 CDF)
        seqs = rollout_batch_size * (num_generations if stage == "grpo" else 1)  # GRPO samples each prompt k times
        prefill = (rollout_batch_size * max_length * (work_bytes(cfg, s, lora, False) + s * max_length * padded)
                   + kv_cache_bytes(cfg, s, rollout_batch_size * max_length))
        decode = (kv_cache_bytes(cfg, s, seqs * T) + (V * H * F32 if s != F32 else 0)
                  + chunk_rows(seqs, V) * V * 4 * F32)
        b["kv_cache"] = max(prefill, decode) + dense
        n["kv_cache"] = f"generation, {seqs} × {T} tokens: " + (
            "the peak" if b["kv_cache"] > peak else "not at the peak (KV is freed before training)")
        if b["kv_cache"] > peak:
            peak, b.peak = b["kv_cache"], "generation"
    static = sum(v for k, v in b.items() if k in ("weights", "lora", "allreduce", "reference", "reward_model",
                                                  "critic"))
    b["overhead"] = CUDA_CONTEXT + ALLOCATOR_SLACK * peak if device == "cuda" else 0
    n["overhead"] = "CUDA context + 10% allocator slack" if device == "cuda" else "none: CPU tensor bytes only"
    b["total"], b.notes = static + peak + b["overhead"], n
    return b


def suggest(cfg, stage, gpu_gb, **kw):
    """The first settings that fit, trying in turn: gradient checkpointing (it frees the most, for ~30% more
    time), the largest --batch-size, shorter sequences, and for PPO and GRPO fewer prompts per rollout (the KV
    cache) and, when it exceeds the batch tried, a --score-batch-size brought down to it."""
    bs, length, rollout = kw.get("batch_size", 4), kw.get("max_length", 512), kw.get("rollout_batch_size", 16)
    score = kw.get("score_batch_size")
    for t in (length, length // 2, length // 4):
        for b in range(bs, 0, -1):
            for r in (rollout, rollout // 2, rollout // 4, 1) if stage in RL else [rollout]:
                for sb in [score, b] if stage in RL and score and score > b else [score]:
                    k = dict(gradient_checkpointing=True, batch_size=b, max_length=t, rollout_batch_size=r,
                             score_batch_size=sb)
                    if t and r and estimate(cfg, stage, **(kw | k))["total"] <= gpu_gb * GiB:
                        flags = ["gradient_checkpointing", "batch_size", "max_length"]  # the flags the stage takes
                        flags += ["rollout_batch_size"] * (stage in RL) + ["score_batch_size"] * (sb != score)
                        return {x: k[x] for x in flags}
    return None


def table(cfg, stage, gpu_gb, **kw):
    b = estimate(cfg, stage, **kw)
    lines = [f"{stage:<5}{'component':<14}{'GiB':>7}  what"]
    lines += [f"{'':<5}{k:<14}{v / GiB:7.2f}  {b.notes[k]}" for k, v in b.items() if k != "total"]
    fit = b["total"] <= gpu_gb * GiB
    lines.append(f"{'':<5}{'total':<14}{b['total'] / GiB:7.2f}  peak at {b.peak}; fits in {gpu_gb:g} GiB: "
                 f"{'yes' if fit else 'no'}")
    if not fit:
        k = suggest(cfg, stage, gpu_gb, **kw)
        flags = k and " ".join(f"--{x.replace('_', '-')}" + ("" if v is True else f" {v}") for x, v in k.items())
        lines.append(f"{'':<5}suggestion: {flags} ({estimate(cfg, stage, **(kw | k))['total'] / GiB:.2f} GiB)" if k
                     else f"{'':<5}suggestion: nothing fits; try --load-in-4bit, a smaller model or a bigger GPU")
    return "\n".join(lines)


@dataclass
class Args:
    model: str = cli.arg("8b", f"A preset ({', '.join(PRESETS)}), a config.json or a model folder.")
    stage: str = cli.arg("sft", "The stage to plan.", choices=list(STAGES))
    all_stages: bool = cli.arg(False, "Plan every stage with the same settings.")
    load_in_4bit: bool = cli.arg(False, "NF4 base (QLoRA).")
    load_in_8bit: bool = cli.arg(False, "int8 base.")
    lora_r: int = cli.arg(16, "LoRA rank; 0 = full fine-tuning.", ge=0)
    batch_size: int = cli.arg(4, "Sequences per forward (DPO and RM run 2× as many rows: chosen + rejected).", gt=0)
    max_length: int = cli.arg(512, "Tokens per sequence (PPO, GRPO: per prompt, plus --max-new-tokens).", gt=0)
    max_new_tokens: int = cli.arg(64, "PPO, GRPO response length.", gt=0)
    rollout_batch_size: int = cli.arg(16, "PPO, GRPO prompts generated at once (KV cache).", gt=0)
    score_batch_size: int | None = cli.arg(None, "PPO, GRPO rows per no-grad scoring forward; default --batch-size.",
                                           gt=0)
    num_generations: int = cli.arg(4, "GRPO responses per prompt, all generated at once (KV cache).", ge=2)
    gradient_checkpointing: bool = cli.arg(False, "Keep only each layer's input; recompute one layer in backward.")
    optim: str = cli.arg("adamw", "AdamW state: 8 B/param, or 2 with adamw8bit.", choices=["adamw", "adamw8bit"])
    dtype: str = cli.arg("bf16", "Compute dtype (fp32 to compare with a CPU run).", choices=["bf16", "fp16", "fp32"])
    device: str = cli.arg("cuda", "cuda adds the CUDA context and allocator slack; cpu counts tensors only.",
                          choices=["cuda", "cpu"])
    gpu_gb: float = cli.arg(24.0, "GPU memory in GiB.", gt=0)
    reward_models: int = cli.arg(1, "PPO, GRPO: frozen reward models (same architecture and bits as --model); "
                                 "0 for a Python reward.", ge=0)
    critic: str = cli.arg("adapter", "PPO's --critic: a value adapter of its own, or a value head alone on the "
                          "reference pass's hidden states.", choices=["adapter", "head"])
    critic_from_rm: bool = cli.arg(False, "PPO: the critic is a second base loaded from the reward model.")
    precompute_ref: bool = cli.arg(False, "DPO/KTO --precompute-ref.")
    padding: bool = cli.arg(True, "Batches hold padding (the usual case; --no-padding for equal-length rows).")
    nproc: int = cli.arg(1, "Processes under torchrun (--nproc_per_node); the plan is per rank: --batch-size and "
                         "--rollout-batch-size are per rank, as the scripts take them.", gt=0)


def run(args):
    if args.load_in_4bit and args.load_in_8bit:
        raise cli.UserError("--load-in-4bit and --load-in-8bit: pick one")
    cfg = load_config(args.model)
    kw = {k: v for k, v in vars(args).items() if k not in ("model", "stage", "all_stages", "gpu_gb", "padding")}
    kw["padded"] = args.padding
    H, L, *_ = _dims(cfg)
    print(f"{args.model}: {L} layers, hidden {H}, vocab {cfg['vocab_size']}; dtype {args.dtype}, "
          f"{'nf4' if args.load_in_4bit else 'int8' if args.load_in_8bit else '16-bit'} base, LoRA r={args.lora_r}, "
          f"batch {args.batch_size} × {args.max_length} tokens, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}")
    for stage in STAGES if args.all_stages else [args.stage]:
        print(table(cfg, stage, args.gpu_gb, **kw))


def main(argv=None):
    return cli.main(run, Args, argv)


if __name__ == "__main__":
    main()
