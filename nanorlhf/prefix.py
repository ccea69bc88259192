"""Prefix sharing (Wang et al. 2024, arXiv 2410.20305): a preference pair's prompt computed once for both replies.

The chosen and the rejected reply continue the same prompt, so the two rows [prompt, chosen] and [prompt, rejected]
run the prompt through the model twice. One packed row [prompt, chosen, rejected] runs it once. Its 4D attention
mask lets each token see the prompt and the tokens before it in its own reply, never the other reply, and the
rejected reply's positions restart where the prompt ends, so every token gets the hidden state it has in its own row
[prompt, reply]: the same scores and gradients, to rounding, from P + C + R tokens instead of 2P + C + R.

    prompt   chosen     rejected     positions 0 1 2 | 3 4 | 3 4 5
    p p p    c c        r r r        the first r sees p p p and itself; no c
"""
import torch

from . import model as M
from .data import collate


def pack(rows, pad_id):
    """One right-padded row [prompt, chosen, rejected] per PairRow. Returns long tensors input_ids, position_ids and
    segments (B, T), the segment 0 on the prompt, 1 on the chosen reply, 2 on the rejected one and -1 on padding;
    and chosen_end, rejected_end (B,), the column of each reply's last token (its EOS, which a reward model reads)."""
    B, T = len(rows), max(len(r.prompt) + len(r.chosen) + len(r.rejected) for r in rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    position_ids = torch.zeros(B, T, dtype=torch.long)
    segments = torch.full((B, T), -1, dtype=torch.long)
    chosen_end, rejected_end = torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long)
    for b, r in enumerate(rows):
        P, C, R = len(r.prompt), len(r.chosen), len(r.rejected)
        input_ids[b, :P + C + R] = torch.tensor(list(r.prompt) + list(r.chosen) + list(r.rejected))
        position_ids[b, :P + C + R] = torch.cat([torch.arange(P + C), torch.arange(P, P + R)])
        segments[b, :P + C + R] = torch.tensor([0] * P + [1] * C + [2] * R)
        chosen_end[b], rejected_end[b] = P + C - 1, P + C + R - 1
    return {"input_ids": input_ids, "position_ids": position_ids, "segments": segments, "chosen_end": chosen_end,
            "rejected_end": rejected_end}


def attention_mask(segments):
    """(B, 1, T, T) bool, True where query i attends to key j: j <= i, and j in the prompt or in i's own reply.
    A padding query sees itself and the prompt (no row without a key, which would be NaN; its output is unread)."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()  # (T, T): j <= i
    query, key = segments[:, :, None], segments[:, None, :]  # (B, T, 1), (B, 1, T)
    return (causal & ((key == 0) | (key == query)))[:, None]


def shares_prompt(model, rows):
    """True when one packed row computes what the two rows would: the model's attention takes a 4D mask (sdpa,
    eager), and it has no sliding window shorter than a row [prompt, reply] (with a 4D mask given, transformers
    applies no window of its own)."""
    window = getattr(model.config, "sliding_window", None)
    longest = max(len(r.prompt) + max(len(r.chosen), len(r.rejected)) for r in rows)
    return model.config._attn_implementation in ("sdpa", "eager") and (window is None or longest <= window)


def hidden_states(model, batch):
    """Final-layer hidden states (B, T, H) of `pack`'s rows (on the model's device)."""
    mask = attention_mask(batch["segments"])
    if model.config._attn_implementation == "eager":  # eager attention adds its mask to the scores
        mask = torch.zeros(mask.shape, dtype=model.dtype, device=mask.device).masked_fill(~mask,
                                                                                          torch.finfo(model.dtype).min)
    out = model.base_model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"],
                           use_cache=False)
    return out.last_hidden_state


def pair_scores(model, rows, pad_id, device):
    """(chosen (B,), rejected (B,), tokens) for PairRows: a reward model's fp32 scores of each pair's replies and the
    tokens the forward ran. Each pair is one packed row, its prompt computed once; where that cannot compute what the
    rows [prompt, reply] would (shares_prompt), both replies as such rows in one forward (model.reward_scores)."""
    B = len(rows)
    if not shares_prompt(model, rows):
        batch = collate([(r.prompt, r.chosen) for r in rows] + [(r.prompt, r.rejected) for r in rows], pad_id)
        mask = batch["attention_mask"].to(device)
        scores = M.reward_scores(model, batch["input_ids"].to(device), mask)  # (2B,): chosen rows, then rejected
        return scores[:B], scores[B:], int(mask.sum())
    batch = {k: v.to(device) for k, v in pack(rows, pad_id).items()}
    hidden = hidden_states(model, batch)  # (B, T, H)
    b = torch.arange(B, device=device)
    pooled = torch.cat([hidden[b, batch["chosen_end"]], hidden[b, batch["rejected_end"]]])  # (2B, H)
    scores = model.score(pooled.to(model.score.weight.dtype)).squeeze(-1).float()  # as model.reward_scores reads
    return scores[:B], scores[B:], int((batch["segments"] >= 0).sum())
