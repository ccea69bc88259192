"""Fused per-token logprobs (and entropy) straight from hidden states and the lm_head weight.

Why: the full (tokens, V) logits tensor dominates memory for small and mid models;
at 8k tokens and a 150k vocabulary it is 14-16 GiB. Like Liger Kernel's fused losses and Cut
Cross-Entropy (Wijmans et al. 2024) we never build it: tokens go through in chunks, and only a
few (chunk, V) fp32 tiles exist, in forward and in backward. A custom autograd.Function owns
backward, so autograd never saves logits either. Matmuls run as plain torch.mm (inductor would
call the same library); only the small per-row math is compiled. On a 2-core CPU at N=8192,
H=576, V=49152 the frozen-head path needs ~1/24 of eager's peak memory and ~0.8x its time
(tests/benchmarks/bench_kernels.py).

Two backward strategies:
- frozen lm_head (LoRA): d logp_i / d h_i = (w[y_i] - sum_v p_iv w_v) / T is one H-vector per
  token, so forward forms it chunk by chunk and backward only scales it by the incoming grad.
  Same two big matmuls as eager (logits, and p @ W), and an (N, H) tensor instead of (N, V).
- trainable lm_head: forward saves only the per-token logsumexp and E_p[z]; backward recomputes
  each logits tile and accumulates grads for hidden and weight (4 matmuls vs eager's 3).

The entropy's gradient costs a (chunk, V) tile and a matmul with W per chunk of its own. A stage that logs the entropy
but keeps it out of its loss (GRPO's update; PPO's at --entropy-coef 0) says so with `entropy_grad(False)`, and the
kernel forms neither: the entropy comes back as a value without a gradient.

No vocabulary tiling: tiling V needs an online logsumexp, and p (hence p @ W) is only known after
a full pass over the vocabulary, so the logits would be computed twice. The chunk size already
bounds the (chunk, V) tile, so tiling V would cost a matmul and save nothing we need.
"""
import contextlib
import os

import torch

IGNORE_INDEX = -100
TILE_BYTES = 90 * 2**20  # default chunk: a (chunk, V) fp32 tile of <= 90 MiB; 480 tokens at V=49152
COMPILED = os.environ.get("NANORLHF_EAGER", "0") != "1"  # NANORLHF_EAGER=1: debug eagerly
_entropy_grad = True  # entropy_grad's switch


@contextlib.contextmanager
def entropy_grad(enabled):
    """Within it, the entropy token_logprobs returns under grad has a gradient only if `enabled`: what
    torch.set_grad_enabled is to every tensor, for the entropy alone. The logprobs are untouched. Off, the frozen-head
    forward skips the entropy's gradient tiles and their matmul, and the entropy does not require grad."""
    global _entropy_grad
    previous, _entropy_grad = _entropy_grad, enabled
    try:
        yield
    finally:
        _entropy_grad = previous


def _softmax_rows(z, y, inv_t, g_out, q_out):
    """Row statistics of one logits tile; optionally write the logits-gradient tiles.

    z: (C, V) fp32 logits before temperature (h @ W^T), read only
    y: (C,) int64 targets, IGNORE_INDEX allowed
    inv_t: float, 1 / temperature
    g_out: (C, V) fp32 buffer <- d logp / d(h W^T) = (onehot(y) - p) / T, 0 on ignored rows; or None
    q_out: (C, V) fp32 buffer <- d entropy / d(h W^T) = p * (E_p[z] - z) / T, idem; or None
    Returns m, s, E_p[z], z[y], each (C, 1), of the scaled logits z / T; logsumexp = m + log s.
    """
    # Written out (not logsumexp, and log s taken by the caller) so inductor fuses everything into
    # one loop per row that stays in cache, instead of several passes over the whole tile.
    z = z * inv_t
    m = z.amax(-1, keepdim=True)
    e = torch.exp(z - m)
    s = e.sum(-1, keepdim=True)
    p = e / s
    mean_z = (p * z).sum(-1, keepdim=True)
    valid = (y != IGNORE_INDEX)[:, None]
    y = torch.where(valid, y[:, None], 0)
    scale = valid * inv_t  # ignored rows: no gradient
    # Results go into buffers reused by every chunk: a fresh (C, V) tensor per chunk costs page
    # faults on CPU. A matmul of these tiles with W gives the row-wise gradients directly.
    if g_out is not None:
        onehot = torch.arange(z.shape[1], device=z.device) == y  # (C, V) bool, never stored
        g_out.copy_((onehot.float() - p) * scale)
    if q_out is not None:
        q_out.copy_(p * (mean_z - z) * scale)
    return m, s, mean_z, z.gather(1, y)


def _logits_grad(z, y, inv_t, lse, mean_z, g_logp, g_ent, dz_out):
    """dL/d(h W^T) of one recomputed tile (trainable lm_head backward), written into dz_out.

    z: (C, V) fp32 logits before temperature (h @ W^T)
    y: (C, 1) int64 targets, ignored ones replaced by 0
    inv_t: float, 1 / temperature
    lse, mean_z: (C, 1) fp32 saved by forward
    g_logp, g_ent: (C, 1) fp32 incoming grads, 0 on ignored rows
    dz_out: (C, V) fp32 buffer
    """
    z = z * inv_t
    p = torch.exp(z - lse)
    onehot = torch.arange(z.shape[1], device=z.device) == y
    dz_out.copy_((g_logp * (onehot.float() - p) + g_ent * p * (mean_z - z)) * inv_t)


# dynamic=True: one compile serves every chunk length (tails too), every V and temperature;
# padding the tail instead still recompiles per V. (Static shapes also lose the per-row fusion
# when V > 300 * chunk.) Inputs stay fp32 tiles, so bf16 models reuse the same compiled code.
_compiled_softmax_rows = torch.compile(_softmax_rows, dynamic=True)
_compiled_logits_grad = torch.compile(_logits_grad, dynamic=True)


class _TokenLogprobs(torch.autograd.Function):
    """Chunked logprobs/entropy whose backward never needs the (N, V) logits."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_t, C, mode, entropy_grad, compiled):
        # hidden (N, H), weight (V, H), targets (N,), C tokens per chunk;
        # mode "none" (no grads) | "frozen" (grads for hidden only) | "trainable" (weight too);
        # entropy_grad: the entropy output has a gradient (else it is a value only)
        rows = _compiled_softmax_rows if compiled else _softmax_rows
        (N, H), frozen = hidden.shape, mode == "frozen"
        w = weight.float()  # once per call, not per chunk: the copy is weight-sized, not N-sized
        z = torch.empty(C, w.shape[0], device=w.device)  # tiles reused by every chunk
        g = torch.empty_like(z) if frozen else None
        q = torch.empty_like(z) if frozen and entropy_grad else None
        # Row-wise gradients of logp and entropy w.r.t. hidden, (N, H) fp32 (the frozen-head trick).
        g_logp = torch.empty(N, H, device=w.device) if frozen else None
        g_ent = torch.empty(N, H, device=w.device) if q is not None else None
        stats = []
        for i in range(0, N, C):
            n, sl = min(C, N - i), slice(i, i + C)
            torch.mm(hidden[sl].float(), w.t(), out=z[:n])
            tiles = [None if t is None else t[:n] for t in (g, q)]
            stats.append(rows(z[:n], targets[sl], inv_t, *tiles))
            if g is not None:  # d logp / d h = (w[y] - p @ W) / T, one matmul per tile
                torch.mm(g[:n], w, out=g_logp[sl])
            if q is not None:  # d entropy / d h = p * (E_p[z] - z) @ W / T
                torch.mm(q[:n], w, out=g_ent[sl])
        m, s, mean_z, z_y = (torch.cat(t).squeeze(1) for t in zip(*stats))
        lse = m + s.log()
        valid = targets != IGNORE_INDEX
        logp = torch.where(valid, z_y - lse, 0.0)
        ent = torch.where(valid, lse - mean_z, 0.0)  # -sum p log p = lse - E_p[z]
        ctx.set_materialize_grads(False)  # an unused output gets None: skip its work
        if not entropy_grad:
            ctx.mark_non_differentiable(ent)
        ctx.meta = (mode, inv_t, C, compiled, hidden.dtype)
        if frozen:
            ctx.save_for_backward(g_logp, g_ent)
        elif mode == "trainable":
            ctx.save_for_backward(hidden, weight, targets, lse, mean_z)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        mode, inv_t, C, compiled, h_dtype = ctx.meta
        if mode == "frozen":  # just scale the row gradients formed in forward
            g_logp, g_ent = ctx.saved_tensors
            dh = sum(g * gout[:, None] for g, gout in ((g_logp, grad_logp), (g_ent, grad_ent))
                     if gout is not None)
            return dh.to(h_dtype), *[None] * 7
        hidden, weight, targets, lse, mean_z = ctx.saved_tensors
        valid = targets != IGNORE_INDEX
        y = torch.where(valid, targets, 0)[:, None]
        g1, g2 = (torch.where(valid, g, 0.0)[:, None] if g is not None else
                  torch.zeros_like(lse)[:, None] for g in (grad_logp, grad_ent))
        grad_fn = _compiled_logits_grad if compiled else _logits_grad
        w = weight.float()
        z = torch.empty(C, w.shape[0], device=w.device)
        dz = torch.empty_like(z)
        dh = torch.empty(hidden.shape, device=w.device) if ctx.needs_input_grad[0] else None
        dw = torch.zeros_like(w)
        for i in range(0, hidden.shape[0], C):
            n, sl = min(C, hidden.shape[0] - i), slice(i, i + C)
            h = hidden[sl].float()
            torch.mm(h, w.t(), out=z[:n])
            grad_fn(z[:n], y[sl], inv_t, lse[sl, None], mean_z[sl, None], g1[sl], g2[sl], dz[:n])
            if dh is not None:
                torch.mm(dz[:n], w, out=dh[sl])
            dw.addmm_(dz[:n].t(), h)
        return None if dh is None else dh.to(h_dtype), dw.to(weight.dtype), *[None] * 6


def chunk_rows(n_tokens, vocab_size, chunk_size=None):
    """Tokens per chunk: at most chunk_size, by default so a (chunk, V) fp32 tile fits TILE_BYTES.

    Chunks are balanced (n split into equal parts), so there is no 1-token tail to recompile for.
    """
    chunk = chunk_size or max(16, TILE_BYTES // (4 * vocab_size) // 16 * 16)
    n_chunks = -(-n_tokens // chunk)  # ceil division
    return -(-n_tokens // n_chunks)


def token_logprobs(hidden, weight, targets, temperature=1.0, chunk_size=None,
                   return_entropy=False, compiled=None):
    """log softmax(hidden @ weight.T / temperature)[targets] without materialising all logits.

    hidden (..., H), weight (V, H) lm_head weight, targets (...) int64 with ignore_index -100.
    Returns logprobs (...) fp32 [and entropy (...) fp32 when return_entropy, with a gradient unless inside
    entropy_grad(False)]; ignored targets give 0 and no gradient. Grads come back in the input dtypes.

    Only the tokens with a target go through the lm_head: a prompt or padding position has none, and
    in an RL batch those are most of the rows (in the demo's PPO, two thirds), each a V-wide matmul
    row and softmax for nothing.
    """
    shape = targets.shape
    assert hidden.shape[:-1] == shape, f"hidden {tuple(hidden.shape)} vs targets {tuple(shape)}"
    targets = targets.reshape(-1)
    rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # (n,) positions with a target
    if rows.numel() == 0:  # keep one ignored row, so the output still hangs off hidden's graph
        rows = torch.zeros(1, dtype=torch.long, device=targets.device)
    chunk = chunk_rows(rows.numel(), weight.shape[0], chunk_size)
    grad = torch.is_grad_enabled()
    mode = ("trainable" if grad and weight.requires_grad else
            "frozen" if grad and hidden.requires_grad else "none")  # "none": no_grad rollouts
    compiled = COMPILED if compiled is None else compiled
    logp, ent = _TokenLogprobs.apply(
        hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows), weight, targets[rows], 1.0 / temperature,
        chunk, mode, return_entropy and mode != "none" and _entropy_grad, compiled)
    # (n,) -> (N,): 0 at every position without a target
    logp, ent = (t.new_zeros(targets.shape).index_copy(0, rows, t) for t in (logp, ent))
    return (logp.view(shape), ent.view(shape)) if return_entropy else logp.view(shape)
