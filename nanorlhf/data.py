"""Data for every stage: examples, tokenised, truncated and batched.

load_examples(path, kind) reads a local .json (a list of records) or .jsonl file, or a hub dataset
id through the optional `datasets` package, as the examples one stage needs: SFTExample, PairExample,
UnpairedExample or PromptExample (prompts deduplicated). How each record's format is detected and parsed
is nanorlhf/formats.py's business.

tokenize(examples, tokenizer, max_length) renders the prompt through the chat template and tokenises
the completion separately, followed by EOS so the model learns to stop. `max_length` bounds
prompt + completion tokens:
  - fits: kept as is;
  - the prompt alone is longer than max_length: skipped (there is no room for any response);
  - otherwise truncated: the prompt keeps its last max(max_length - len(completion),
    min(len(prompt), max_length // 2)) tokens (the end of a conversation matters most), and the
    completion is cut from the right to fill the rest, EOS included: an unfinished answer must
    not be taught to end. Pairs budget for the longer of chosen/rejected and cut both alike.

load_data(args, kind, tokenizer) is what the offline stages call: tokenised (train, held-out) rows.
"""
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch

from nanorlhf import dist
from nanorlhf.cli import UserError
from nanorlhf.formats import FORMATS, KINDS, PairExample, UnpairedExample, parse, read_records

# Used when the tokenizer has no chat template: one block per turn, ending with the
# generation prompt, so the completion follows "### Assistant:\n".
PLAIN_TURN = "### {role}:\n{content}\n\n"
PLAIN_GENERATION_PROMPT = "### Assistant:\n"


class SFTRow(NamedTuple):
    """A tokenised SFTExample: token ids; the completion ends with EOS."""
    prompt: list
    completion: list


class PairRow(NamedTuple):
    """A tokenised PairExample: both replies end with EOS."""
    prompt: list
    chosen: list
    rejected: list
    margin: float | None


class UnpairedRow(NamedTuple):
    """A tokenised UnpairedExample: the completion ends with EOS; label True = desirable."""
    prompt: list
    completion: list
    label: bool


class Prompt(NamedTuple):
    """What load_prompts returns per prompt: the messages, their token ids, and the PromptExample's columns and
    conversational flag, which the Rewarder hands to reward functions."""
    messages: list
    ids: list
    columns: dict = {}
    conversational: bool = False


def load_examples(path, kind, format=None, limit=None):
    """Read `path` (a .json/.jsonl file or hub dataset id) as a list of `kind` examples (nanorlhf/formats.py)."""
    assert kind in KINDS, kind
    if format is not None and format not in FORMATS:
        raise UserError(f"unknown --format {format}; choose from {', '.join(FORMATS)}")
    examples, seen_prompts = [], set()
    for where, rec in read_records(path):
        fmt, parsed = parse(where, rec, kind, format)
        for e in parsed:
            if kind == "prompts":  # PPO samples each prompt; a prompt shared by many pairs counts once
                # prompt-only rows that differ in a column (an answer) are two tasks; pairs that differ in their
                # scores or ids are one prompt
                key = json.dumps([e.prompt, e.columns] if fmt == "prompt" else e.prompt)
                if key in seen_prompts:
                    continue
                seen_prompts.add(key)
            examples.append(e)
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise UserError(f"{path}: the dataset is empty")
    return examples[:limit]


# ---------------------------------------------------------------- tokenising


def render_prompt(tokenizer, messages):
    """Token ids of `messages` followed by the assistant's generation prompt."""
    if getattr(tokenizer, "chat_template", None) is not None:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, Mapping):  # transformers 5 returns a BatchEncoding here
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    text = "".join(PLAIN_TURN.format(role=m["role"].capitalize(), content=m["content"]) for m in messages)
    ids = tokenizer(text + PLAIN_GENERATION_PROMPT, add_special_tokens=False).input_ids
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer("x").input_ids[:1] == [bos]:  # only if this tokenizer adds BOS itself
        ids = [bos] + ids
    return ids


def load_prompts(path, tokenizer, max_length, format=None, limit=None, flag="--max-length"):
    """[Prompt(messages, token ids, columns, conversational)] of the first `limit` prompts in `path` that fit
    `max_length` tokens (any data that carries prompts; each distinct row once). Longer ones are skipped, and the
    count is printed."""
    examples = load_examples(path, "prompts", format)
    # every row gets every column (None where its record has none), so that a batch of rows without one still
    # passes it to a reward function, which may return None for them
    keys = dict.fromkeys(k for ex in examples for k in ex.columns)
    prompts = [Prompt(ex.prompt, ids, {k: ex.columns.get(k) for k in keys}, ex.conversational) for ex in examples
               if len(ids := render_prompt(tokenizer, ex.prompt)) <= max_length]
    print(f"prompts {path}: {len(prompts)} of {len(examples)} fit {flag} {max_length}"
          + (f"; using the first {limit}" if limit is not None and limit < len(prompts) else ""))
    if not prompts:
        raise UserError(f"all {len(examples)} prompts in {path} are longer than {flag} {max_length}")
    return prompts[:limit]


@dataclass
class TokenStats:
    kept: int = 0  # rows returned, truncated ones included
    truncated: int = 0
    skipped: int = 0
    max_length: int | None = None

    def __str__(self):
        s = f"kept {self.kept} ({self.truncated} truncated), skipped {self.skipped}"
        return s + (f" (prompt longer than --max-length {self.max_length})" if self.skipped else "")


def _fit(prompt, outs, max_length):
    """(prompt, outs, truncated) cut to max_length as the module docstring says, or None to skip."""
    if max_length is None:
        return prompt, outs, False
    if len(prompt) > max_length:
        return None
    longest = max(map(len, outs), default=0)
    if len(prompt) + longest <= max_length:
        return prompt, outs, False
    keep = max(max_length - longest, min(len(prompt), max_length // 2))
    return prompt[len(prompt) - keep:], [o[:max_length - keep] for o in outs], True


def tokenize(examples, tokenizer, max_length=None, source="the dataset"):
    """Token ids of `examples` (all of one kind) and TokenStats. One row per kept example:

        SFTExample       SFTRow(prompt, completion)
        PairExample      PairRow(prompt, chosen, rejected, margin)
        UnpairedExample  UnpairedRow(prompt, completion, label)
        PromptExample    the prompt's ids

    Completions end with EOS. `source` names the data in the all-skipped error.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no EOS token, so completions cannot be taught to end")
    rows, stats = [], TokenStats(max_length=max_length)
    for ex in examples:
        prompt = render_prompt(tokenizer, ex.prompt)
        if isinstance(ex, PairExample):
            texts = [ex.chosen, ex.rejected]
        else:
            texts = [ex.completion] if hasattr(ex, "completion") else []  # PromptExample has none
        outs = [tokenizer(t, add_special_tokens=False).input_ids + [eos] for t in texts]
        fitted = _fit(prompt, outs, max_length)
        if fitted is None:
            stats.skipped += 1
            continue
        prompt, outs, truncated = fitted
        stats.truncated += truncated
        if isinstance(ex, PairExample):
            rows.append(PairRow(prompt, outs[0], outs[1], ex.margin))
        elif isinstance(ex, UnpairedExample):
            rows.append(UnpairedRow(prompt, outs[0], ex.label))
        else:
            rows.append(SFTRow(prompt, outs[0]) if outs else prompt)
    stats.kept = len(rows)
    if examples and not rows:
        raise UserError(f"all {len(examples)} examples in {source} are longer than --max-length {max_length}")
    return rows, stats


# ---------------------------------------------------------------- a stage's rows


def split_by_prompt(examples, eval_frac, seed):
    """(held_out, train): a seeded `eval_frac` of the examples held out, whole prompts at a time, so that no eval
    example shares its prompt with a training one (a ranked or KTO file gives each prompt several; a split by example
    would grade the model on prompts it trained on). Prompts are drawn in a seeded random order until the held-out
    examples reach eval_frac of all, never taking the last prompt; with one example per prompt this is a plain
    seeded split by example. Training examples keep their order."""
    groups = {}  # prompt -> its examples' indices, in first-seen order
    for i, e in enumerate(examples):
        groups.setdefault(json.dumps(e.prompt), []).append(i)
    groups = list(groups.values())
    n_eval = int(len(examples) * eval_frac) if len(examples) > 1 else 0
    held = []
    for g in torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).tolist():
        if len(held) >= n_eval or len(held) + len(groups[g]) >= len(examples):
            break
        held += groups[g]
    kept = sorted(set(range(len(examples))) - set(held))
    return [examples[i] for i in held], [examples[i] for i in kept]


def load_data(args, kind, tokenizer):
    """Tokenised (train, eval) rows: --eval-data, else a seeded --eval-frac slice held out of --data. Under torchrun
    each rank gets every training row (the Loop hands out shares of each batch) and every world-th eval row, maybe
    none (each stage's evaluation sums its totals over ranks; a rank without rows takes part with zeros)."""
    if not args.data:
        raise UserError("--data is required: a .json/.jsonl file or a hub dataset id")
    examples = load_examples(args.data, kind, args.format, args.limit)
    if args.eval_data:
        held_out = load_examples(args.eval_data, kind, args.format)
    else:
        held_out, examples = split_by_prompt(examples, args.eval_frac, args.seed)
    train_rows, stats = tokenize(examples, tokenizer, args.max_length, args.data)
    print(f"train data {args.data}: {stats}")
    eval_rows = tokenize(held_out, tokenizer, args.max_length, args.eval_data or args.data)[0] if held_out else []
    return train_rows, eval_rows[dist.rank()::dist.world()]


# ---------------------------------------------------------------- batching


def collate(seqs, pad_id):
    """Right-padded batch of (prompt_ids, completion_ids) rows.

    Returns long tensors (B, T): input_ids, attention_mask, and targets where targets[b, t] is
    input_ids[b, t + 1] when that is a completion token (EOS included) and -100 otherwise, so
    hidden[:, t] predicts targets[:, t]. Masks come from lengths, never from pad_id, because pad
    may equal EOS (SmolLM2). For PairRows, stack the chosen rows then the rejected ones:
        collate([(r.prompt, r.chosen) for r in rows] + [(r.prompt, r.rejected) for r in rows], pad_id)
    """
    B, T = len(seqs), max(len(p) + len(c) for p, c in seqs)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    targets = torch.full((B, T), -100, dtype=torch.long)
    for b, (p, c) in enumerate(seqs):
        n = len(p) + len(c)
        input_ids[b, :n] = torch.tensor(list(p) + list(c), dtype=torch.long)
        attention_mask[b, :n] = 1
        start = max(len(p) - 1, 0)  # the last prompt position predicts the first completion token
        targets[b, start:n - 1] = input_ids[b, start + 1:n]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "targets": targets}


def by_length(fn, rows, length, batch_size):
    """fn over `rows` in batches of `batch_size` rows of similar length(row) (sorted, stable), so that little of a
    forward is padding; fn's (n,) outputs concatenated, back in the rows' order."""
    order = sorted(range(len(rows)), key=lambda i: length(rows[i]))
    out = torch.cat([fn([rows[j] for j in order[i:i + batch_size]]) for i in range(0, len(rows), batch_size)])
    return out[torch.argsort(torch.tensor(order, device=out.device))]
