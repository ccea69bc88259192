"""Compare trained models with a baseline on held-out prompts, judged by a reward function, a reward model and/or a
pairwise judge model; with reference answers in the data, also BLEU and ROUGE-L against them.

    python -m nanorlhf.evaluate --model out/ppo --model out/dpo --baseline out/sft \
        --reward-fn nanorlhf.gold:sentiment --rm out/rm --judge smollm2 --data heldout.jsonl --limit 64

For the baseline and each model, on the same prompts and seed: each judge's mean score ± standard error
(an RM's normalised with the statistics train_rm.py stored), the **win rate** against the baseline's
response to the same prompt (ties count half; the A/B test of Stiennon et al. 2020) and the mean paired
gain over it ± standard error; then KL to the baseline on the model's own samples, mean response length,
distinct-1/2 (Li et al. 2016) and EOS rate. The first judge (--reward-fn if given, else --rm) fills the
`score` and `win_rate` fields, and every other judge's `agreement` says how often it orders the model's and the
baseline's responses as the first judge does (for an RM against the gold reward: its held-out pairwise accuracy,
on the responses that matter; give --rm several times to compare RMs on the same samples).

--judge asks a causal LM which of the two responses is better, in both orders (a verdict that flips with the order
is a tie), and reports its win rate, how often it picks the answer shown first, and its agreement with the first
judge; --battles writes its verdicts as FastChat battle records, which `python -m nanorlhf.abtest results` sets
beside the votes of people who judged the same pairs. Where the data carries a reference answer (alpaca's
`output`, a preference pair's `chosen`, a `reference` column), each model's BLEU and ROUGE-L against it (the
`metrics` extra). Writes JSON (--out) and prints a markdown table.
"""
import importlib.util
import json
import math
import sys
import time
from dataclasses import asdict, dataclass

import torch

from . import model as M
from .cli import UserError, arg, main
from .data import by_length, collate, load_examples, load_prompts, render_prompt
from .engine import DECODE, DECODE_HELP, check_lengths, generate_all
from .preference import summed_logprobs
from .rewards import Rewarder


@dataclass
class Sampling:
    """The models, prompts and sampling that evaluate and the A/B test (nanorlhf.abtest prepare) share: given the
    same values, both draw the same responses, so a judge's verdicts and people's votes are on the same pairs."""
    model: list[str] = arg([], "A model to compare with the baseline (HF folder, e.g. out/ppo).")
    baseline: str = arg("", "The model to compare against, usually the SFT output.")
    data: str = arg("", "Prompts: any format that carries prompts (.json/.jsonl).")
    format: str | None = arg(None, "Force the data format.")
    limit: int = arg(64, "Number of prompts (the first N that fit --max-length).", gt=0)
    max_prompt_length: int = arg(256, "Skip prompts longer than this many tokens.", gt=0, alias="--max-length")
    max_new_tokens: int = arg(64, "Response length limit.", gt=0)
    temperature: float = arg(0.7, "Sampling temperature (the KL estimate uses logprobs at this temperature).", gt=0)
    batch_size: int = arg(8, "Prompts per generation batch. More rows make a decoding step's matmuls more efficient.",
                          gt=0)
    decode: str = arg("auto", DECODE_HELP, choices=DECODE)
    seed: int = arg(0, "Sampling seed, reset before each model so all see the same random stream.")
    device: str = arg("auto", "cuda, cpu or auto.")
    dtype: str = arg("auto", "Compute dtype; auto = bf16 on GPUs that support it, else fp32.",
                     choices=["auto", "float32", "bfloat16", "float16"])


@dataclass
class Args(Sampling):
    reward_fn: str | None = arg(None, "A judge given as Python 'module:function', called as TRL's GRPOTrainer calls a "
                                "reward (the data's other columns included) or as f(prompts, responses) -> floats, "
                                "e.g. the gold reward nanorlhf.gold:sentiment; its column is its name.")
    rm: list[str] = arg([], "Reward model folder (train_rm.py output) that judges the responses. Give it several "
                        "times to compare RMs on the same samples: columns RM, RM2, ..., each with its agreement "
                        "with the first judge (with a gold --reward-fn: each RM's held-out pairwise accuracy).")
    judge: str | None = arg(None, "A causal LM with a chat template (HF folder, .gguf, 'smollm2') asked which of a "
                            "model's and the baseline's responses is better, in both orders; its verdict is the "
                            "probability of 'A' against 'B' as its answer's first token, never sampled.")
    score_batch_size: int = arg(16, "Rows per forward when the RM or --judge judges and for the KL. A forward pays for "
                                "the padding up to its longest row, while a decode step costs about the same for more "
                                "rows, so this is smaller than --batch-size (the demo's RM and KL passes over 128 "
                                "held-out rows on 2 CPU cores: 66 s at 64 rows, 38 s at 16; docs/benchmarks.md).",
                                gt=0)
    battles: str | None = arg(None, "Write the --judge's verdicts here as FastChat battle records (JSONL), which "
                              "`python -m nanorlhf.abtest results --battles` compares with people's votes.")
    out: str | None = arg(None, "Write the results as JSON here.")


def sample(model, tok, prompts, tokenizer, args):
    """(queries, responses, ended, texts) of `model` on every prompt, drawn from args.seed so that every model sees
    the same random stream: the prompts' token ids when `tok` is the baseline's `tokenizer`, else rendered by its own
    chat template; texts without special tokens."""
    queries = [p.ids for p in prompts] if tok is tokenizer else [render_prompt(tok, p.messages) for p in prompts]
    torch.manual_seed(args.seed)
    responses, ended = generate_all(model, tok, queries, args.max_new_tokens, args.temperature, args.batch_size,
                                    decode=args.decode)
    return queries, responses, ended, [tok.decode(r, skip_special_tokens=True) for r in responses]


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


# Asked as a user turn so the judge's chat template frames it; the instruction to ignore order and length names the
# biases Zheng et al. 2023 ("Judging LLM-as-a-judge", §3.3) measured, which asking alone does not remove: `pairwise`
# judges both orders.
JUDGE_PROMPT = ("Two assistants answered the same request. Which answer serves the user better: more helpful, "
                "relevant, accurate and harmless? Judge the content alone, not the order the answers come in nor "
                "their length.\n\n[Request]\n{prompt}\n\n[Answer A]\n{a}\n\n[Answer B]\n{b}\n\n"
                "Reply with one letter: A or B.")


def conversation(messages):
    """A prompt's messages as the text a judge reads: a lone user turn as it is, a conversation turn by turn."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


@torch.no_grad()
def judge_margins(judge, tokenizer, messages, firsts, seconds, batch_size):
    """log p("A") - log p("B") (N,) of the judge's first answer token, asked which of firsts[i] (A) and seconds[i] (B)
    answers messages[i] better: > 0 picks A. Read at the answer position, never sampled, so a verdict is the same
    every time; the softmax's normaliser cancels in the difference, so two rows of the lm_head give it."""
    letters = [tokenizer.encode(x, add_special_tokens=False) for x in ("A", "B")]
    if any(len(ids) != 1 for ids in letters):
        raise UserError(f"--judge {judge.name_or_path}: 'A' and 'B' are not one token each in its vocabulary, so its "
                        "verdict cannot be read at one position")
    weight, scale = M.lm_head(judge)
    rows = weight[[letters[0][0], letters[1][0]]].float()  # (2, H)
    asked = [render_prompt(tokenizer, [{"role": "user", "content": JUDGE_PROMPT.format(prompt=conversation(m), a=a,
                                                                                     b=b)}])
             for m, a, b in zip(messages, firsts, seconds)]

    def margins(batch):
        padded = collate([(q, []) for q in batch], tokenizer.pad_token_id)  # right-padded
        mask = padded["attention_mask"].to(weight.device)
        hidden = M.hidden_states(judge, padded["input_ids"].to(weight.device), mask)  # (B, T, H)
        last = hidden[torch.arange(len(batch), device=mask.device), mask.sum(-1) - 1].float()  # (B, H): answer position
        logits = scale * last @ rows.T  # (B, 2)
        return (logits[:, 0] - logits[:, 1]).cpu()
    return by_length(margins, asked, len, batch_size)


def pairwise(ab, ba):
    """The judge's verdicts on N pairs of (model, baseline) responses from its margins in both orders: ab with the
    model's response as A, ba with it as B. LLM judges favour a position, so a verdict counts only when it survives
    the swap (the conservative remedy of Zheng et al. 2023 "Judging LLM-as-a-judge", §3.3-3.4): +1 the model wins in
    both orders, -1 the baseline does, 0 otherwise (a flip, or a tie in either order). Returns (verdicts (N,), the share
    of the 2N judgements that picked a side which picked A ± se, the share of pairs whose verdict flipped)."""
    model_first, model_second = torch.sign(ab), -torch.sign(ba)  # +1 where the model's response was picked
    verdicts = torch.where(model_first == model_second, model_first, torch.zeros_like(model_first))
    margins = torch.cat([ab, ba])
    picked_a = (margins[margins != 0] > 0).float()
    position_a, position_a_se = mean_se(picked_a) if len(picked_a) else (float("nan"), 0.0)
    return verdicts, position_a, position_a_se, (model_first != model_second).float().mean().item()


# FastChat's battle record (the fields fastchat/serve/monitor/clean_battle_data.py writes and elo_analysis.py reads):
# model_a is the model whose answer was A, and `winner` names a side, a tie, or a tie where both answers were bad.
WINNERS = ("model_a", "model_b", "tie", "tie (bothbad)")


def battle(question_id, model_a, model_b, winner, judge, messages, answer_a, answer_b, tstamp):
    """One FastChat battle record; the conversations let a reader check two judges saw the same answers."""
    return {"question_id": question_id, "model_a": model_a, "model_b": model_b, "winner": winner, "judge": judge,
            "turn": 1, "tstamp": tstamp, "conversation_a": messages + [{"role": "assistant", "content": answer_a}],
            "conversation_b": messages + [{"role": "assistant", "content": answer_b}]}


def references(prompts, args):
    """Each prompt's reference answer, or None where it has none: its `reference` column, else the answer the data
    gives with it (alpaca's output, a preference pair's chosen reply, a conversation's last turn); None for all
    where the data's records carry prompts alone."""
    try:
        given = {}
        for ex in load_examples(args.data, "sft", args.format):
            given.setdefault(json.dumps(ex.prompt), ex.completion)
    except UserError:  # prompt-only records cannot be read as SFT data: they carry no answer
        given = {}
    refs = [p.columns.get("reference", given.get(json.dumps(p.messages))) for p in prompts]
    bad = next((r for r in refs if r is not None and not isinstance(r, str)), None)
    if bad is not None:
        raise UserError(f"{args.data}: column 'reference' holds a {type(bad).__name__}; expected the answer's text")
    return refs


def reference_metrics(texts, refs):
    """Corpus BLEU (sacrebleu's, 0-100; Papineni et al. 2002, Post 2018) and mean ROUGE-L F1 ± se (Lin 2004;
    rouge-score, stemmed) of the responses against their reference answers, over the prompts that have one."""
    import sacrebleu
    from rouge_score import rouge_scorer
    pairs = [(t, r) for t, r in zip(texts, refs) if r is not None]
    bleu = sacrebleu.corpus_bleu([t for t, _ in pairs], [[r for _, r in pairs]]).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge, rouge_se = mean_se(torch.tensor([scorer.score(r, t)["rougeL"].fmeasure for t, r in pairs]))
    return {"bleu": bleu, "rouge_l": rouge, "rouge_l_se": rouge_se, "n": len(pairs)}


def evaluate(args):
    if not (args.model and args.baseline and args.data and (args.rm or args.reward_fn or args.judge)):
        raise UserError("--model (one or more), --baseline, --data and a judge (--reward-fn, --rm and/or --judge) are "
                        "required")
    if args.battles and not args.judge:
        raise UserError("--battles writes the verdicts of a --judge; give --judge MODEL")
    check_lengths(M.load_config(args.baseline, "--baseline"), args.max_prompt_length, args.max_new_tokens)
    base, tokenizer = M.load_model(args.baseline, device=args.device, dtype=args.dtype, flag="--baseline")
    rewarder = (Rewarder(tokenizer, args.rm, reward_fn=args.reward_fn, device=args.device, dtype=args.dtype)
                if args.rm or args.reward_fn else None)
    judge = M.load_model(args.judge, device=args.device, dtype=args.dtype, flag="--judge") if args.judge else None
    prompts = load_prompts(args.data, tokenizer, args.max_prompt_length, args.format, args.limit,
                           flag="--max-prompt-length")
    messages = [p.messages for p in prompts]
    refs = references(prompts, args)
    if not any(r is not None for r in refs):
        refs = None
    elif not all(importlib.util.find_spec(p) for p in ("sacrebleu", "rouge_score")):
        print(f"note: {args.data} has reference answers; pip install -e '.[metrics]' (sacrebleu, rouge-score) to "
              "score BLEU and ROUGE-L against them", file=sys.stderr)
        refs = None

    def run(model, tok):
        """Samples of `model` on every prompt from the fixed seed, and their judged scores."""
        queries, responses, ended, texts = sample(model, tok, prompts, tokenizer, args)
        parts = {}
        if rewarder:
            parts = rewarder(prompts, queries, responses, ended, args.score_batch_size, tokenizer=tok)[1]
        return queries, responses, ended, parts, texts

    reference = (rewarder.fns[0].name if rewarder.fns else "rm") if rewarder else None  # the first judge

    def summary(responses, ended, texts, parts, base_parts):
        judges = {j: judge_stats(parts[j], base_parts[j]) for j in parts}
        for j in judges.keys() - {reference}:  # e.g. the RM against the gold reward, on this model's pairs
            judges[j]["agreement"], judges[j]["agreement_se"], judges[j]["agreement_n"] = agreement(
                parts[j], base_parts[j], parts[reference], base_parts[reference])
        first = judges.get(reference, {})
        return ({"score": first.get("mean"), "win_rate": first.get("win_rate"), "judges": judges,
                 "length": sum(map(len, responses)) / len(responses), "distinct_1": distinct(texts, 1),
                 "distinct_2": distinct(texts, 2), "eos_rate": sum(ended) / len(ended),
                 "example": {"prompt": messages[0][-1]["content"], "response": texts[0]}}
                | ({"reference": reference_metrics(texts, refs)} if refs else {}))

    def judged(name, texts, parts, base_parts):
        """The --judge's verdicts on this model's responses against the baseline's, in both orders; its battle
        records; and its agreement with the first reward judge where there is one."""
        ab = judge_margins(*judge, messages, texts, base_texts, args.score_batch_size)
        ba = judge_margins(*judge, messages, base_texts, texts, args.score_batch_size)
        verdicts, position_a, position_a_se, flips = pairwise(ab, ba)
        stats = judge_stats(verdicts.float(), torch.zeros(len(verdicts)))
        out = {"judge": args.judge, "win_rate": stats["win_rate"], "win_se": stats["win_se"],
               "position_a": position_a, "position_a_se": position_a_se, "flips": flips}
        if reference:
            out["agreement"], out["agreement_se"], out["agreement_n"] = agreement(
                verdicts.float(), torch.zeros(len(verdicts)), parts[reference], base_parts[reference])
        now = time.time()
        records = [battle(i, name, args.baseline, WINNERS[{1: 0, -1: 1, 0: 2}[int(v)]], f"judge:{args.judge}",
                          messages[i], texts[i], base_texts[i], now) for i, v in enumerate(verdicts.tolist())]
        return out, records

    base_queries, base_responses, base_ended, base_parts, base_texts = run(base, tokenizer)
    results = {args.baseline: summary(base_responses, base_ended, base_texts, base_parts, base_parts)
               | {"kl": 0.0, "kl_se": 0.0}}
    battles = []
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
        if judge:
            results[name]["pairwise"], records = judged(name, texts, parts, base_parts)
            battles += records
    results["settings"] = asdict(args) | {"prompts": len(prompts)}
    print(table(results, [args.baseline] + args.model))
    if args.battles:
        with open(args.battles, "w") as f:
            f.writelines(json.dumps(b) + "\n" for b in battles)
        print(f"wrote {len(battles)} battle records of judge:{args.judge} to {args.battles}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.out}")
    return results


def table(results, names):
    """Markdown: per judge mean ± se, win rate and paired gain vs the baseline; the pairwise judge's win rate, first
    position rate and flips; BLEU and ROUGE-L against references; then KL, length, diversity, EOS."""
    first = results[names[0]]
    judges, n_rms = list(first["judges"]), len(results["settings"]["rm"])
    agreeing = [j for j in judges if "agreement" in first["judges"][j]]
    ref = next((column(j, n_rms) for j in judges if j not in agreeing), None)  # the others agree with this judge
    head = ["model"] + [f"{column(j, n_rms)} {c}" for j in judges
                        for c in ("score ± se", "win rate vs baseline", "gain ± se")]
    head += [f"{column(j, n_rms)} agrees with {ref} ± se" for j in agreeing]
    pairwise_judge = results["settings"]["judge"]
    if pairwise_judge:
        head += ["judge win rate vs baseline ± se", "judge picks A ± se", "judge flips"]
        head += [f"judge agrees with {ref} ± se"] if ref else []
    referenced = "reference" in first
    if referenced:
        head += [f"BLEU ({first['reference']['n']} refs)", "ROUGE-L ± se"]
    head += ["KL to baseline", "length", "distinct-1", "distinct-2", "EOS rate"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def agrees(s):
        return f"{s['agreement']:.2f} ± {s['agreement_se']:.2f} ({s['agreement_n']})" if s["agreement_n"] else "n/a"
    for n in names:
        r = results[n]
        cells = [n]
        for j in judges:
            s = r["judges"][j]
            cells += [f"{s['mean']:.3f} ± {s['se']:.3f}", f"{s['win_rate']:.2f} ± {s['win_se']:.2f}",
                      f"{s['gain']:+.3f} ± {s['gain_se']:.3f}"]
        cells += [agrees(r["judges"][j]) for j in agreeing]
        if pairwise_judge:
            p = r.get("pairwise")  # the baseline's row has none: it is not judged against itself
            cells += [""] * (3 + bool(ref)) if p is None else [
                f"{p['win_rate']:.2f} ± {p['win_se']:.2f}", f"{p['position_a']:.2f} ± {p['position_a_se']:.2f}",
                f"{p['flips']:.2f}"] + ([agrees(p)] if ref else [])
        if referenced:
            m = r["reference"]
            cells += [f"{m['bleu']:.1f}", f"{m['rouge_l']:.3f} ± {m['rouge_l_se']:.3f}"]
        cells += ["n/a" if r["kl"] is None else f"{r['kl']:.2f} ± {r['kl_se']:.2f}", f"{r['length']:.1f}",
                  f"{r['distinct_1']:.3f}",
                  f"{r['distinct_2']:.3f}", f"{r['eos_rate']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(evaluate, Args)
