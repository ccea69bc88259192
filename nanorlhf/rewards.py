"""The reward of a response: a weighted sum of reward models and Python functions, in one place for PPO, GRPO,
the labeller (`python -m nanorlhf.label`) and the evaluation.

A reward function is named `module:function`: a verifiable reward (an exact answer, a format) or a programmatic
judge such as `nanorlhf.gold:sentiment`. It is called as TRL's GRPOTrainer calls one, with keyword arguments
prompts, completions, completion_ids and every other column of the prompt's row as a list (e.g. answer=[...]),
in a training run also trainer_state, log_metric and log_extra, and returns one float per completion, or None
where it does not apply; an `async def` function is awaited, all of them concurrently, as TRL gathers them. A
function written to nanorlhf's own contract, f(prompts, responses) (a `responses` parameter and no `completions`,
with or without **kwargs), gets two lists of strings instead, the last user message and the decoded response.
Which contract each function is called with is said once, at its first call.
"""
import asyncio
import importlib
import inspect
import os
import sys
import threading
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import dist
from . import model as M
from .cli import UserError
from .data import Prompt, render_prompt

# TRL's keywords that are not columns of the data, and why a function that needs one can be without it here
NOT_COLUMNS = {
    "trainer_state": "only a training run (train_grpo.py, train_ppo.py) has a step and an epoch to pass",
    "log_metric": "only a training run (train_grpo.py, train_ppo.py) has a metrics log to feed",
    "log_extra": "only a training run (train_grpo.py, train_ppo.py) has a samples table to show it in",
    "environments": "TRL passes it only with an environment_factory (tool-calling rollouts), and nanorlhf samples "
                    "no tool calls, so there are none to pass",
}


@dataclass
class TrainerState:
    """What a reward function reads from TRL's `trainer_state` (transformers' TrainerState), as far as a run here has
    it: the iterations finished before this one, the run's iterations, and the passes over the prompts so far, this
    iteration's included. For rewards that change with training progress."""
    global_step: int
    max_steps: int
    epoch: float

    @classmethod
    def of(cls, loop):
        stream = loop.stream
        return cls(loop.step, loop.total_steps, stream.epoch + stream.pos / stream.n)


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


_LOOP = None


def event_loop():
    """The one asyncio loop, on a daemon thread, that every async reward function runs on for the life of the
    process (as TRL): a client a function keeps between calls stays on one loop, and it runs even where the caller
    has a loop of its own running (a notebook), where asyncio.run would refuse."""
    global _LOOP
    if _LOOP is None:
        _LOOP = asyncio.new_event_loop()
        threading.Thread(target=_LOOP.run_forever, daemon=True).start()
    return _LOOP


class RewardFunction:
    """One --reward-fn: called in TRL's GRPOTrainer contract unless it is written to nanorlhf's own: keyword
    arguments prompts, completions, completion_ids, every column of the prompt's row as a list and, in a training
    run, trainer_state, log_metric and log_extra (a function without **kwargs gets those it names), returning a float
    or None ("does not apply") per completion. A function with a `responses` parameter and no `completions` is
    nanorlhf's own, f(prompts, responses) on two lists of strings, the last user message and the decoded response,
    with or without **kwargs: `responses` is not a name TRL passes."""

    def __init__(self, spec, weight=1.0, flag="--reward-fn"):
        self.spec, self.weight, self.flag = spec, weight, flag
        self.fn = load_reward_fn(spec, flag)
        self.name = getattr(self.fn, "__name__", spec.partition(":")[2])  # TRL logs each under its __name__
        params = inspect.signature(self.fn).parameters.values()
        # the keyword arguments it accepts (None: any, it has **kwargs), and those it cannot do without
        self.accepts = None if any(p.kind is p.VAR_KEYWORD for p in params) else {p.name for p in params}
        self.required = [p.name for p in params if p.default is p.empty
                         and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        names = {p.name for p in params}
        self.trl = "completions" in names or (self.accepts is None and "responses" not in names)
        self.said = False  # its contract is said once, at its first call

    def call(self, rows, texts, completion_ids, keywords):
        """What the function returns for these responses: its values, or for an async function an awaitable of them
        (`check` reads them, once awaited). rows: the Prompt of each response; keywords: TRL's keywords that are not
        columns (trainer_state, log_metric, log_extra), in a training run."""
        if not self.trl:
            self.say("called as f(prompts, responses), nanorlhf's own contract (it names `responses`, not "
                     "`completions`): the last user message and the decoded response, two lists of strings")
            return self.fn([r.messages[-1]["content"] for r in rows], texts)
        kwargs, columns = self._trl_kwargs(rows, texts, completion_ids, keywords)
        self.say(f"called as TRL's GRPOTrainer calls a reward function, with {', '.join(kwargs)}")
        try:
            out = self.fn(**kwargs)
        except KeyError as e:
            self._missing_key(e, kwargs, columns)
        return self._awaited(out, kwargs, columns) if inspect.isawaitable(out) else out

    def say(self, contract):
        if not self.said and dist.is_main():
            tqdm.write(f"{self.flag} {self.spec}: {contract}")  # above a progress bar, if one is running
        self.said = True

    def _trl_kwargs(self, rows, texts, completion_ids, keywords):
        """(the keyword arguments, the data's columns). Standard data (a prompt given as text) gets strings;
        conversational data gets message lists, the completion as [{"role": "assistant", "content": text}], as TRL
        passes them. A column named like one of TRL's keywords does not replace it."""
        kwargs = {"prompts": [r.messages if r.conversational else r.messages[-1]["content"] for r in rows],
                  "completions": [[{"role": "assistant", "content": t}] if r.conversational else t
                                  for r, t in zip(rows, texts)],
                  "completion_ids": completion_ids, **keywords}
        columns = dict.fromkeys(k for r in rows for k in r.columns)  # every row's, in order; a row without one: None
        kwargs |= {k: [r.columns.get(k) for r in rows] for k in columns if k not in kwargs}
        missing = [name for name in self.required if name not in kwargs]
        if missing:
            self._no_column(missing[0], columns)
        if self.accepts is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in self.accepts}
        return kwargs, columns

    async def _awaited(self, awaitable, kwargs, columns):
        try:
            return await awaitable
        except KeyError as e:
            self._missing_key(e, kwargs, columns)

    def _missing_key(self, e, kwargs, columns):
        """A **kwargs function reading kwargs["answer"] on data without that column: one line, not a KeyError."""
        if self.accepts is None and e.args and isinstance(e.args[0], str) and e.args[0] not in kwargs:
            self._no_column(e.args[0], columns)
        raise e

    def _no_column(self, name, columns):
        if name in NOT_COLUMNS:
            raise UserError(f"{self.flag} {self.spec} needs {name!r}, which is not passed here: {NOT_COLUMNS[name]}")
        have = ", ".join(columns) or "none besides the prompt"
        raise UserError(f"{self.flag} {self.spec} needs the column {name!r}, which the data lacks (its columns: "
                        f"{have}); add it to each record of --data")

    def check(self, values, n):
        """(n,) float tensor of a function's values, NaN where it returned None; a one-line error otherwise."""
        try:
            values = list(values)  # a generator would be spent by the first pass below
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
        self.logged, self.extra = {}, {}  # what functions sent through log_metric and log_extra, until take_logged
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
    def __call__(self, prompts, queries, responses, ended, batch_size, tokenizer=None, state=None):
        """(scores (B,), {part: (B,)}, texts) for prompts (data.Prompt rows, or bare message lists, and their token
        ids) and responses (token-id lists cut after EOS; `ended` says which ones emitted it), both in
        `tokenizer`'s ids (default the policy's). A score is NaN where no judge applies. state: the run's
        TrainerState in a training run, where functions also get trainer_state, log_metric and log_extra (their
        values wait for take_logged)."""
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
        functions = self.fns + ([self.gold] if self.gold is not None else [])  # the gold part: logged, not optimised
        values = self._values(functions, rows, texts, ids, state)
        for f, part in zip(self.fns, values):
            parts[f.name] = part
            scores = scores + f.weight * part.nan_to_num(0.0)  # None: no contribution (TRL's nansum)
        if self.gold is not None:
            parts["gold"] = values[-1]
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
        return scores, parts, texts

    def _values(self, functions, rows, texts, ids, state):
        """Each function's (B,) values. The async ones run together on the event loop, as TRL gathers them: an LLM
        judge's requests overlap instead of queueing behind each other."""
        outs = [f.call(rows, texts, ids, self._keywords(f, state)) for f in functions]
        waiting = [i for i, out in enumerate(outs) if inspect.isawaitable(out)]
        if waiting:
            async def gather():
                return await asyncio.gather(*(outs[i] for i in waiting))
            for i, out in zip(waiting, asyncio.run_coroutine_threadsafe(gather(), event_loop()).result()):
                outs[i] = out
        return [f.check(out, len(texts)) for f, out in zip(functions, outs)]

    def _keywords(self, f, state):
        """TRL's keywords that are not columns, for function f in a training run (state given): trainer_state;
        log_metric(name, value), a scalar for this step's metrics (the mean of a step's values); log_extra(column,
        values), a value per response, shown beside each one in the samples table."""
        if state is None:
            return {}

        def log_metric(name, value):
            self.logged.setdefault(name, (f"{f.flag} {f.spec}", []))[1].append(float(value))

        def log_extra(column, values):
            self.extra.setdefault(column, []).extend(values)
        return {"trainer_state": state, "log_metric": log_metric, "log_extra": log_extra}

    def take_logged(self, metrics):
        """(metrics with what functions logged through log_metric since the last call, each under its own name as
        TRL logs it; {column: values} they sent through log_extra), and forget both. A name the stage logs itself
        is an error: one of the two would hide the other."""
        logged, extra, self.logged, self.extra = self.logged, self.extra, {}, {}
        for name, (who, values) in logged.items():
            if name in metrics:
                raise UserError(f"{who} logged {name!r} through log_metric, a metric the run logs itself; expected "
                                "another name")
        return metrics | {name: sum(values) / len(values) for name, (_, values) in logged.items()}, extra
