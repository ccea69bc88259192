"""Summed response logprobs of (prompt, completion) rows, and the one reference mechanism DPO, KTO and the
evaluation use.

Both losses score a response by log π(y|x) = Σ_t log π(y_t | x, y_<t), the sum over its tokens (EOS included),
not the mean (Rafailov et al. 2023, eq. 7; Ethayarajh et al. 2024).
"""
from dataclasses import dataclass

import torch

from . import model as M
from .cli import arg
from .data import by_length, collate
from .loop import RunArgs


@dataclass
class PreferenceArgs(RunArgs):
    """The plumbing DPO and KTO share beyond RunArgs: where the reference logprobs come from."""
    precompute_ref: bool = arg(False, "Compute the reference logprobs of every training example once before training "
                               "(held-out ones always are): no reference forward per step for them, and in DPO with "
                               "--lora-r 0 no frozen copy in memory (KTO's mismatched z₀ pairs change every step, so "
                               "its reference still runs).")


def _forward(model, seqs, pad_id, temperature, ref_model=None, reference=False):
    device = next(model.parameters()).device
    b = {k: v.to(device) for k, v in collate(seqs, pad_id).items()}
    inputs = b["input_ids"], b["attention_mask"], b["targets"]  # (N, T) each; targets -100 off the completion
    if reference:
        return M.reference_logprobs(model, ref_model, *inputs, temperature).sum(-1)  # (N, T) -> (N,)
    return M.logprobs(model, *inputs, temperature).sum(-1)                           # (N, T) -> (N,)


def summed_logprobs(model, seqs, pad_id, temperature=1.0, batch_size=None):
    """Σ_t log π(y_t) over each completion, (N,), for N (prompt_ids, completion_ids) rows, `batch_size` rows per
    forward (default: all in one, with grad when grad is on), rows of similar length together so that little of a
    forward is padding. `temperature`: of the distribution scored (evaluation compares models at the sampling
    temperature)."""
    if not batch_size or batch_size >= len(seqs):
        return _forward(model, seqs, pad_id, temperature)
    return by_length(lambda rows: _forward(model, rows, pad_id, temperature), seqs, lambda s: len(s[0]) + len(s[1]),
                     batch_size)


def _key(seq):
    prompt, completion = seq
    return tuple(prompt), tuple(completion)


class Reference:
    """log π_ref(y|x) summed over each completion, (N,), without grad; the scripts call it and never ask where it
    comes from:
      - with LoRA, the policy itself with every adapter disabled: no second copy of the weights;
      - for full fine-tuning, a frozen copy of the model made here, before any update;
      - rows given to `precompute` come from a table filled once, with the model as it is then (the start, before a
        checkpoint loads): no reference forward per step, and with live=False no copy at all.
    The table is looked up by content, so a row scores the same bits whenever it comes back, and rows precomputed
    in the batches a later forward uses tie with that forward exactly (e.g. policy = reference at step 0).
    """

    def __init__(self, model, pad_id, live=True):
        """live=False promises that every row asked for was precomputed (DPO's --precompute-ref)."""
        self.model, self.pad_id, self.table, self.live = model, pad_id, {}, live
        self.copy = M.frozen_copy(model) if live else None

    @torch.no_grad()
    def precompute(self, seqs, batch_size):
        """Score `seqs` now, `batch_size` rows per forward, and keep the values."""
        for i in range(0, len(seqs), batch_size):
            chunk = seqs[i:i + batch_size]
            values = _forward(self.model, chunk, self.pad_id, 1.0, self.copy, reference=True).tolist()
            self.table.update(zip(map(_key, chunk), values))

    @torch.no_grad()
    def __call__(self, seqs):
        keys = [_key(s) for s in seqs]
        device = next(self.model.parameters()).device
        if all(k in self.table for k in keys):
            return torch.tensor([self.table[k] for k in keys], device=device)
        assert self.live, "a row was not precomputed, and this reference keeps no live model"
        return _forward(self.model, seqs, self.pad_id, 1.0, self.copy, reference=True)
