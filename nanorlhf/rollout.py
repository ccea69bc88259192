"""PPO's data between rollout and update: the buffer, GAE, masked whitening and the KL controller.

Every (B, R) tensor is aligned with the response tokens; `mask` is 1 on real response tokens
(up to and including the first EOS) and 0 on padding. Padding must be inert: each function
ignores what padded positions hold (REFERENCE §1.2).
"""
from dataclasses import dataclass, fields

import torch


def masked(x, mask):
    """x with padding set to 0. `where`, not `x * mask`: inf or NaN in padding must not leak (inf * 0 = NaN)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x, mask, dim=None):
    """Mean of x over positions where mask is 1."""
    if dim is None:
        return masked(x, mask).sum() / mask.sum().clamp(min=1)
    return masked(x, mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x, mask):
    """Unbiased variance over masked positions (Bessel's correction, as the reference implementations)."""
    return masked((x - masked_mean(x, mask)) ** 2, mask).sum() / (mask.sum() - 1).clamp(min=1)


def whiten(x, mask, shift_mean=True, eps=1e-8):
    """(x - mean) / std over masked positions; shift_mean=False keeps the mean (for rewards). Padding -> 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return masked(out, mask)


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16), vectorised over the batch.

    rewards, values, mask: (B, R). The value after the last real token is 0 (the episode ends).
    Returns advantages, returns: (B, R), 0 on padding.
        δ_t = r_t + γ V_{t+1} − V_t,   A_t = δ_t + γ λ A_{t+1},   returns_t = A_t + V_t
    """
    values, rewards = masked(values, mask), masked(rewards, mask)  # padding holds garbage; make it 0
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    next_value = next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value = values[:, t]
        advantages[:, t] = next_advantage
    return advantages, (advantages + values) * mask


class KLController:
    """The KL coefficient β: fixed, or adaptive towards `target` KL (Ziegler et al. 2019, §2.2):
    β ← β · (1 + clip(KL / target − 1, −0.2, 0.2) · n_steps / horizon)."""

    def __init__(self, coef, target=None, horizon=10000):
        self.value, self.target, self.horizon = coef, target, horizon

    def update(self, kl, n_steps):
        if self.target is not None:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * n_steps / self.horizon

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


@dataclass
class RolloutBuffer:
    """One iteration's rollouts. Shapes: queries (B, P) left-padded, everything else (B, R)."""
    queries: torch.Tensor
    query_mask: torch.Tensor
    responses: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    def __len__(self):
        return self.responses.shape[0]

    def minibatches(self, size, generator=None):
        """Shuffled minibatches (dicts of tensors); each sample appears exactly once per call."""
        order = torch.randperm(len(self), generator=generator)
        for start in range(0, len(self), size):
            idx = order[start:start + size]
            yield {f.name: getattr(self, f.name)[idx] for f in fields(self)}
