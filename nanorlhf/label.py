"""Preference data from any judge: sample k responses per prompt from a model, score each with a reward
function and/or reward models, and write preference pairs and KTO-labelled examples.

    python -m nanorlhf.label --model out/sft --data prompts.jsonl --reward-fn nanorlhf.gold:sentiment \\
        --k 4 --out out/labels

This is how the DPO paper built its controlled-sentiment data (Rafailov et al. 2023 §6.1): pairs of the
SFT model's own samples, ranked by a known reward. Any `module:function` judges (a verifier, a classifier),
as can trained reward models (`--rm`, repeatable, weighted). --out gets three files our loader reads:

    samples.jsonl  every prompt's k responses with their scores and EOS flags ("ranked" format): tied responses
                   share a rank and unfinished ones have rank null, so the loader makes every pair of a better and
                   a worse usable response: pairs.jsonl's pairs under --pairs all --min-margin 0, and more than
                   pairs.jsonl holds under best-worst or a margin floor
    pairs.jsonl    {prompt, chosen, rejected, margin}: best against worst of each prompt's responses
                   (--pairs all: every pair), margin = the score difference, kept when >= --min-margin
    kto.jsonl      {prompt, completion, label}: desirable when the score is above the mean of its prompt's usable
                   responses (or --kto-threshold), undesirable when below, left out when equal

Responses that hit --max-new-tokens without EOS are left out of pairs and KTO examples (--keep-unfinished
keeps them): the loader appends EOS to every completion, which would teach the model to stop mid-sentence. So are
responses that no judge scores (every --reward-fn returned None, and no --rm): they have no score (null in
samples.jsonl), not a 0 that would make them the worse side of a pair or an undesirable example.
"""
import json
import math
import os
import statistics
import sys
from dataclasses import asdict, dataclass

import torch

from . import model as M
from .cli import UserError, arg, main
from .data import load_prompts
from .engine import DECODE, DECODE_HELP, check_lengths, generate_all
from .rewards import Rewarder


@dataclass
class Args:
    model: str = arg("", "The model that samples the responses, usually the SFT output (HF folder, .gguf, 'smollm2').")
    data: str = arg("", "Prompts: any data that carries prompts (.json/.jsonl); each distinct prompt once.")
    format: str | None = arg(None, "Force the data format.")
    limit: int | None = arg(None, "Use only the first N prompts (that fit --max-length).", gt=0)
    k: int = arg(4, "Responses sampled per prompt. More gives cleaner best-worst pairs (a larger expected margin).",
                 ge=2)
    reward_fn: list[str] = arg([], "The judge as a Python 'module:function', called as TRL's GRPOTrainer calls a "
                               "reward (the data's other columns included; no trainer_state, log_metric or log_extra "
                               "outside training) or as f(prompts, responses) on lists of strings, returning floats "
                               "(None where it does not apply), e.g. nanorlhf.gold:sentiment.")
    reward_weight: list[float] = arg([], "Weight of each --reward-fn in the score, in order (default 1 each).")
    rm: list[str] = arg([], "A reward model folder (train_rm.py output) that judges too.")
    rm_weight: list[float] = arg([], "Weight of each --rm in the score, in order (default 1 each).")
    pairs: str = arg("best-worst", "Which pairs of a prompt's responses to write.", choices=["best-worst", "all"])
    min_margin: float = arg(0.0, "Write only pairs whose score difference is at least this (ties are never written).",
                            ge=0)
    kto_threshold: float | None = arg(None, "Label a response desirable when its score is above this, undesirable "
                                      "when below, and leave it out when equal; default: the mean score of its "
                                      "prompt's usable responses (finished, unless --keep-unfinished, and scored).")
    keep_unfinished: bool = arg(False, "Also pair and label responses that never emitted EOS.")
    max_prompt_length: int = arg(256, "Skip prompts longer than this many tokens.", gt=0, alias="--max-length")
    max_new_tokens: int = arg(64, "Response length limit.", gt=0)
    temperature: float = arg(0.7, "Sampling temperature.", gt=0)
    batch_size: int = arg(64, "Responses generated (and scored) per batch. A batch holds whole groups of a prompt's "
                          "--k responses, which share one prefill, and more rows make a decoding step's matmuls "
                          "more efficient: on a 2-core CPU 256 rows sampled 2.1x the tokens per second of 64.", gt=0)
    decode: str = arg("auto", DECODE_HELP, choices=DECODE)
    seed: int = arg(0, "Sampling seed.")
    device: str = arg("auto", "cuda, cpu or auto.")
    dtype: str = arg("auto", "Compute dtype; auto = bf16 on GPUs that support it, else fp32.",
                     choices=["auto", "float32", "bfloat16", "float16"])
    out: str = arg("", "Output folder for samples.jsonl, pairs.jsonl and kto.jsonl.")
    overwrite: bool = arg(False, "Replace those files when --out already holds them.")


def pairs_of(responses, scores, usable, mode, min_margin):
    """[(chosen index, rejected index, margin)] of one prompt's responses, best first for best-worst.

    Only `usable` responses take part; a pair needs margin > 0 and >= min_margin."""
    idx = sorted((i for i in range(len(responses)) if usable[i]), key=lambda i: -scores[i])
    if mode == "best-worst":
        candidates = [(idx[0], idx[-1])] if len(idx) >= 2 else []
    else:
        candidates = [(a, b) for n, a in enumerate(idx) for b in idx[n + 1:]]
    return [(a, b, scores[a] - scores[b]) for a, b in candidates if scores[a] - scores[b] > 0
            and scores[a] - scores[b] >= min_margin]


def ranks(scores, usable):
    """samples.jsonl's rank of each response, 0 = best: the number of usable responses that score strictly higher.
    Tied responses share a rank, so the ranked loader, which pairs only strictly lower ranks, never pairs two equal
    scores (pairs_of never does either); an unusable response gets None, which the loader leaves out."""
    return [sum(usable[j] and scores[j] > scores[i] for j in range(len(scores))) if usable[i] else None
            for i in range(len(scores))]


def kto_labels(scores, usable, threshold=None):
    """[(index, desirable)]: above the threshold is desirable, below is undesirable, equal says nothing and is left
    out. The default threshold is the mean of the usable scores: the sign of a GRPO advantage (Shao et al. 2024
    §4.1.2) taken over the usable responses alone, not GRPO's own baseline, which counts every scored response of
    the group, unfinished ones too. A binary judge's [1, 0, 0, 0] and [1, 1, 1, 0] give both labels, where the median
    equals the majority's score and would leave the whole majority out."""
    kept = [i for i in range(len(scores)) if usable[i]]
    if not kept:
        return []
    # statistics.mean is exact (fractions), so a group of equal scores has exactly their value as its mean: no labels
    cut = statistics.mean(scores[i] for i in kept) if threshold is None else threshold
    return [(i, scores[i] > cut) for i in kept if scores[i] != cut]


def label(args):
    if not (args.model and args.data and args.out):
        raise UserError("--model, --data and --out are required")
    names = ("samples.jsonl", "pairs.jsonl", "kto.jsonl")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a file; expected a folder")
    if any(os.path.exists(os.path.join(args.out, n)) for n in names) and not args.overwrite:
        raise UserError(f"--out {args.out} already holds labelled data; pass --overwrite to replace it")
    if args.k > args.batch_size:
        raise UserError(f"--k {args.k} is more than --batch-size {args.batch_size}: a prompt's k responses share one "
                        "prefill, so a batch must hold them all")
    check_lengths(M.load_config(args.model), args.max_prompt_length, args.max_new_tokens)
    model, tokenizer = M.load_model(args.model, device=args.device, dtype=args.dtype)
    model.eval()
    rewarder = Rewarder(tokenizer, args.rm, args.rm_weight, args.reward_fn, reward_weights=args.reward_weight,
                        unscored="so they are left out of pairs and KTO examples", device=args.device, dtype=args.dtype)
    prompts = load_prompts(args.data, tokenizer, args.max_prompt_length, args.format, args.limit,
                           flag="--max-prompt-length")
    rows = [p for p in prompts for _ in range(args.k)]  # each prompt k times, side by side
    queries = [p.ids for p in rows]
    torch.manual_seed(args.seed)
    responses, ended = generate_all(model, tokenizer, queries, args.max_new_tokens, args.temperature,
                                    args.batch_size, desc=f"sampling {args.k} x {len(prompts)}", decode=args.decode)
    scores, texts = [], []
    for i in range(0, len(responses), args.batch_size):
        sl = slice(i, i + args.batch_size)
        s, _, t = rewarder(rows[sl], queries[sl], responses[sl], ended[sl], args.batch_size)
        scores += [None if math.isnan(x) else x for x in s.tolist()]  # None: no judge applies
        texts += t
    os.makedirs(args.out, exist_ok=True)
    counts = {"pairs": 0, "desirable": 0, "undesirable": 0}
    margins = []
    with (open(os.path.join(args.out, "samples.jsonl"), "w") as f_samples,
          open(os.path.join(args.out, "pairs.jsonl"), "w") as f_pairs,
          open(os.path.join(args.out, "kto.jsonl"), "w") as f_kto):
        for p, prompt in enumerate(p.messages for p in prompts):
            sl = slice(p * args.k, (p + 1) * args.k)
            r, s, e = texts[sl], scores[sl], ended[sl]
            usable = [(x or args.keep_unfinished) and v is not None for x, v in zip(e, s)]
            record = {"prompt": prompt, "responses": r, "rank": ranks(s, usable), "scores": s, "ended": e}
            f_samples.write(json.dumps(record) + "\n")
            for a, b, margin in pairs_of(r, s, usable, args.pairs, args.min_margin):
                f_pairs.write(json.dumps({"prompt": prompt, "chosen": r[a], "rejected": r[b], "margin": margin}) + "\n")
                counts["pairs"] += 1
                margins.append(margin)
            for i, desirable in kto_labels(s, usable, args.kto_threshold):
                f_kto.write(json.dumps({"prompt": prompt, "completion": r[i], "label": desirable}) + "\n")
                counts["desirable" if desirable else "undesirable"] += 1
    scored = [v for v in scores if v is not None]
    summary = {"prompts": len(prompts), "responses": len(texts), "unscored": len(texts) - len(scored),
               "mean_score": sum(scored) / len(scored) if scored else None, "eos_rate": sum(ended) / len(ended),
               **counts,
               "mean_margin": sum(margins) / len(margins) if margins else 0.0}
    with open(os.path.join(args.out, "label.json"), "w") as f:
        json.dump({"args": asdict(args), "summary": summary}, f, indent=2)
    print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
    if not counts["pairs"]:
        print(f"warning: no pair was written (EOS rate {summary['eos_rate']:.0%}, --min-margin {args.min_margin}): "
              "raise --max-new-tokens or --k, or lower --min-margin", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main(label, Args)
