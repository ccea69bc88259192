"""What a rollout's generation costs, measured in one run: our decoding loop against transformers' `generate`, and the
two CPU pathologies the loop and `load_model` avoid.

    python tests/benchmarks/bench_generate.py --dtype bfloat16 --rows 32 --new-tokens 48

With the demo's settings (SmolLM2-135M, a rank-16 LoRA policy adapter, 32 prompts of the Alpaca demo data, 48 new
tokens at temperature 0.7) it times:
  - the lm_head on the last position at a prefill, as transformers slices it (a non-contiguous (B, 1, H) view of a
    frozen weight's input), against the same rows made contiguous, which `load_model`'s hook does;
  - one draw per row from the (B, V) softmax: `torch.multinomial` (an exponential per vocabulary entry) against
    `sample_token` (one uniform per row and the CDF);
  - a whole response batch, per decoding step (prefill included): `model.generate` (which draws with
    torch.multinomial) against `nanorlhf.model.generate`, both with the adapter active, and ours with every adapter
    off (what LoRA adds to decoding).
Each line prints its ratio to the line it is compared with.
"""
import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from nanorlhf import model as M  # noqa: E402
from nanorlhf.data import load_prompts  # noqa: E402
from nanorlhf.lora import add_lora, use_adapter  # noqa: E402


def seconds(fn, repeats):
    """Best of `repeats` timed calls after one untimed call (the first pays allocation and kernel selection)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=M.DEFAULT_MODEL, help="Causal LM to generate with (default: SmolLM2-135M).")
    p.add_argument("--data", default=os.path.join(ROOT, "data", "alpaca_en_demo.json"), help="Prompts to answer.")
    p.add_argument("--dtype", default="bfloat16", help="Compute dtype (the demo's on a CPU with native bf16).")
    p.add_argument("--rows", type=int, default=32, help="Prompts per batch (the demo's --rollout-batch-size).")
    p.add_argument("--new-tokens", type=int, default=48, help="Tokens per response (the demo's --max-new-tokens).")
    p.add_argument("--repeats", type=int, default=2, help="Timed repeats of each whole generation; the best counts.")
    args = p.parse_args()

    model, tok = M.load_model(args.model, device="cpu", dtype=args.dtype)
    add_lora(model, 16, 32, name="policy", verbose=False)
    prompts = [q.ids for q in load_prompts(args.data, tok, 256, limit=args.rows)]
    head, H = model.get_output_embeddings(), model.config.hidden_size
    hidden = torch.randn(args.rows, max(map(len, prompts)), H, dtype=head.weight.dtype)
    probs = torch.softmax(torch.randn(args.rows, head.weight.shape[0]), -1)

    rows = []
    with torch.no_grad():
        last = hidden[:, -1:]  # (B, 1, H), strides of the (B, T, H) tensor: what transformers hands the lm_head
        assert not head.weight.requires_grad  # add_lora froze it; a weight that needs grad takes the fast path
        rows.append(("lm_head on hidden[:, -1:], frozen weight", seconds(
            lambda: torch.nn.functional.linear(last, head.weight), 3), None))
        rows.append(("  the same rows made contiguous (ours)", seconds(
            lambda: torch.nn.functional.linear(last.contiguous(), head.weight), 3), 0))
    rows.append(("one draw per row: torch.multinomial", seconds(lambda: torch.multinomial(probs, 1), 10), None))
    rows.append(("  sample_token's inverse CDF (ours)", seconds(lambda: M.sample_token(probs.log(), 1.0), 10), 2))

    from transformers import GenerationConfig
    config = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=True, temperature=0.7, top_k=0, top_p=1.0,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    queries, query_mask = M.left_pad(prompts, tok.pad_token_id)
    P = queries.shape[1]
    model.generation_config = config  # else its shipped config fills what this one leaves at the defaults

    steps = {}  # decoding steps each run took: both stop once every row has emitted EOS, which sampling decides

    def ours(adapter):
        torch.manual_seed(0)
        with use_adapter(model, adapter):
            steps[adapter] = M.generate(model, tok, prompts, args.new_tokens, 0.7)["responses"].shape[1]

    def theirs():
        torch.manual_seed(0)
        with use_adapter(model, "policy"), torch.no_grad():
            out = model.generate(input_ids=queries, attention_mask=query_mask, generation_config=config)
        steps["transformers"] = out.shape[1] - P

    model.eval()
    # per decoding step, so that runs whose samples end at different steps compare
    for name, fn, key, base in ((f"{args.rows} rows, a step of transformers' generate, LoRA on", theirs, "transformers",
                                 None),
                                ("  a step of nanorlhf.model.generate, LoRA on (ours)", lambda: ours("policy"), "policy",
                                 4),
                                ("  a step of nanorlhf.model.generate, adapters off", lambda: ours(None), None, 5)):
        s = seconds(fn, args.repeats)
        rows.append((f"{name} ({steps[key]} steps)", s / steps[key], base))
    print(f"{args.model}, {args.dtype}, {torch.get_num_threads()} threads")
    for i, (name, s, base) in enumerate(rows):
        ratio = f"  {s / rows[base][1]:.2f}x of line {base + 1}" if base is not None else ""
        print(f"{i + 1}. {name:<58} {s * 1000:9.1f} ms{ratio}")


if __name__ == "__main__":
    main()
