"""Prefix sharing (Wang et al. 2024, arXiv 2410.20305): a preference pair's prompt computed once for both replies.

The chosen and the rejected reply continue the same prompt, so the two rows [prompt, chosen] and [prompt, rejected]
run the prompt through the model twice. Here the prompt runs once, with the KV cache on and its gradients kept, and
each reply then continues from the prompt's cached keys and values, as a decoding step does: every reply token sees
what it sees in its own row [prompt, reply], at the same position, so the scores and gradients are the two rows'
(to rounding) for P + C + R tokens instead of 2P + C + R, and its attention spans P + its reply, never a packed row
of all three.

    pass 1   p p p . .            prompts, right-padded: (B, P)
    pass 2   p p p . . | c c .    each row's reply after its prompt's cache, the padding between them masked: (2B, R)
             p p p . . | r r r    rows 2b and 2b + 1 are pair b's chosen and rejected reply

Gradient checkpointing recomputes every layer in backward, so transformers switches the cache off in a pass with
grad; there, and for a model with a sliding window shorter than these rows, the two rows run as before.
"""
import inspect

import torch

from . import model as M
from .cli import UserError
from .data import collate


def shares_prompt(model, rows):
    """True when a cached prompt can serve both replies: the cache survives this pass (no gradient checkpointing
    where gradients are on), and no sliding window is shorter than the longest prompt + the longest reply (the
    columns of pass 2, padding included)."""
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5's name
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    checkpointing = checkpointing and model.training and torch.is_grad_enabled()
    window = getattr(model.config, "sliding_window", None)
    width = max(len(r.prompt) for r in rows) + max(max(len(r.chosen), len(r.rejected)) for r in rows)
    return not checkpointing and (window is None or width <= window)


def right_pad(seqs, pad_id, device):
    """(input_ids, attention_mask) (N, T) of token-id lists, right-padded to the longest."""
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(list(s), dtype=torch.long), 1
    return ids.to(device), mask.to(device)


def reply_hidden_states(model, rows, pad_id, device):
    """(hidden (2B, R, H), reply_mask (2B, R)): the final hidden states of each pair's chosen (row 2b) and rejected
    (row 2b + 1) reply, the prompt run once (the two passes above)."""
    base = model.base_model
    key = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"  # 5.2x renamed
    prompt_ids, prompt_mask = right_pad([r.prompt for r in rows], pad_id, device)  # (B, P)
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    out = base(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True)
    cache = out.get(key)
    if cache is None:  # pass 2 would see no prompt at all
        raise UserError(f"{type(model).__name__} returned no KV cache (`{key}`); prefix sharing needs a decoder that "
                        "caches")
    cache.batch_repeat_interleave(2)  # every prompt's keys and values for its two replies: (B, ...) -> (2B, ...)
    reply_ids, reply_mask = right_pad([s for r in rows for s in (r.chosen, r.rejected)], pad_id, device)  # (2B, R)
    prompt_len = prompt_mask.sum(-1).repeat_interleave(2)  # (2B,)
    positions = prompt_len[:, None] + torch.arange(reply_ids.shape[1], device=device)  # right after its prompt
    mask = torch.cat([prompt_mask.repeat_interleave(2, 0), reply_mask], 1)  # (2B, P + R): the prompt's padding masked
    out = base(input_ids=reply_ids, attention_mask=mask, position_ids=positions, use_cache=True, **{key: cache})
    return out.last_hidden_state, reply_mask


def pair_scores(model, rows, pad_id, device):
    """(chosen (B,), rejected (B,), tokens) for PairRows: a reward model's fp32 scores of each pair's replies, read at
    each reply's last token (its EOS), and the tokens the forwards ran. Where shares_prompt says no, both replies run
    as rows [prompt, reply] of one forward (model.reward_scores)."""
    B = len(rows)
    if not shares_prompt(model, rows):
        batch = collate([(r.prompt, r.chosen) for r in rows] + [(r.prompt, r.rejected) for r in rows], pad_id)
        mask = batch["attention_mask"].to(device)
        scores = M.reward_scores(model, batch["input_ids"].to(device), mask)  # (2B,): chosen rows, then rejected
        return scores[:B], scores[B:], int(mask.sum())
    hidden, reply_mask = reply_hidden_states(model, rows, pad_id, device)  # (2B, R, H), (2B, R)
    last = reply_mask.sum(-1) - 1  # (2B,)
    pooled = hidden[torch.arange(2 * B, device=device), last]  # (2B, H)
    scores = model.score(pooled.to(model.score.weight.dtype)).squeeze(-1).float()  # as model.reward_scores reads
    tokens = sum(len(r.prompt) for r in rows) + int(reply_mask.sum())
    return scores[0::2], scores[1::2], tokens
