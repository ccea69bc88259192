"""Generation measured in one run: the sampling engine (nanorlhf/engine.py) against the plain per-token loop nanorlhf
sampled with until 2026-12-07 (kept below as `plain_loop`, the baseline), and transformers' `generate`.

    python tests/benchmarks/bench_generate.py                        # the demo's shapes, in the demo's dtype here
    python tests/benchmarks/bench_generate.py --device cuda --shapes 64x1x64,64x1x512,32x4x512 \\
        --prompt-tokens 64,512 --random-model 1.7b                   # the GPU check (issue #36): under 5 minutes

A shape is PROMPTSxKxTOKENS: that many prompts, K samples of each, at most TOKENS new tokens. The defaults are the
demo's: a PPO rollout (32 prompts × 1 × 48) and the labeller's batch (64 prompts × 4 × 48). For each shape and
prompt length it samples the same prompts with each generator and prints sampled tokens per second (padding and
rows that already ended do not count), the median of --repeats rounds in which the generators take turns, and
the ratio to the plain loop:
  - plain loop: every row decoded until the longest ends, k copies of a prompt prefilled k times, bf16 logits from
    the model's lm_head (the labeller ran it 64 rows at a time: `--plain-batch`);
  - engine: one prefill per distinct prompt, a preallocated cache, rows leaving at their stop token, fp32 logits;
    with `--decode compiled` too where asked (on CUDA its CUDA graphs);
  - transformers: `model.generate` with a static cache and a compiled forward (`--hf`), its own sampler.
Prompts are the Alpaca demo's instructions (rendered with the chat template), or, with --prompt-tokens, random ids
of exactly that length. --random-model builds a randomly initialised Llama of a larger size (no download), whose
responses rarely end: it times long decodes.
"""
import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from nanorlhf import engine  # noqa: E402
from nanorlhf import model as M  # noqa: E402
from nanorlhf.data import load_prompts  # noqa: E402
from nanorlhf.lora import add_lora, lora_layers, use_adapter  # noqa: E402

RANDOM_MODELS = {"1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                              num_key_value_heads=32),  # SmolLM2-1.7B's shape
                 "360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                              num_key_value_heads=5)}  # SmolLM2-360M's


@torch.no_grad()
def plain_loop(model, tokenizer, prompts, max_new_tokens, temperature):
    """The loop nanorlhf sampled with until 2026-12-07: each row fed until every row has ended, transformers'
    DynamicCache (concatenated every step), the model's own lm_head on the last position. Returns sampled tokens."""
    device = next(model.parameters()).device
    queries, query_mask = engine.left_pad(prompts, tokenizer.pad_token_id, device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    input_ids, attention_mask, cache, n = queries, query_mask, None, 0
    position_ids = (query_mask.cumsum(-1) - 1).clamp(min=0)
    kw = engine.cache_keyword(model)
    for _ in range(max_new_tokens):
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                    logits_to_keep=1, **{kw: cache})
        cache = out.get(kw)
        token = engine.sample_token(out.logits[:, -1], temperature)
        n += int((~done).sum())
        done |= token == tokenizer.eos_token_id
        if done.all():
            break
        input_ids, position_ids = token[:, None], position_ids[:, -1:] + 1
        attention_mask = torch.cat([attention_mask, torch.ones_like(input_ids)], 1)
    return n


@torch.no_grad()
def hf_generate(model, tokenizer, prompts, max_new_tokens, temperature):
    """transformers' generate with a static cache and its compiled forward (what `cache_implementation="static"`
    sets up), sampling at the temperature alone. Returns sampled tokens."""
    from transformers import GenerationConfig
    device = next(model.parameters()).device
    queries, query_mask = engine.left_pad(prompts, tokenizer.pad_token_id, device)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_k=0,
                              top_p=1.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                              cache_implementation="static")
    out = model.generate(input_ids=queries, attention_mask=query_mask, generation_config=config)[:, queries.shape[1]:]
    ended = (out == tokenizer.eos_token_id).int()
    return int((ended.cumsum(1) - ended == 0).sum())  # tokens up to and including each row's first EOS


def ours(decode):
    def run(model, tokenizer, prompts, max_new_tokens, temperature):
        return int(engine.generate(model, tokenizer, prompts, max_new_tokens, temperature, decode=decode)["mask"].sum())
    return run


def timed(gens, model, tokenizer, prompts, new_tokens, repeats, sync, plain_batch):
    """{label: (median tokens/s, tokens)} of each generator over `repeats` rounds that take turns (one untimed run
    each first), so that a slow spell of the machine falls on all of them. Each run draws from the same seed."""
    def once(fn):
        batch = plain_batch if fn is plain_loop else len(prompts)
        torch.manual_seed(0)
        sync()
        start = time.perf_counter()
        n = sum(fn(model, tokenizer, prompts[i:i + batch], new_tokens, 0.7) for i in range(0, len(prompts), batch))
        sync()
        return n / (time.perf_counter() - start), n
    for _, fn in gens:
        once(fn)
    rounds = [[once(fn) for _, fn in gens] for _ in range(repeats)]  # rounds[r][g]: (tokens/s, tokens)
    return {label: (statistics.median(r[g][0] for r in rounds), rounds[0][g][1]) for g, (label, _) in enumerate(gens)}


def load(args):
    if args.random_model:
        from transformers import LlamaConfig, LlamaForCausalLM
        _, tokenizer = M.load_model(args.model, device="cpu", dtype="float32")
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096, tie_word_embeddings=True,
                             eos_token_id=tokenizer.eos_token_id, **RANDOM_MODELS[args.random_model])
        model = LlamaForCausalLM(config).to(device=M.pick_device(args.device), dtype=getattr(torch, args.dtype))
        M.set_pad_token(tokenizer, model)
        model.get_output_embeddings().register_forward_pre_hook(lambda _, a: (a[0].contiguous(), *a[1:]))
    else:
        model, tokenizer = M.load_model(args.model, device=args.device, dtype=args.dtype)
    add_lora(model, 16, 32, name="policy", verbose=False)  # as a rollout samples: through a policy adapter ...
    for i, (_, m) in enumerate(lora_layers(model)):  # ... that has moved off zero
        torch.nn.init.normal_(m.lora_B["policy"].weight, std=0.002, generator=torch.Generator().manual_seed(i))
    return model.eval(), tokenizer


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=M.DEFAULT_MODEL, help="Causal LM (default: SmolLM2-135M-Instruct).")
    p.add_argument("--random-model", choices=sorted(RANDOM_MODELS), help="Time a random Llama of this size instead "
                   "(SmolLM2's tokenizer).")
    p.add_argument("--data", default=os.path.join(ROOT, "data", "alpaca_en_demo.json"), help="Prompts.")
    p.add_argument("--device", default="cpu", help="cpu or cuda.")
    p.add_argument("--dtype", default=None, help="Compute dtype; default the demo's: bfloat16 where it is native, "
                   "else float32.")
    p.add_argument("--shapes", default="32x1x48,64x4x48", help="PROMPTSxKxTOKENS, comma-separated.")
    p.add_argument("--prompt-tokens", default="", help="Random prompts of these lengths (comma-separated) instead "
                   "of the Alpaca ones.")
    p.add_argument("--plain-batch", type=int, default=64, help="Rows per call of the plain loop when a shape has "
                   "more (the labeller's --batch-size in the demo).")
    p.add_argument("--decode", default="eager", help="Engine decode modes to time, comma-separated (eager, "
                   "compiled).")
    p.add_argument("--hf", action="store_true", help="Also time transformers' generate (static cache, compiled).")
    p.add_argument("--repeats", type=int, default=5, help="Timed rounds (each generator once a round, in turn); the "
                   "median counts.")
    args = p.parse_args()
    device = M.pick_device(args.device)
    args.dtype = args.dtype or ("bfloat16" if M.native_bf16(device) else "float32")
    model, tokenizer = load(args)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gens = [("plain loop", plain_loop)] + [(f"engine, {d}", ours(d)) for d in args.decode.split(",")]
    gens += [("transformers generate, static", hf_generate)] if args.hf else []
    name = args.random_model or args.model
    print(f"{name}, {args.dtype}, {device}, {torch.get_num_threads()} threads")
    print(f"| shape | prompt tokens | generator | tokens | tokens/s | × plain loop |\n|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        n_prompts, k, new_tokens = map(int, shape.split("x"))
        for length in [int(x) for x in args.prompt_tokens.split(",") if x] or [None]:
            if length is None:
                base = [q.ids for q in load_prompts(args.data, tokenizer, 256, limit=n_prompts)]
            else:
                g = torch.Generator().manual_seed(length)
                base = torch.randint(10, len(tokenizer) - 10, (n_prompts, length), generator=g).tolist()
            prompts = [q for q in base for _ in range(k)]  # each prompt's k samples side by side
            shown = length or round(statistics.mean(map(len, base)), 1)
            with use_adapter(model, "policy"):
                rates = timed(gens, model, tokenizer, prompts, new_tokens, args.repeats, sync, args.plain_batch)
            for label, (rate, n) in rates.items():
                print(f"| {shape} | {shown} | {label} | {n} | {rate:.1f} | {rate / rates['plain loop'][0]:.2f} |",
                      flush=True)

if __name__ == "__main__":
    main()
