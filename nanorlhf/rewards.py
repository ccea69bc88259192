"""The reward of a response: a weighted sum of reward models and Python functions, in one place for PPO, GRPO,
the labeller (`python -m nanorlhf.label`) and the evaluation.

A reward function is named `module:function`: a verifiable reward (an exact answer, a format) or a programmatic
judge such as `nanorlhf.gold:sentiment`. It is called as TRL's GRPOTrainer calls one, with keyword arguments
prompts, completions, completion_ids and every other column of the prompt's row as a list (e.g. answer=[...]),
and returns one float per completion, or None where it does not apply; a function whose signature is
f(prompts, responses) (no `completions`, no **kwargs) gets two lists of strings instead, the last user message
and the decoded response.
"""
import importlib
import inspect
import os
import sys

import torch

from . import dist
from . import model as M
from .cli import UserError
from .data import Prompt, render_prompt


def load_reward_fn(spec, flag="--reward-fn"):
    """The function named by 'module:function'; modules in the current folder are found too."""
    module, _, name = spec.partition(":")
    if not (module and name):
        raise UserError(f"{flag} {spec}: expected module:function, e.g. nanorlhf.gold:sentiment")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"{flag} {spec}: cannot import it ({e}); expected module:function") from None


class RewardFunction:
    """One --reward-fn: called in TRL's GRPOTrainer contract when its signature asks for it (a `completions`
    parameter or **kwargs): keyword arguments prompts, completions, completion_ids and every column of the prompt's
    row as a list, returning a float or None ("does not apply") per completion. Otherwise as f(prompts, responses)
    on two lists of strings, the last user message and the decoded response, as nanorlhf always called it."""

    def __init__(self, spec, weight=1.0, flag="--reward-fn"):
        self.spec, self.weight, self.flag = spec, weight, flag
        self.fn = load_reward_fn(spec, flag)
        self.name = getattr(self.fn, "__name__", spec.partition(":")[2])  # TRL logs each under its __name__
        params = inspect.signature(self.fn).parameters.values()
        # the keyword arguments it accepts (None: any, it has **kwargs), and those it cannot do without
        self.accepts = None if any(p.kind is p.VAR_KEYWORD for p in params) else {p.name for p in params}
        self.required = [p.name for p in params if p.default is p.empty
                         and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        self.trl = self.accepts is None or "completions" in self.accepts

    def __call__(self, rows, texts, completion_ids):
        """(B,) float tensor, NaN where the function returned None. rows: the Prompt of each response."""
        if not self.trl:
            values = self.fn([r.messages[-1]["content"] for r in rows], texts)
        else:
            values = self._call_trl(rows, texts, completion_ids)
        return self._check(values, len(texts))

    def _call_trl(self, rows, texts, completion_ids):
        """Standard data (a prompt given as text) gets strings; conversational data gets message lists, the
        completion as [{"role": "assistant", "content": text}], as TRL passes them."""
        kwargs = {"prompts": [r.messages if r.conversational else r.messages[-1]["content"] for r in rows],
                  "completions": [[{"role": "assistant", "content": t}] if r.conversational else t
                                  for r, t in zip(rows, texts)],
                  "completion_ids": completion_ids}
        columns = dict.fromkeys(k for r in rows for k in r.columns)  # every row's, in order; a row without one: None
        kwargs |= {k: [r.columns.get(k) for r in rows] for k in columns if k not in kwargs}
        missing = [name for name in self.required if name not in kwargs]
        if missing:
            self._no_column(missing[0], columns)
        if self.accepts is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in self.accepts}
        try:
            return self.fn(**kwargs)
        except KeyError as e:  # a **kwargs function reading kwargs["answer"] on data without that column
            if self.accepts is None and e.args and isinstance(e.args[0], str) and e.args[0] not in kwargs:
                self._no_column(e.args[0], columns)
            raise

    def _no_column(self, name, columns):
        have = ", ".join(columns) or "none besides the prompt"
        raise UserError(f"{self.flag} {self.spec} needs the column {name!r}, which the data lacks (its columns: "
                        f"{have}); add it to each record of --data")

    def _check(self, values, n):
        values = list(values)  # a generator would be spent by the first pass below
        try:
            none = torch.tensor([v is None for v in values], dtype=torch.bool)
            scores = torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float)
        except (TypeError, ValueError):
            raise UserError(f"{self.flag} {self.spec}: the function must return one number (or None) per response") \
                from None
        if len(scores) != n:
            raise UserError(f"{self.flag} {self.spec}: the function returned {len(scores)} values for {n} responses")
        bad = int((~torch.isfinite(scores) & ~none).sum())
        if bad:  # the NaN guard would skip every step it reaches: a run that trains nothing, in silence
            raise UserError(f"{self.flag} {self.spec} returned NaN or inf for {bad} of {n} responses; expected a "
                            "finite number (or None where it does not apply) for each")
        return scores


def part_means(parts, prefix=None):
    """{prefix/part: mean} (without a prefix {part: mean}) of each judge's part, or of the score, over every rank's
    samples where it applies (a reward function's None is NaN there and left out), so that a rank whose share no
    function applied to does not make the logged mean NaN. A part that applied nowhere this step is left out. The
    same on every rank."""
    out = {}
    for name, part in parts.items():
        total, n = dist.all_sum(torch.stack([part.float().nansum(), (~part.isnan()).sum().float()]))
        if n:
            out[f"{prefix}/{name}" if prefix else name] = (total / n).item()
    return out


class Rewarder:
    """score = Σ_i w_i · RM_i(prompt, response), normalised with each RM's stored statistics, + Σ_j v_j · f_j.

    Each part is also returned on its own ("rm", "rm2", ..., and each reward function under its name) so a run can
    log what drives its score, and with gold_fn a "gold" part that is not in the score: a known true reward watched
    beside the proxy that is optimised, where overoptimisation shows (Gao et al. 2023). A function's None (it does
    not apply to that sample) is NaN in its part and adds nothing to the score, as TRL's nansum over functions. A
    response that no function applies to (every one returned None) and no RM scores has no score at all: NaN, as
    TRL >= 1.6 marks it, never a 0 that would pass for a verdict. `unscored` says what the caller does with those,
    for the warning that counts them.
    """

    def __init__(self, tokenizer, rms=(), weights=(), reward_fn=(), gold_fn=None, reward_weights=(),
                 unscored="so they have no score", **load_kw):
        weights = list(weights) or [1.0] * len(rms)
        if len(weights) != len(rms):
            raise UserError(f"--rm-weight: got {len(weights)} weights for {len(rms)} --rm models")
        specs = [reward_fn] if isinstance(reward_fn, str) else list(reward_fn or ())
        reward_weights = list(reward_weights) or [1.0] * len(specs)
        if len(reward_weights) != len(specs):
            raise UserError(f"--reward-weight: got {len(reward_weights)} weights for {len(specs)} --reward-fn "
                            "functions; expected one per function, in order")
        self.tokenizer, self.rms, self.unscored = tokenizer, [], unscored
        for path, w in zip(rms, weights):
            rm, rm_tok = M.load_reward_model(path, **load_kw)
            self.rms.append((rm, rm_tok, w))
        self.fns = [RewardFunction(spec, w) for spec, w in zip(specs, reward_weights)]
        self.gold = RewardFunction(gold_fn, flag="--gold-reward-fn") if gold_fn else None
        if not self.rms and not self.fns:
            raise UserError("give a reward: --rm FOLDER (repeatable) and/or --reward-fn module:function (repeatable)")
        taken = {"rm" if i == 0 else f"rm{i + 1}" for i in range(len(self.rms))} | {"gold"}
        for f in self.fns:  # each part is logged under its name, so two must not share one
            if f.name in taken:
                raise UserError(f"--reward-fn {f.spec}: another reward already logs under the name {f.name!r}; "
                                "expected functions with distinct names")
            taken.add(f.name)

    def same_tokenizer(self, i=0, tokenizer=None):
        """True when RM i reads the policy's token ids as they are (same vocabulary and chat template)."""
        tok, rm_tok = tokenizer or self.tokenizer, self.rms[i][1]
        return rm_tok.get_vocab() == tok.get_vocab() and rm_tok.chat_template == tok.chat_template

    @torch.no_grad()
    def __call__(self, prompts, queries, responses, ended, batch_size, tokenizer=None):
        """(scores (B,), {part: (B,)}, texts) for prompts (data.Prompt rows, or bare message lists, and their token
        ids) and responses (token-id lists cut after EOS; `ended` says which ones emitted it), both in
        `tokenizer`'s ids (default the policy's). A score is NaN where no judge applies."""
        tokenizer = tokenizer or self.tokenizer
        rows = [p if isinstance(p, Prompt) else Prompt(p, q) for p, q in zip(prompts, queries)]
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        ids, parts = [list(r) for r in responses], {}
        scores = torch.zeros(len(texts))
        for i, (rm, rm_tok, weight) in enumerate(self.rms):
            if self.same_tokenizer(i, tokenizer):  # score exactly the sampled ids
                seqs = [list(q) + list(r) for q, r in zip(queries, responses)]
            else:  # another tokenizer: re-encode the conversation as text
                seqs = [render_prompt(rm_tok, r.messages) + rm_tok(t, add_special_tokens=False).input_ids +
                        ([rm_tok.eos_token_id] if e else []) for r, t, e in zip(rows, texts, ended)]
            parts["rm" if i == 0 else f"rm{i + 1}"] = part = M.score_sequences(rm, seqs, rm_tok.pad_token_id,
                                                                               batch_size)
            scores = scores + weight * part.float().cpu()
        for f in self.fns:
            parts[f.name] = part = f(rows, texts, ids)
            scores = scores + f.weight * part.nan_to_num(0.0)  # None: no contribution (TRL's nansum)
        if self.fns and not self.rms:
            unscored = torch.stack([parts[f.name] for f in self.fns]).isnan().all(0)
            scores[unscored] = float("nan")
            # counted over every rank and said once (torchrun: each rank holds its share of the batch)
            n_unscored, n = (int(x) for x in dist.all_sum(torch.tensor([unscored.sum().item(), len(texts)])))
            if n_unscored and dist.is_main():  # as TRL warns
                first = (f"; e.g. the prompt {rows[int(unscored.nonzero()[0])].messages[-1]['content'][:80]!r}"
                         if unscored.any() else "")
                print(f"warning: no --reward-fn applies to {n_unscored} of {n} responses (every function returned "
                      f"None), {self.unscored}{first}", file=sys.stderr)
        if self.gold is not None:  # logged, never optimised
            parts["gold"] = self.gold(rows, texts, ids)
        return scores, parts, texts
