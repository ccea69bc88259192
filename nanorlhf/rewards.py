"""The reward of a response: a weighted sum of reward models and a Python function, in one place for PPO,
the labeller (`python -m nanorlhf.label`) and the evaluation.

A reward function is named `module:function` and called as f(prompts, responses) on two lists of strings,
the last user message and the decoded response, returning one float per response: a verifiable reward
(an exact answer, a format) or a programmatic judge such as `nanorlhf.gold:sentiment`.
"""
import importlib
import os
import sys

import torch

from . import model as M
from .cli import UserError
from .data import render_prompt


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


def call_reward_fn(fn, prompts, texts, flag="--reward-fn"):
    """fn(prompts, texts) as a (B,) float tensor, with a one-line error when it returns something else."""
    values = fn(prompts, texts)
    try:
        scores = torch.tensor([float(v) for v in values], dtype=torch.float)
    except (TypeError, ValueError):
        raise UserError(f"{flag}: the function must return one number per response") from None
    if len(scores) != len(texts):
        raise UserError(f"{flag}: the function returned {len(scores)} values for {len(texts)} responses")
    bad = int((~torch.isfinite(scores)).sum())
    if bad:  # the NaN guard would skip every step it reaches: a run that trains nothing, in silence
        raise UserError(f"{flag} {fn.__module__}:{fn.__qualname__} returned NaN or inf for {bad} of {len(texts)} "
                        f"responses; expected a finite number for each")
    return scores


class Rewarder:
    """score = Σ_i w_i · RM_i(prompt, response), normalised with each RM's stored statistics, + reward_fn.

    Each part is also returned on its own ("rm", "rm2", ..., "fn") so a run can log what drives its score, and
    with gold_fn a "gold" part that is not in the score: a known true reward watched beside the proxy that is
    optimised, where overoptimisation shows (Gao et al. 2023).
    """

    def __init__(self, tokenizer, rms=(), weights=(), reward_fn=None, gold_fn=None, **load_kw):
        weights = list(weights) or [1.0] * len(rms)
        if len(weights) != len(rms):
            raise UserError(f"--rm-weight: got {len(weights)} weights for {len(rms)} --rm models")
        self.tokenizer, self.rms = tokenizer, []
        for path, w in zip(rms, weights):
            rm, rm_tok = M.load_reward_model(path, **load_kw)
            self.rms.append((rm, rm_tok, w))
        self.fn = load_reward_fn(reward_fn) if reward_fn else None
        self.gold = load_reward_fn(gold_fn, "--gold-reward-fn") if gold_fn else None
        if not self.rms and self.fn is None:
            raise UserError("give a reward: --rm FOLDER (repeatable) and/or --reward-fn module:function")

    def same_tokenizer(self, i=0, tokenizer=None):
        """True when RM i reads the policy's token ids as they are (same vocabulary and chat template)."""
        tok, rm_tok = tokenizer or self.tokenizer, self.rms[i][1]
        return rm_tok.get_vocab() == tok.get_vocab() and rm_tok.chat_template == tok.chat_template

    @torch.no_grad()
    def __call__(self, messages, queries, responses, ended, batch_size, tokenizer=None):
        """(scores (B,), {part: (B,)}, texts) for prompts (message lists and their token ids) and responses
        (token-id lists cut after EOS; `ended` says which ones emitted it), both in `tokenizer`'s ids (default
        the policy's)."""
        tokenizer = tokenizer or self.tokenizer
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        prompts, parts = [m[-1]["content"] for m in messages], {}
        for i, (rm, rm_tok, weight) in enumerate(self.rms):
            if self.same_tokenizer(i, tokenizer):  # score exactly the sampled ids
                seqs = [list(q) + list(r) for q, r in zip(queries, responses)]
            else:  # another tokenizer: re-encode the conversation as text
                seqs = [render_prompt(rm_tok, m) + rm_tok(t, add_special_tokens=False).input_ids +
                        ([rm_tok.eos_token_id] if e else []) for m, t, e in zip(messages, texts, ended)]
            parts["rm" if i == 0 else f"rm{i + 1}"] = M.score_sequences(rm, seqs, rm_tok.pad_token_id, batch_size)
        if self.fn is not None:
            parts["fn"] = call_reward_fn(self.fn, prompts, texts)
        weights = [w for *_, w in self.rms] + ([1.0] if self.fn is not None else [])  # in the order of parts
        scores = sum(w * s for w, s in zip(weights, parts.values()))
        if self.gold is not None:  # logged, never optimised
            parts["gold"] = call_reward_fn(self.gold, prompts, texts, "--gold-reward-fn")
        return scores, parts, texts
