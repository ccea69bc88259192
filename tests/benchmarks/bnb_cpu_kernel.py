"""What bitsandbytes' AVX512-BF16 CPU kernel does to QLoRA training, measured on SmolLM2 with a 4-bit base.

    python tests/benchmarks/bnb_cpu_kernel.py            # needs a CPU with AVX512-BF16 to show the effect

bitsandbytes 0.50 repacks a 4-bit layer at its first inference on such CPUs and runs a bf16 kernel from
then on, which passes no gradient to its input. nanorlhf's loader keeps every layer on the training kernel
(model.one_4bit_path). For both settings this prints, after one PPO-style generation: how many layers were
repacked, the first update's largest |ratio - 1|, the LoRA gradient's norm, and the cosine between the two
gradients; then the time to sample 16 prompts x 32 tokens with each kernel (interleaved repeats).
"""
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from nanorlhf.rollout import response_logprobs, sample  # noqa: E402
from nanorlhf import model as M  # noqa: E402
from nanorlhf.data import render_prompt  # noqa: E402
from nanorlhf.engine import generate  # noqa: E402
from nanorlhf.lora import add_lora, lora_layers  # noqa: E402

warnings.filterwarnings("ignore")


def load(repack):
    """SmolLM2 in 4-bit with a random `policy` adapter; repack=True gives bitsandbytes its way back."""
    model, tok = M.load_model("smollm2", load_in_4bit=True)
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = repack
    torch.manual_seed(0)
    add_lora(model, 8, 16, name="policy", verbose=False)
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B["policy"].weight, std=0.02)
    return model.train(), tok


def prompts(tok, n):
    return [render_prompt(tok, [{"role": "user", "content": f"Write a short poem about the number {i}."}])
            for i in range(n)]


def gradient_after_generation(repack):
    model, tok = load(repack)
    max_new_tokens, temperature = 16, 0.7
    torch.manual_seed(1)
    data, _, _ = sample(model, tok, prompts(tok, 4), max_new_tokens, temperature)
    with torch.no_grad():
        old = response_logprobs(model, data, temperature)
    new = response_logprobs(model, data, temperature)
    ratio = torch.exp(new.detach() - old)[data["mask"].bool()]
    (-(new * data["mask"]).sum()).backward()
    grad = torch.cat([layer.lora_A["policy"].weight.grad.flatten() for _, layer in lora_layers(model)])
    packed = sum(bool(getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False))
                 for m in model.modules() if type(getattr(m, "weight", None)).__name__ == "Params4bit")
    print(f"repack={repack}: layers repacked {packed}, max |ratio - 1| {(ratio - 1).abs().max().item():.2e}, "
          f"|grad| {grad.norm().item():.4g}")
    return grad


def main():
    import bitsandbytes.functional as bnbf
    print(f"CPU has AVX512-BF16: {bool(bnbf.has_avx512bf16())}")
    bnb_way, ours = gradient_after_generation(True), gradient_after_generation(False)
    cos = torch.nn.functional.cosine_similarity(bnb_way, ours, dim=0).item()
    print(f"cosine(gradient with bitsandbytes' repack, gradient on the training kernel) = {cos:.3f}")
    times = {True: [], False: []}
    for repack in (False, True, False, True):
        model, tok = load(repack)
        qs = prompts(tok, 16)
        generate(model, tok, qs[:2], 4, 0.7)  # the first inference is where bitsandbytes repacks
        t = time.perf_counter()
        generate(model, tok, qs, 32, 0.7)
        times[repack].append(time.perf_counter() - t)
    print(f"sampling 16 x 32 tokens: training kernel {times[False]} s, bf16 kernel {times[True]} s, ratio "
          f"{min(times[False]) / min(times[True]):.2f}")


if __name__ == "__main__":
    main()
