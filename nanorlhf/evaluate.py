"""Compare trained models with a baseline on held-out prompts, judged by a reward model.

    python -m nanorlhf.evaluate --model out/ppo --model out/dpo --baseline out/sft --rm out/rm \\
        --data ../shared/data/hh_harmless.jsonl --limit 64

For the baseline and each model, on the same prompts and seed: the mean RM score (normalised with the
statistics train_rm.py stored), KL to the baseline on the model's own samples, mean response length,
distinct-1/2 (Li et al. 2016) and EOS rate; and the model's **win rate** against the baseline's response
to the same prompt, judged by the RM (ties count half), the A/B test of Stiennon et al. 2020.
Writes JSON (--out) and prints a markdown table.
"""
import json
from dataclasses import asdict, dataclass

import torch

from . import model as M
from .cli import UserError, arg, main
from .data import load_examples, render_prompt
from .preference import summed_logprobs


@dataclass
class Args:
    model: list[str] = arg([], "A model to evaluate (HF folder, e.g. out/ppo).")
    baseline: str = arg("", "The model to compare against, usually the SFT output.")
    rm: str = arg("", "Reward model folder (train_rm.py output) that judges the responses.")
    data: str = arg("", "Prompts: any format that carries prompts (.json/.jsonl).")
    format: str | None = arg(None, "Force the data format.")
    limit: int = arg(64, "Number of prompts (the first N).", gt=0)
    max_length: int = arg(256, "Skip prompts longer than this many tokens.", gt=0)
    max_new_tokens: int = arg(64, "Response length limit.", gt=0)
    temperature: float = arg(0.7, "Sampling temperature (the KL estimate uses logprobs at this temperature).", gt=0)
    batch_size: int = arg(8, "Prompts per generation / scoring batch.", gt=0)
    seed: int = arg(0, "Sampling seed, reset before each model so all see the same random stream.")
    device: str = arg("auto", "cuda, cpu or auto.")
    out: str | None = arg(None, "Write the results as JSON here.")


def distinct(texts, n):
    """Unique word n-grams / all word n-grams over every response (Li et al. 2016)."""
    grams = [tuple(w[i:i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


@torch.no_grad()
def respond(model, tokenizer, queries, args):
    """(responses as lists of ids, ended flags) for each prompt, sampled in batches from a fixed seed."""
    torch.manual_seed(args.seed)
    responses, ended = [], []
    for i in range(0, len(queries), args.batch_size):
        out, lengths, done = M.generate(model, tokenizer, queries[i:i + args.batch_size], args.max_new_tokens,
                                        args.temperature)
        responses += [r[:n].tolist() for r, n in zip(out.cpu(), lengths.cpu())]
        ended += done.tolist()
    return responses, ended


@torch.no_grad()
def sequence_logprobs(model, queries, responses, temperature, batch_size):
    """Σ_t log π(response_t | prompt, response_<t) at `temperature`, one per prompt."""
    rows = list(zip(queries, responses))
    return torch.cat([summed_logprobs(model, rows[i:i + batch_size], 0, temperature=temperature).cpu()
                      for i in range(0, len(rows), batch_size)])


def evaluate(args):
    if not (args.model and args.baseline and args.rm and args.data):
        raise UserError("--model (one or more), --baseline, --rm and --data are all required")
    rm, rm_tok = M.load_reward_model(args.rm, device=args.device)
    base, tokenizer = M.load_model(args.baseline, device=args.device, flag="--baseline")
    prompts = [ex.prompt for ex in load_examples(args.data, "prompts", args.format)]
    queries = [(m, q) for m in prompts if len(q := render_prompt(tokenizer, m)) <= args.max_length][:args.limit]
    if not queries:
        raise UserError(f"{args.data}: no prompt fits --max-length {args.max_length}")
    messages, queries = [m for m, _ in queries], [q for _, q in queries]

    def judge(responses, ended, tok):
        texts = [tok.decode(r, skip_special_tokens=True) for r in responses]
        seqs = [render_prompt(rm_tok, m) + rm_tok(t, add_special_tokens=False).input_ids +
                ([rm_tok.eos_token_id] if e else []) for m, t, e in zip(messages, texts, ended)]
        return M.score_sequences(rm, seqs, rm_tok.pad_token_id, args.batch_size), texts

    def summary(responses, ended, scores, texts):
        return {"score": scores.mean().item(), "length": sum(map(len, responses)) / len(responses),
                "distinct_1": distinct(texts, 1), "distinct_2": distinct(texts, 2), "eos_rate": sum(ended) / len(ended),
                "example": {"prompt": messages[0][-1]["content"], "response": texts[0]}}

    base_responses, base_ended = respond(base, tokenizer, queries, args)
    base_scores, base_texts = judge(base_responses, base_ended, tokenizer)
    results = {args.baseline: summary(base_responses, base_ended, base_scores, base_texts) | {"win_rate": 0.5, "kl": 0.0}}
    for name in args.model:
        model, tok = M.load_model(name, device=args.device)
        responses, ended = respond(model, tok, queries, args)
        scores, texts = judge(responses, ended, tok)
        wins = (scores > base_scores).float() + 0.5 * (scores == base_scores).float()
        kl = None
        if tok.get_vocab() == tokenizer.get_vocab():  # a token-level KL needs one vocabulary
            log_ratio = (sequence_logprobs(model, queries, responses, args.temperature, args.batch_size)
                         - sequence_logprobs(base, queries, responses, args.temperature, args.batch_size))
            kl = log_ratio.mean().item()
        results[name] = summary(responses, ended, scores, texts) | {"win_rate": wins.mean().item(), "kl": kl}
    results["settings"] = asdict(args) | {"prompts": len(queries)}
    print(table(results, [args.baseline] + args.model))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.out}")
    return results


def table(results, names):
    head = "| model | RM score | win rate vs baseline | KL to baseline | length | distinct-1 | distinct-2 | EOS rate |"
    lines = [head, "|" + "---|" * 8]
    for n in names:
        r = results[n]
        kl = "n/a" if r["kl"] is None else f"{r['kl']:.2f}"
        lines.append(f"| {n} | {r['score']:.3f} | {r['win_rate']:.2f} | {kl} | {r['length']:.1f} | "
                     f"{r['distinct_1']:.3f} | {r['distinct_2']:.3f} | {r['eos_rate']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(evaluate, Args)
