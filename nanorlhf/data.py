"""Data for every stage: read records, normalise them, tokenise, truncate and batch.

load_examples(path, kind) reads a local .json (a list of records) or .jsonl file, or a hub dataset
id through the optional `datasets` package. Each record's format is detected from its fields
(`--format` forces one) and normalised to the examples one stage needs:

    kind        example                                         used by
    sft         SFTExample(prompt, completion)                  train_sft
    pairs       PairExample(prompt, chosen, rejected, margin)   train_rm, train_dpo
    unpaired    UnpairedExample(prompt, completion, label)      train_kto (pairs become chosen=True,
                                                                rejected=False)
    prompts     PromptExample(prompt, columns, conversational)  train_ppo, train_grpo (from any data, deduplicated;
                                                                columns: the record's fields its format does not
                                                                read, for reward functions)

A prompt is always a list of {"role": "system"|"user"|"assistant", "content": str} messages, so the
tokenizer's chat template decides how it looks. Formats (see FORMATS for their fields):
alpaca, sharegpt, messages (TRL conversational), prompt_completion and preference (TRL standard),
hh (Anthropic HH transcripts) and ranked (`rank` lower = better; expands to every ordered pair).

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
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from nanorlhf import dist
from nanorlhf.cli import UserError

KINDS = ("sft", "pairs", "unpaired", "prompts")

# The fields of each format, for --help and for error messages ("?" = optional).
FORMATS = {
    "alpaca": "instruction, input?, output (or chosen + rejected), system?, history? [[q, a], ...]",
    "sharegpt": "conversations [{from, value}] (last turn is the completion), "
                "or conversations + chosen/rejected {from, value}",
    "messages": "messages [{role, content}] (last message is the completion), label? true/false",
    "prompt_completion": "prompt, completion (strings or message lists), label? true/false",
    "preference": "prompt, chosen, rejected (strings or message lists), margin?, "
                  "or chosen/rejected as whole conversations sharing all but the last message",
    "hh": "chosen, rejected: '\\n\\nHuman: ... \\n\\nAssistant: ...' transcripts",
    "ranked": "prompt, responses [str], rank [int or null] (lower rank = better; equal ranks and null give no pair)",
    "prompt": "prompt (string or message list) alone: prompts for PPO",
}

# Used when the tokenizer has no chat template: one block per turn, ending with the
# generation prompt, so the completion follows "### Assistant:\n".
PLAIN_TURN = "### {role}:\n{content}\n\n"
PLAIN_GENERATION_PROMPT = "### Assistant:\n"


@dataclass
class SFTExample:
    prompt: list[dict]
    completion: str


@dataclass
class PairExample:
    prompt: list[dict]
    chosen: str
    rejected: str
    margin: float | None = None  # how much better chosen is, when the data says (RM margin loss)


@dataclass
class UnpairedExample:
    prompt: list[dict]
    completion: str
    label: bool  # True = desirable


@dataclass
class PromptExample:
    prompt: list[dict]
    columns: dict = field(default_factory=dict)  # the row's other fields, handed to reward functions as TRL does
    conversational: bool = False  # the data gave the prompt as messages (TRL's conversational format), not text


class Prompt(NamedTuple):
    """What load_prompts returns per prompt: the messages, their token ids, and the PromptExample's columns and
    conversational flag, which the Rewarder hands to reward functions."""
    messages: list
    ids: list
    columns: dict = {}
    conversational: bool = False


# ---------------------------------------------------------------- reading records

_WS = re.compile(r"[ \t\n\r]*")


def _read_records(path):
    """[(where, record)], `where` being "file:line" of the record, for error messages."""
    if not os.path.exists(path):
        if "/" in path and not path.endswith((".json", ".jsonl")):
            return _read_hub(path)
        raise UserError(f"data file not found: {path}")
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder; expected a .json or .jsonl data file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".jsonl") or text.lstrip().startswith("{"):  # many ".json" files are JSON lines
        return _read_jsonl(path, text)
    return _read_json_list(path, text)


def _read_jsonl(path, text):
    out = []
    for i, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if line.strip():
            try:
                out.append((f"{path}:{i}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{i}: malformed JSON ({e.msg}, column {e.colno})") from None
    return out


def _read_json_list(path, text):
    """Walk a JSON list one record at a time, so each record knows the line its `{` starts on."""
    decoder, out = json.JSONDecoder(), []
    pos = _WS.match(text).end()
    if not text.startswith("[", pos):
        raise UserError(f"{path}: expected a JSON list of records [{{...}}, ...] (or use a .jsonl file)")
    pos, line, counted = _WS.match(text, pos + 1).end(), 1, 0
    try:
        while not text.startswith("]", pos):
            line += text.count("\n", counted, pos)
            counted = pos
            record, pos = decoder.raw_decode(text, pos)
            out.append((f"{path}:{line}", record))
            pos = _WS.match(text, pos).end()
            if text.startswith(",", pos):
                pos = _WS.match(text, pos + 1).end()
            elif not text.startswith("]", pos):
                raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
    return out


def _read_hub(name):
    try:
        import datasets
    except ImportError:
        raise UserError(f"{name} is not a local file, and loading it from the hub needs the "
                        "`datasets` package (pip install datasets)") from None
    try:
        rows = datasets.load_dataset(name, split="train")
    except Exception as e:  # offline, no such dataset, gated: all for the user to fix
        raise UserError(f"could not load hub dataset {name}: {type(e).__name__}: {e}".split("\n")[0]) from None
    return [(f"{name} row {i}", dict(r)) for i, r in enumerate(rows)]


# ---------------------------------------------------------------- parsing one record

_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


def _detect(rec):
    """The format whose distinctive fields the record has, or None."""
    keys = set(rec)
    if "conversations" in keys:
        return "sharegpt"
    if "messages" in keys:
        return "messages"
    if "instruction" in keys:
        return "alpaca"
    if {"responses", "rank"} <= keys:
        return "ranked"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if {"chosen", "rejected"} <= keys:
        return "hh" if "prompt" not in keys and isinstance(rec["chosen"], str) else "preference"
    if "prompt" in keys:
        return "prompt"
    return None


def _str(rec, key):
    if not isinstance(rec[key], str):
        raise ValueError(f"field {key!r} must be a string, got {type(rec[key]).__name__}")
    return rec[key]


def _msg(m, role="role", content="content"):
    if not (isinstance(m, dict) and m.get(role) in _ROLES and isinstance(m.get(content), str)):
        raise ValueError(f"expected a message {{{role}: system/user/assistant, {content}: str}}, got {str(m)[:80]}")
    return {"role": _ROLES[m[role]], "content": m[content]}


def _messages(x, what, role="role", content="content"):
    """A prompt given as a string (one user turn) or as a list of messages."""
    if isinstance(x, str):
        return [{"role": "user", "content": x}]
    if isinstance(x, list):
        return [_msg(m, role, content) for m in x]
    raise ValueError(f"{what} must be a string or a list of messages")


def _reply(x, what):
    """A completion: a string, or TRL's conversational [{"role": "assistant", "content": ...}]."""
    if isinstance(x, str):
        return x
    if isinstance(x, list) and len(x) == 1 and _msg(x[0])["role"] == "assistant":
        return x[0]["content"]
    raise ValueError(f"{what} must be a string or a list of one assistant message")


def _one(prompt, completion, rec):
    """An SFT example, or an unpaired one when the record carries a KTO label."""
    if "label" not in rec:
        return SFTExample(prompt, completion)
    if not isinstance(rec["label"], bool):
        raise ValueError(f"label must be true or false, got {rec['label']!r}")
    return UnpairedExample(prompt, completion, rec["label"])


def _conversation(rec, key, role="role", content="content"):
    """A conversation whose last message, the assistant's, is the completion."""
    msgs = _messages(rec[key], key, role, content)
    if not msgs or msgs[-1]["role"] != "assistant":
        raise ValueError(f"{key} must end with an assistant message (the completion)")
    return [_one(msgs[:-1], msgs[-1]["content"], rec)]


def _pair(prompt, chosen, rejected, rec):
    margin = rec.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        raise ValueError(f"margin must be a number, got {margin!r}")
    return PairExample(prompt, chosen, rejected, None if margin is None else float(margin))


def _alpaca(rec):
    prompt = [{"role": "system", "content": _str(rec, "system")}] if rec.get("system") else []
    for q, a in rec.get("history") or []:
        prompt += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    user = _str(rec, "instruction") + ("\n\n" + _str(rec, "input") if rec.get("input") else "")
    prompt.append({"role": "user", "content": user})
    if "chosen" in rec:
        return [_pair(prompt, _reply(rec["chosen"], "chosen"), _reply(rec["rejected"], "rejected"), rec)]
    return [_one(prompt, _str(rec, "output"), rec)]


def _sharegpt(rec):
    if "chosen" not in rec:
        return _conversation(rec, "conversations", "from", "value")
    prompt = _messages(rec["conversations"], "conversations", "from", "value")
    chosen, rejected = _msg(rec["chosen"], "from", "value"), _msg(rec["rejected"], "from", "value")
    if chosen["role"] != "assistant" or rejected["role"] != "assistant":
        raise ValueError("chosen and rejected must be gpt/assistant turns")
    return [_pair(prompt, chosen["content"], rejected["content"], rec)]


def _prompt_completion(rec):
    return [_one(_messages(rec["prompt"], "prompt"), _reply(rec["completion"], "completion"), rec)]


def _preference(rec):
    if "prompt" in rec:
        chosen, rejected = _reply(rec["chosen"], "chosen"), _reply(rec["rejected"], "rejected")
        return [_pair(_messages(rec["prompt"], "prompt"), chosen, rejected, rec)]
    # TRL's implicit prompt: two whole conversations; their shared prefix is the prompt.
    chosen, rejected = _messages(rec["chosen"], "chosen"), _messages(rec["rejected"], "rejected")
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    if not (len(chosen) == len(rejected) == k + 1 and chosen[k]["role"] == rejected[k]["role"] == "assistant"):
        raise ValueError("without a prompt field, chosen and rejected must be message lists "
                         "that share every message but a last assistant reply")
    return [_pair(chosen[:k], chosen[k]["content"], rejected[k]["content"], rec)]


_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_REPLY = "\n\nAssistant:"


def _hh(rec):
    # Split at the last "\n\nAssistant:" the two transcripts share, not at the last one in each:
    # real HH replies sometimes contain "\n\nAssistant:" themselves.
    chosen, rejected = _str(rec, "chosen"), _str(rec, "rejected")
    cut = os.path.commonprefix([chosen, rejected]).rfind(_HH_REPLY)
    parts = _HH_TURN.split(chosen[:max(cut, 0)])  # ["", role, content, role, content, ...]
    if cut < 0 or parts[0].strip():
        raise ValueError("chosen and rejected must be '\\n\\nHuman: ... \\n\\nAssistant: ...' transcripts "
                         "that share every turn but the last Assistant reply")
    prompt = [{"role": "user" if r == "Human" else "assistant", "content": c.strip()}
              for r, c in zip(parts[1::2], parts[2::2])]
    cut += len(_HH_REPLY)
    return [_pair(prompt, chosen[cut:].strip(), rejected[cut:].strip(), rec)]


def _ranked(rec):
    responses, rank = rec["responses"], rec["rank"]
    if not (isinstance(responses, list) and isinstance(rank, list) and len(responses) == len(rank)
            and all(r is None or isinstance(r, (int, float)) and not isinstance(r, bool) for r in rank)):
        raise ValueError("responses and rank must be lists of the same length, rank holding numbers or null")
    prompt, responses = _messages(rec["prompt"], "prompt"), [_reply(r, "each response") for r in responses]
    # Equal ranks are a tie and null is unranked (nanorlhf.label: an unfinished response): neither makes a pair.
    ranked = [i for i in range(len(responses)) if rank[i] is not None]
    return [_pair(prompt, responses[i], responses[j], {}) for i in ranked for j in ranked if rank[i] < rank[j]]


_PARSERS = {"alpaca": _alpaca, "sharegpt": _sharegpt, "messages": lambda rec: _conversation(rec, "messages"),
            "prompt_completion": _prompt_completion, "preference": _preference, "hh": _hh, "ranked": _ranked,
            "prompt": lambda rec: [PromptExample(_messages(rec["prompt"], "prompt"))]}

# The fields each format reads; any other field of a record is a column of its prompt (TRL hands a dataset's extra
# columns, e.g. `answer`, to its reward functions).
_READS = {"alpaca": {"instruction", "input", "output", "chosen", "rejected", "system", "history"},
          "sharegpt": {"conversations", "chosen", "rejected"}, "messages": {"messages", "label"},
          "prompt_completion": {"prompt", "completion", "label"},
          "preference": {"prompt", "chosen", "rejected", "margin"},
          "hh": {"chosen", "rejected"}, "ranked": {"prompt", "responses", "rank"}, "prompt": {"prompt"}}


def _prompt_row(ex, rec, fmt, where):
    """A PromptExample of `ex` carrying the record's other fields as columns, which must survive JSON (checkpoints
    and torchrun ranks re-read the data, and the reward gets them as they are)."""
    columns = {k: v for k, v in rec.items() if k not in _READS[fmt]}
    for k, v in columns.items():
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            raise UserError(f"{where}: column {k!r} holds a {type(v).__name__}; expected a number, string, bool, "
                            "null or a list/object of them") from None
    conversational = fmt in ("sharegpt", "messages") or any(isinstance(rec.get(k), list) for k in ("prompt", "chosen"))
    return PromptExample(ex.prompt, columns, conversational)


_NEEDS = {
    "sft": "a prompt and one completion (or pairs, whose chosen reply is used)",
    "pairs": "chosen and rejected replies (preference, hh, ranked, or alpaca/sharegpt with chosen/rejected)",
    "unpaired": "a completion with a true/false label (messages or prompt_completion + label), or pairs",
    "prompts": "a prompt",
}


def _convert(ex, kind):
    """`ex` as examples of `kind`, or None when that kind cannot be made from it."""
    if kind == "prompts":
        return [PromptExample(ex.prompt)]
    if isinstance(ex, PairExample):
        if kind == "pairs":
            return [ex]
        if kind == "sft":
            return [SFTExample(ex.prompt, ex.chosen)]
        if kind == "unpaired":  # KTO on preference data: chosen is desirable, rejected is not
            return [UnpairedExample(ex.prompt, ex.chosen, True), UnpairedExample(ex.prompt, ex.rejected, False)]
    if (kind, type(ex)) in (("sft", SFTExample), ("unpaired", UnpairedExample)):
        return [ex]
    return None


def load_examples(path, kind, format=None, limit=None):
    """Read `path` (a .json/.jsonl file or hub dataset id) as a list of `kind` examples."""
    assert kind in KINDS, kind
    if format is not None and format not in FORMATS:
        raise UserError(f"unknown --format {format}; choose from {', '.join(FORMATS)}")
    examples, seen_prompts = [], set()
    for where, rec in _read_records(path):
        fmt = format or (_detect(rec) if isinstance(rec, dict) else None)
        if fmt is None:
            fields = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
            raise UserError(f"{where}: cannot tell the format of a record with fields {fields}; accepted "
                            "formats: " + " | ".join(f"{k}: {v}" for k, v in FORMATS.items()))
        try:
            if not isinstance(rec, dict):
                raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
            parsed = _PARSERS[fmt](rec)
        except (KeyError, TypeError, ValueError) as e:
            problem = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise UserError(f"{where}: {problem} ({fmt} format: {FORMATS[fmt]})") from None
        for ex in parsed:
            converted = _convert(ex, kind)
            if converted is None:
                what = type(ex).__name__.removesuffix("Example")
                raise UserError(f"{where}: this {fmt} record is {what} data, which cannot be "
                                f"used as {kind}: {kind} needs {_NEEDS[kind]}")
            for e in converted:
                if kind == "prompts":  # PPO samples each prompt; a prompt shared by many pairs counts once
                    e = _prompt_row(e, rec, fmt, where)
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

        SFTExample       (prompt_ids, completion_ids)
        PairExample      (prompt_ids, chosen_ids, rejected_ids, margin)
        UnpairedExample  (prompt_ids, completion_ids, label)
        PromptExample    prompt_ids

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
            rows.append((prompt, outs[0], outs[1], ex.margin))
        elif isinstance(ex, UnpairedExample):
            rows.append((prompt, outs[0], ex.label))
        else:
            rows.append((prompt, outs[0]) if outs else prompt)
    stats.kept = len(rows)
    if examples and not rows:
        raise UserError(f"all {len(examples)} examples in {source} are longer than --max-length {max_length}")
    return rows, stats


# ---------------------------------------------------------------- batching


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
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(args.seed)).tolist()
        n_eval = int(len(examples) * args.eval_frac) if len(examples) > 1 else 0
        held_out = [examples[i] for i in order[:n_eval]]
        examples = [examples[i] for i in sorted(order[n_eval:])]
    train_rows, stats = tokenize(examples, tokenizer, args.max_length, args.data)
    print(f"train data {args.data}: {stats}")
    eval_rows = tokenize(held_out, tokenizer, args.max_length, args.eval_data or args.data)[0] if held_out else []
    return train_rows, eval_rows[dist.rank()::dist.world()]


def collate(seqs, pad_id):
    """Right-padded batch of (prompt_ids, completion_ids) rows.

    Returns long tensors (B, T): input_ids, attention_mask, and targets where targets[b, t] is
    input_ids[b, t + 1] when that is a completion token (EOS included) and -100 otherwise, so
    hidden[:, t] predicts targets[:, t]. Masks come from lengths, never from pad_id, because pad
    may equal EOS (SmolLM2). For pairs, stack chosen rows then rejected rows:
        collate([(p, c) for p, c, r, m in rows] + [(p, r) for p, c, r, m in rows], pad_id)
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
