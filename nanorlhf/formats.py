"""Data formats: read a .json/.jsonl file or a hub dataset, detect each record's format from its fields (`--format`
forces one), and parse it into the examples one stage needs:

    kind        example                                         used by
    sft         SFTExample(prompt, completion)                  train_sft
    pairs       PairExample(prompt, chosen, rejected, margin)   train_rm, train_dpo
    unpaired    UnpairedExample(prompt, completion, label)      train_kto (pairs become chosen=True,
                                                                rejected=False)
    prompts     PromptExample(prompt, columns, conversational)  train_ppo, train_grpo (from any data;
                                                                columns: the record's fields other than those the
                                                                prompt is read from, for reward functions)

A prompt is always a list of {"role": "system"|"user"|"assistant", "content": str} messages, so the
tokenizer's chat template decides how it looks. Formats (see FORMATS for their fields):
alpaca, sharegpt, messages (TRL conversational), prompt_completion and preference (TRL standard),
hh (Anthropic HH transcripts) and ranked (`rank` lower = better; expands to every ordered pair).

data.load_examples is the entry point: it reads the records and parses each with `parse`.
"""
import json
import os
import re
from dataclasses import dataclass, field

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


# ---------------------------------------------------------------- reading records

_WS = re.compile(r"[ \t\n\r]*")


def read_records(path):
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

# The fields each format reads the prompt from, and the three TRL's GRPOTrainer keeps out of the columns it hands its
# reward functions (it passes the prompt and the sampled completions itself). Every other field of a record is a
# column of its prompt, as TRL hands on a dataset's every other column: an `answer`, an alpaca `output`, a KTO
# `label`, a preference pair's `chosen` and `rejected` (hh's too, though its prompt is cut from them).
_PROMPT_FIELDS = {"alpaca": {"instruction", "input", "system", "history"}, "sharegpt": {"conversations"},
                  "messages": {"messages"}, "prompt_completion": set(), "preference": set(), "hh": set(),
                  "ranked": set(), "prompt": set()}
_TRL_OWN = {"prompt", "completion", "completion_ids"}


def _prompt_row(ex, rec, fmt, where):
    """A PromptExample of `ex` carrying the record's other fields as columns, which must survive JSON (checkpoints
    and torchrun ranks re-read the data, and the reward gets them as they are). Records that share a prompt but are
    not prompt-only (preference pairs, say) are one prompt, with the first record's columns (data.load_examples)."""
    columns = {k: v for k, v in rec.items() if k not in _PROMPT_FIELDS[fmt] | _TRL_OWN}
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


def parse(where, rec, kind, format=None):
    """(format, the `kind` examples of record `rec`): its --format, else the one detected from its fields. `where`
    ("file:line") starts every error message."""
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
    examples = []
    for ex in parsed:
        converted = _convert(ex, kind)
        if converted is None:
            what = type(ex).__name__.removesuffix("Example")
            raise UserError(f"{where}: this {fmt} record is {what} data, which cannot be "
                            f"used as {kind}: {kind} needs {_NEEDS[kind]}")
        examples += [_prompt_row(e, rec, fmt, where) if kind == "prompts" else e for e in converted]
    return fmt, examples
