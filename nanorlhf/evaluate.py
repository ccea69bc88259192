"""Compare trained models with a baseline on held-out prompts, judged by a reward function and/or a reward model.

    python -m nanorlhf.evaluate --model out/ppo --model out/dpo --baseline out/sft \
        --reward-fn nanorlhf.gold:sentiment --rm out/rm --data heldout.jsonl --limit 64

For the baseline and each model, on the same prompts and seed: each judge's mean score ± standard error
(an RM's normalised with the statistics train_rm.py stored), the **win rate** against the baseline's
response to the same prompt (ties count half; the A/B test of Stiennon et al. 2020) and the mean paired
gain over it ± standard error; then KL to the baseline on the model's own samples, mean response length,
distinct-1/2 (Li et al. 2016) and EOS rate. The first judge (--reward-fn if given, else --rm) fills the
`score` and `win_rate` fields, and every other judge's `agreement` says how often it orders the model's and the
baseline's responses as the first judge does (for an RM against the gold reward: its held-out pairwise accuracy,
on the responses that matter; give --rm several times to compare RMs on the same samples). Writes JSON (--out)
and prints a markdown table.
"""
import json
import math
from dataclasses import asdict, dataclass

import torch

from . import model as M
from .cli import UserError, arg, main
from .data import load_prompts, render_prompt
from .preference import summed_logprobs
from .rewards import Rewarder


@dataclass
class Args:
    model: list[str] = arg([], "A model to evaluate (HF folder, e.g. out/ppo).")
    baseline: str = arg("", "The model to compare against, usually the SFT output.")
    reward_fn: str | None = arg(None, "A judge given as Python 'module:function', called as TRL's GRPOTrainer calls a "
                                "reward (the data's other columns included) or as f(prompts, responses) -> floats, "
                                "e.g. the gold reward nanorlhf.gold:sentiment; its column is its name.")
    rm: list[str] = arg([], "Reward model folder (train_rm.py output) that judges the responses. Give it several "
                        "times to compare RMs on the same samples: columns RM, RM2, ..., each with its agreement "
                        "with the first judge (with a gold --reward-fn: each RM's held-out pairwise accuracy).")
    data: str = arg("", "Prompts: any format that carries prompts (.json/.jsonl).")
    format: str | None = arg(None, "Force the data format.")
    limit: int = arg(64, "Number of prompts (the first N that fit --max-length).", gt=0)
    max_prompt_length: int = arg(256, "Skip prompts longer than this many tokens.", gt=0, alias="--max-length")
    max_new_tokens: int = arg(64, "Response length limit.", gt=0)
    temperature: float = arg(0.7, "Sampling temperature (the KL estimate uses logprobs at this temperature).", gt=0)
    batch_size: int = arg(8, "Prompts per generation batch.", gt=0)
    score_batch_size: int = arg(16, "Rows per forward when the RM judges and for the KL. A forward pays for the "
                                "padding up to its longest row, while a decode step costs about the same for more "
                                "rows, so this is smaller than --batch-size (the demo's RM and KL passes over 128 "
                                "held-out rows on 2 CPU cores: 66 s at 64 rows, 38 s at 16; docs/benchmarks.md).",
                                gt=0)
    seed: int = arg(0, "Sampling seed, reset before each model so all see the same random stream.")
    device: str = arg("auto", "cuda, cpu or auto.")
    dtype: str = arg("auto", "Compute dtype; auto = bf16 on GPUs that support it, else fp32.",
                     choices=["auto", "float32", "bfloat16", "float16"])
    out: str | None = arg(None, "Write the results as JSON here.")


def column(part, n_rms):
    """A judge's column name: the Rewarder's parts "rm", "rm2", ... are the n_rms RMs in --rm order; a reward
    function's part is its name."""
    return part.upper() if part in ["rm"] + [f"rm{i}" for i in range(2, n_rms + 1)] else part


def mean_se(x):
    """(mean, standard error) of a 1-D tensor."""
    return x.mean().item(), (x.std().item() / math.sqrt(len(x))) if len(x) > 1 else 0.0


def distinct(texts, n):
    """Unique word n-grams / all word n-grams over every response (Li et al. 2016)."""
    grams = [tuple(w[i:i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def judge_stats(scores, base):
    """Mean ± se of a judge's scores (N,), and win rate (ties half) and paired gain ± se against the baseline's,
    over the prompts where the judge scored both (a reward function's None is NaN: it does not apply there)."""
    both = scores.isfinite() & base.isfinite()
    scores, base = scores[both], base[both]
    mean, se = mean_se(scores)
    wins = (scores > base).float() + 0.5 * (scores == base).float()
    gain, gain_se = mean_se(scores - base)
    win, win_se = mean_se(wins)
    return {"mean": mean, "se": se, "win_rate": win, "win_se": win_se, "gain": gain, "gain_se": gain_se}


def agreement(scores, base, ref_scores, ref_base):
    """How often a judge orders a model's response and the baseline's as a reference judge (the gold reward) does:
    the mean over prompts where the reference strictly prefers one (and both judges scored both) of 1 when the judge
    prefers the same one, ½ on its tie, else 0; ± se, and that number of prompts. For an RM, its pairwise accuracy on
    held-out pairs labelled by the reference, on the responses the evaluated models give."""
    both = scores.isfinite() & base.isfinite() & ref_scores.isfinite() & ref_base.isfinite()
    ref, judged = torch.sign(ref_scores - ref_base)[both], torch.sign(scores - base)[both]
    ref, judged = ref[ref != 0], judged[ref != 0]
    right = (judged == ref).float() + 0.5 * (judged == 0).float()
    return (*mean_se(right), len(right)) if len(right) else (float("nan"), 0.0, 0)


def evaluate(args):
    if not (args.model and args.baseline and args.data and (args.rm or args.reward_fn)):
        raise UserError("--model (one or more), --baseline, --data and a judge (--reward-fn and/or --rm) are required")
    base, tokenizer = M.load_model(args.baseline, device=args.device, dtype=args.dtype, flag="--baseline")
    rewarder = Rewarder(tokenizer, args.rm, reward_fn=args.reward_fn, device=args.device, dtype=args.dtype)
    prompts = load_prompts(args.data, tokenizer, args.max_prompt_length, args.format, args.limit,
                           flag="--max-prompt-length")
    messages = [p.messages for p in prompts]

    def run(model, tok):
        """Samples of `model` on every prompt from the fixed seed, and their judged scores."""
        queries = [p.ids for p in prompts] if tok is tokenizer else [render_prompt(tok, m) for m in messages]
        torch.manual_seed(args.seed)
        responses, ended = M.generate_all(model, tok, queries, args.max_new_tokens, args.temperature, args.batch_size)
        _, parts, texts = rewarder(prompts, queries, responses, ended, args.score_batch_size, tokenizer=tok)
        return queries, responses, ended, parts, texts

    def summary(responses, ended, texts, parts, base_parts):
        judges = {j: judge_stats(parts[j], base_parts[j]) for j in parts}
        reference = rewarder.fns[0].name if rewarder.fns else "rm"
        for j in judges.keys() - {reference}:  # e.g. the RM against the gold reward, on this model's pairs
            judges[j]["agreement"], judges[j]["agreement_se"], judges[j]["agreement_n"] = agreement(
                parts[j], base_parts[j], parts[reference], base_parts[reference])
        first = judges[reference]
        return {"score": first["mean"], "win_rate": first["win_rate"], "judges": judges,
                "length": sum(map(len, responses)) / len(responses), "distinct_1": distinct(texts, 1),
                "distinct_2": distinct(texts, 2), "eos_rate": sum(ended) / len(ended),
                "example": {"prompt": messages[0][-1]["content"], "response": texts[0]}}

    base_queries, base_responses, base_ended, base_parts, base_texts = run(base, tokenizer)
    results = {args.baseline: summary(base_responses, base_ended, base_texts, base_parts, base_parts)
               | {"kl": 0.0, "kl_se": 0.0}}
    for name in args.model:
        model, tok = M.load_model(name, device=args.device, dtype=args.dtype)
        queries, responses, ended, parts, texts = run(model, tok)
        kl = kl_se = None
        if tok.get_vocab() == tokenizer.get_vocab():  # a token-level KL needs one vocabulary
            rows = list(zip(queries, responses))
            with torch.no_grad():  # log π(y) - log π_base(y) on the model's own samples, at the sampling temperature
                log_ratio = (summed_logprobs(model, rows, 0, args.temperature, args.score_batch_size).cpu()
                             - summed_logprobs(base, rows, 0, args.temperature, args.score_batch_size).cpu())
            kl, kl_se = mean_se(log_ratio)
        results[name] = summary(responses, ended, texts, parts, base_parts) | {"kl": kl, "kl_se": kl_se}
    results["settings"] = asdict(args) | {"prompts": len(prompts)}
    print(table(results, [args.baseline] + args.model))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.out}")
    return results


def table(results, names):
    """Markdown: per judge mean ± se, win rate and paired gain vs the baseline; then KL, length, diversity, EOS."""
    judges, n_rms = list(results[names[0]]["judges"]), len(results["settings"]["rm"])
    agreeing = [j for j in judges if "agreement" in results[names[0]]["judges"][j]]
    ref = column(next(j for j in judges if j not in agreeing), n_rms)  # the others' agreement is with this judge
    head = ["model"] + [f"{column(j, n_rms)} {c}" for j in judges
                        for c in ("score ± se", "win rate vs baseline", "gain ± se")]
    head += [f"{column(j, n_rms)} agrees with {ref} ± se" for j in agreeing]
    head += ["KL to baseline", "length", "distinct-1", "distinct-2", "EOS rate"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in names:
        r = results[n]
        cells = [n]
        for j in judges:
            s = r["judges"][j]
            cells += [f"{s['mean']:.3f} ± {s['se']:.3f}", f"{s['win_rate']:.2f} ± {s['win_se']:.2f}",
                      f"{s['gain']:+.3f} ± {s['gain_se']:.3f}"]
        for j in agreeing:
            s = r["judges"][j]
            cells.append(f"{s['agreement']:.2f} ± {s['agreement_se']:.2f} ({s['agreement_n']})" if s["agreement_n"]
                         else "n/a")
        cells += ["n/a" if r["kl"] is None else f"{r['kl']:.2f} ± {r['kl_se']:.2f}", f"{r['length']:.1f}",
                  f"{r['distinct_1']:.3f}",
                  f"{r['distinct_2']:.3f}", f"{r['eos_rate']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(evaluate, Args)
