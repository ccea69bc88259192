"""LoRA (Hu et al. 2021) over nn.Linear, GPT-2's Conv1D and bitsandbytes 4/8-bit bases (QLoRA, Dettmers et al. 2023).

One layer holds several named adapters (e.g. `policy` and `value` for PPO). `use_adapter(model, name)`
selects one; `use_adapter(model, None)` disables them all, which turns the model back into its frozen
base: the reference policy costs no second copy of the weights.

Gradient checkpointing recomputes forwards during backward, possibly after `use_adapter` has
switched adapters; `adapter_context_fn` replays the adapter of the original forward.
"""
import json
import math
import os
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

# Every linear projection of attention and MLP: Llama/Qwen/Mistral names, then GPT-2's Conv1D names.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "c_attn", "c_proj", "c_fc")


def _is_conv1d(layer):
    return type(layer).__name__ == "Conv1D"  # transformers.pytorch_utils.Conv1D: y = x @ W + b, W is (in, out)


@torch.no_grad()
def dense_weight(layer, chunk=1024):
    """The layer's weight as a float tensor in (out, in) layout, dequantised for bitsandbytes bases.

    A bitsandbytes weight is read back from the layer's own forward, W[:, i] = layer(e_i) - b, a
    chunk of identity rows at a time, never decoded from the tensors in memory. Their layout is
    private to each backend and changes under us: bitsandbytes 0.50 repacks a 4-bit weight in place
    at its first CPU inference on AVX512-BF16 machines, after which decoding the stored bytes gives
    garbage (and its own inverse loses the block order of non-nested scales). The forward is the one
    thing every backend must keep right, and it is what the trained model computed, in its compute
    dtype, so merging matches the quantised model on every backend, layout and bitsandbytes version.
    """
    if type(layer.weight).__name__ not in ("Params4bit", "Int8Params"):
        w = layer.weight.detach().float()
        return w.T if _is_conv1d(layer) else w
    dtype = getattr(layer, "compute_dtype", None) or torch.float32
    device = layer.weight.device
    was_training = layer.training
    layer.train()  # an inference-mode call is what makes bitsandbytes repack; reading must not change the layer
    try:
        cols = []
        for i in range(0, layer.in_features, chunk):
            n = min(chunk, layer.in_features - i)
            eye = torch.eye(n, layer.in_features, device=device, dtype=dtype).roll(i, 1)  # (n, in): rows e_i .. e_i+n-1
            cols.append(layer(eye).float())                                                # (n, out) = W[:, i:i+n].T + b
    finally:
        layer.train(was_training)
    bias = layer.bias.detach().float() if layer.bias is not None else 0.0
    return (torch.cat(cols) - bias).T.contiguous()


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) · B A dropout(x) for the active adapter (Hu et al. 2021, eq. 3)."""

    def __init__(self, base):
        super().__init__()
        self.base = base
        if _is_conv1d(base):
            self.in_features, self.out_features = base.weight.shape
        else:
            self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A, self.lora_B, self.lora_dropout = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.scaling, self.active = {}, None

    def add(self, name, r, alpha, dropout=0.0):
        # LoRA parameters are fp32 whatever the base dtype: they are what the optimizer updates.
        device = next(self.base.parameters()).device
        A = nn.Linear(self.in_features, r, bias=False, device=device)
        B = nn.Linear(r, self.out_features, bias=False, device=device)
        nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))  # as nn.Linear; with B = 0 the adapter starts as a no-op
        nn.init.zeros_(B.weight)
        self.lora_A[name], self.lora_B[name] = A, B
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = alpha / r

    def delta(self, name):
        """(out, in) fp32 update scale · B @ A that merging adds to the base weight."""
        return self.scaling[name] * (self.lora_B[name].weight @ self.lora_A[name].weight).float()

    def forward(self, x):
        y = self.base(x)
        name = self.active
        if name is None or name not in self.lora_A:
            return y
        A, B = self.lora_A[name], self.lora_B[name]
        # The scale multiplies the r-wide A x, not the out-wide B A x: the same product, a fraction of the work
        return y + B(A(self.lora_dropout[name](x.to(A.weight.dtype))) * self.scaling[name]).to(y.dtype)


def lora_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def add_lora(model, r, alpha, targets=None, name="default", dropout=0.0, verbose=True):
    """Freeze the model and add adapter `name` to every target projection. Returns (trainable, total) counts."""
    targets = set(targets or DEFAULT_TARGETS)
    for param_name, p in model.named_parameters():
        if ".lora_" not in param_name:  # the base is frozen; adapters added earlier keep training
            p.requires_grad_(False)
    for path, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and (isinstance(child, nn.Linear) or _is_conv1d(child)):
                wrapped = LoRALinear(child)
                setattr(module, child_name, wrapped)
    layers = [m for path, m in lora_layers(model) if path.rsplit(".", 1)[-1] in targets]
    if not layers:
        raise ValueError(f"no layer of {type(model).__name__} matches LoRA targets {sorted(targets)}")
    for layer in layers:
        layer.add(name, r, alpha, dropout)
        if layer.active is None:
            layer.active = name
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # A Params4bit packs two 4-bit values per byte; count logical parameters.
    total = sum(p.numel() * (2 if type(p).__name__ == "Params4bit" else 1) for p in model.parameters())
    if verbose:
        print(f"LoRA '{name}': r={r} alpha={alpha} on {len(layers)} layers; trainable {trainable:,} of {total:,} "
              f"parameters ({100 * trainable / total:.2f}%)")
    return trainable, total


@contextmanager
def use_adapter(model, name):
    """Run with adapter `name` active; `None` disables every adapter (the frozen base = the reference)."""
    layers = [m for _, m in lora_layers(model)]
    previous = [m.active for m in layers]
    for m in layers:
        m.active = name
    try:
        yield model
    finally:
        for m, p in zip(layers, previous):
            m.active = p


def adapter_context_fn(model):
    """A torch.utils.checkpoint `context_fn`: the recompute runs with the adapters active at forward time."""
    def context_fn():
        layers = [m for _, m in lora_layers(model)]
        active = [m.active for m in layers]

        @contextmanager
        def replay():
            previous = [m.active for m in layers]
            for m, a in zip(layers, active):
                m.active = a
            try:
                yield
            finally:
                for m, p in zip(layers, previous):
                    m.active = p
        return nullcontext(), replay()
    return context_fn


def merged_state_dict(model, name="default", dtype=None):
    """The base model's state dict with adapter `name` folded in and 4/8-bit weights dequantised."""
    out, skip = {}, set()
    for path, m in model.named_modules():
        prefix = path + "." if path else ""
        if isinstance(m, LoRALinear):
            w = dense_weight(m.base) + (m.delta(name) if name in m.lora_A else 0)
            out[prefix + "weight"] = w.T if _is_conv1d(m.base) else w
            if m.base.bias is not None:
                out[prefix + "bias"] = m.base.bias.detach()
            skip.add(prefix)
        elif type(getattr(m, "weight", None)).__name__ in ("Params4bit", "Int8Params"):
            out[prefix + "weight"] = dense_weight(m)
            if m.bias is not None:
                out[prefix + "bias"] = m.bias.detach()
            skip.add(prefix)
    # Parameters and buffers, not model.state_dict(): saving a bitsandbytes layer unpacks a repacked weight in place,
    # and its inverse scrambles non-nested 4-bit scales (bitsandbytes 0.50), so merging would corrupt the model.
    tensors = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    for key, t in tensors.items():
        if not any(key.startswith(s) for s in skip) and key not in out:
            out[key] = t
    dtype = dtype or _compute_dtype(model)
    return {k: (v.to(dtype) if v.is_floating_point() else v).detach().clone() for k, v in out.items()}


def _compute_dtype(model):
    return getattr(model.config, "dtype", None) or torch.float32


def merge(model, name="default"):
    """A new plain transformers model (same class, no LoRA, no quantisation) with adapter `name` merged."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = _compute_dtype(model)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    config.dtype = dtype
    with torch.device("meta"):
        merged = type(model)(config)
    merged.load_state_dict(merged_state_dict(model, name, dtype), assign=True, strict=False)
    merged.tie_weights()
    for path, buf in list(merged.named_buffers()):  # non-persistent buffers (e.g. RoPE inv_freq) are not in state dicts
        if buf.is_meta:
            owner, _, leaf = path.rpartition(".")
            merged.get_submodule(owner)._buffers[leaf] = model.get_buffer(path).clone()
    missing = [n for n, p in merged.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"merge left parameters unset: {missing[:5]}")
    return merged.eval()


def save_adapter(model, path, name="default", base_model=None, modules_to_save=()):
    """Write adapter `name` in PEFT's format (adapter_config.json + adapter_model.safetensors).

    `modules_to_save`: submodules trained whole (a reward model's `score` head), stored as PEFT does."""
    from safetensors.torch import save_file
    layers = [(p, m) for p, m in lora_layers(model) if name in m.lora_A]
    tensors, targets = {}, set()
    for path_, m in layers:
        key = f"base_model.model.{path_}"
        tensors[key + ".lora_A.weight"] = m.lora_A[name].weight.detach().contiguous()
        tensors[key + ".lora_B.weight"] = m.lora_B[name].weight.detach().contiguous()
        targets.add(path_.rsplit(".", 1)[-1])
    for module in modules_to_save:
        for key, t in model.get_submodule(module).state_dict().items():
            tensors[f"base_model.model.{module}.{key}"] = t.detach().contiguous()
    seq_cls = type(model).__name__.endswith("ForSequenceClassification")
    first = layers[0][1]
    r = first.lora_A[name].weight.shape[0]
    dropout = first.lora_dropout[name]
    config = {
        "peft_type": "LORA", "task_type": "SEQ_CLS" if seq_cls else "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": first.scaling[name] * r, "lora_dropout": getattr(dropout, "p", 0.0),
        "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": _is_conv1d(first.base),
        "inference_mode": True, "modules_to_save": list(modules_to_save) or None, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False,
    }
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def load_adapter(model, path, name="default"):
    """Add adapter `name` from a PEFT-format folder (ours or PEFT's) to `model`."""
    from safetensors.torch import load_file
    with open(os.path.join(path, "adapter_config.json")) as f:
        config = json.load(f)
    add_lora(model, config["r"], config["lora_alpha"], config["target_modules"], name, verbose=False)
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    for path_, m in lora_layers(model):
        key = f"base_model.model.{path_}"
        if key + ".lora_A.weight" in tensors:
            m.lora_A[name].weight.data.copy_(tensors.pop(key + ".lora_A.weight"))
            m.lora_B[name].weight.data.copy_(tensors.pop(key + ".lora_B.weight"))
    for module in config.get("modules_to_save") or []:  # PEFT's SEQ_CLS also lists "classifier": skip absent ones
        if hasattr(model, module):
            for key, t in model.get_submodule(module).state_dict().items():
                t.copy_(tensors.pop(f"base_model.model.{module}.{key}", t))
    if tensors:
        raise ValueError(f"{path}: adapter tensors match no layer of the model: {sorted(tensors)[:3]}")
