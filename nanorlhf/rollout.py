"""RL on sampled responses, shared by PPO and the critic-free stage: sampling, the response-slice logprobs,
masked statistics, GAE, the KL controller, and the minibatches and micro-batches of a rollout batch.

A rollout batch is a dict: queries (B, P) left-padded with query_mask, and responses (B, R) right-padded with
mask, 1 on real response tokens (up to and including the first EOS) and 0 on padding. Every other (B, R)
tensor is aligned with the response tokens. Padding must be inert: each function ignores what padded
positions hold (docs/ppo-details.md §2).
"""
import torch

from . import dist
from . import model as M
from .engine import generate
from .lora import use_adapter


@torch.no_grad()
def sample(model, tokenizer, queries, max_new_tokens, temperature, top_p=1.0, adapter="policy", decode="auto"):
    """Responses of adapter `adapter` to token-id prompts, cut after the first EOS (docs/ppo-details.md §3), from the
    engine (`decode`: how its steps run, nanorlhf/engine.py).

    Returns the rollout batch {queries, query_mask, responses, mask}, lengths (B,) and ended (B,)."""
    with use_adapter(model, adapter):
        out = generate(model, tokenizer, queries, max_new_tokens, temperature, top_p, decode=decode)
    return {k: out[k] for k in ("queries", "query_mask", "responses", "mask")}, out["lengths"], out["ended"]


def join(queries, query_mask, responses, mask):
    """Left-padded queries (B, P) + right-padded responses (B, R) -> model inputs (B, T) with one padded region:
    each row is its prompt, then its response, then padding, T = the longest prompt + response of the batch.

    Side by side (B, P + R), a row would carry its prompt's left padding and its response's right padding: 1.49x
    the real tokens in the demo's update minibatches of 8, against 1.33x here (docs/benchmarks.md). Positions come
    from the attention mask (model.hidden_states), so each token sees what it would unpadded. Returns input_ids,
    attention_mask and targets (B, T): the response tokens at the positions that predict them, -100 elsewhere."""
    prompt_len = query_mask.sum(1, keepdim=True)  # (B, 1)
    length = prompt_len + mask.sum(1, keepdim=True)  # (B, 1) real tokens of each row
    t = torch.arange(int(length.max()), device=queries.device)  # (T,)
    ids = torch.cat([queries, responses], 1)  # (B, P + R)
    # row b read from column P - prompt_len_b on, i.e. moved left by its prompt's padding; past its end, padding
    input_ids = ids.gather(1, (queries.shape[1] - prompt_len + t).clamp(max=ids.shape[1] - 1))  # (B, T)
    attention_mask = (t < length).to(mask.dtype)  # (B, T)
    is_response = (t >= prompt_len) & (t < length)  # (B, T)
    targets = torch.full_like(input_ids, -100)
    targets[:, :-1] = input_ids[:, 1:].masked_fill(~is_response[:, 1:], -100)  # position t predicts token t + 1
    return input_ids, attention_mask, targets


def batch_inputs(batch):
    """`join` of a rollout batch (any other keys it holds are ignored)."""
    return join(batch["queries"], batch["query_mask"], batch["responses"], batch["mask"])


def response_slice(x, batch):
    """The (B, R, ...) part of a (B, T, ...) output of `join`'s inputs that lines up with the responses: row b's
    outputs at positions prompt_len_b - 1 .. prompt_len_b + R - 2, the states before each response token (past
    the end of a short row, the last position: padding, which every caller masks)."""
    prompt_len = batch["query_mask"].sum(1, keepdim=True)  # (B, 1)
    R = batch["mask"].shape[1]
    cols = (prompt_len - 1 + torch.arange(R, device=x.device)).clamp(max=x.shape[1] - 1)  # (B, R)
    return x[torch.arange(x.shape[0], device=x.device)[:, None], cols]


def response_logprobs(model, batch, temperature, adapter="policy", return_entropy=False, return_hidden=False):
    """(B, R) log π(response tokens) at `temperature` under adapter `adapter` (None: every adapter off, the
    reference), 0 on padding; with return_entropy also the (B, R) entropy, with return_hidden also the (B, R, H) final
    hidden states they came from (the state before each response token, as a value head reads it)."""
    input_ids, attention_mask, targets = batch_inputs(batch)
    with use_adapter(model, adapter):
        hidden = M.hidden_states(model, input_ids, attention_mask)  # (B, T, H)
        out = M.logprobs(model, input_ids, attention_mask, targets, temperature, return_entropy, hidden=hidden)
    out = (out if return_entropy else (out,)) + ((hidden,) if return_hidden else ())
    out = tuple(response_slice(t, batch) for t in out)
    return out if len(out) > 1 else out[0]


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
    """(x - mean) / std over masked positions; shift_mean=False keeps the mean (for rewards). Padding -> 0.
    Under torchrun the mean and (unbiased) variance are over every rank's batch, as one process would see it."""
    n = dist.all_sum(mask.sum())
    mean = dist.all_sum(masked(x, mask).sum()) / n
    var = dist.all_sum(masked((x - mean) ** 2, mask).sum()) / (n - 1).clamp(min=1)
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


def micro_batches(batch, size):
    """Rows of `batch` in chunks of `size`, rows of similar length together, each chunk cut to its own extents.

    batch: dict of tensors with queries / query_mask (B, P) left-padded and every other tensor (B, R) aligned
    with right-padded responses (mask 1 on real tokens). Padding is compute for nothing, and a chunk's rows
    need only its own longest prompt and response. Yields (row indices (b,), chunk of (b, P') and (b, R')).
    """
    lengths = batch["query_mask"].sum(1) + batch["mask"].sum(1)  # (B,)
    order = torch.argsort(lengths, stable=True)
    for i in range(0, len(order), size):
        idx = order[i:i + size]
        chunk = {k: v[idx] for k, v in batch.items()}
        start = chunk["query_mask"].shape[1] - int(chunk["query_mask"].any(0).sum())  # all-padding columns on the left
        R = int(chunk["mask"].sum(1).max())
        yield idx, {k: v[:, start:] if k in ("queries", "query_mask") else v[:, :R] for k, v in chunk.items()}


@torch.no_grad()
def batch_logprobs(model, batch, temperature, adapter, size):
    """`response_logprobs` (B, R) of a whole rollout batch, `size` rows per forward, without grad."""
    out = torch.zeros_like(batch["mask"], dtype=torch.float)
    for idx, chunk in micro_batches(batch, size):
        out[idx, :chunk["mask"].shape[1]] = response_logprobs(model, chunk, temperature, adapter)
    return out


def kl_penalty(logprobs, ref_logprobs, kind="k1"):
    """Per-token estimate of KL(pi || ref) from samples of pi (Schulman, "Approximating KL").

    With log r = logprobs - ref_logprobs: k1 = log r (unbiased, can be negative),
    k2 = 0.5 * (log r)^2 (biased, low variance), k3 = (ref/pi - 1) - log(ref/pi) (unbiased, >= 0).
    Those are their values. Differentiated as a loss on samples of pi, their gradients differ: k1's is 0 in
    expectation (hence it goes in the reward), k2's is that of KL(pi || ref), k3's that of KL(ref || pi).
    """
    log_r = logprobs - ref_logprobs
    if kind == "k1":
        return log_r
    if kind == "k2":
        return 0.5 * log_r**2
    if kind == "k3":
        return torch.expm1(-log_r) + log_r  # ratio = ref/pi = exp(-log r)
    raise ValueError(f"kind must be k1, k2 or k3, got {kind!r}")


def shape_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, estimator):
    """Per-token reward -β·KL plus the score on the last real token (Ziegler et al. 2019, eq. 2;
    docs/ppo-details.md §1).

    scores (B,); logprobs, ref_logprobs, mask (B, R). Returns rewards (B, R), 0 on padding.
    """
    rewards = -kl_coef * masked(kl_penalty(logprobs, ref_logprobs, estimator), mask)
    last = (mask.sum(1) - 1).clamp(min=0).long()  # (B,) index of the last real token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


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


def minibatches(batch, size):
    """Shuffled minibatches of a dict of (B, ...) tensors; each row appears exactly once per call."""
    n = len(next(iter(batch.values())))
    order = torch.randperm(n)
    for start in range(0, n, size):
        idx = order[start:start + size]
        yield {k: v[idx] for k, v in batch.items()}
