"""The fused logprob kernel against eager log_softmax -> gather, plus KL estimators by hand."""
import math

import pytest
import torch

from nanorlhf import kernels
from nanorlhf.kernels import token_logprobs
from nanorlhf.rollout import kl_penalty


def eager_reference(hidden, weight, targets, temperature=1.0, return_entropy=False):
    """The obvious way: full logits, log_softmax, gather; entropy from the same softmax."""
    logp_all = torch.log_softmax(hidden.float() @ weight.float().T / temperature, -1)
    valid = targets != -100
    logp = torch.where(valid, logp_all.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1), 0.0)
    ent = torch.where(valid, -(logp_all.exp() * logp_all).sum(-1), 0.0)
    return (logp, ent) if return_entropy else logp


def make(shape, H, V, dtype=torch.float32, n_ignored=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.5 * 2  # logits with std ~2
    targets = torch.randint(0, V, shape, generator=g)
    targets.view(-1)[torch.randperm(targets.numel(), generator=g)[:n_ignored]] = -100
    return hidden.to(dtype), weight.to(dtype), targets


def run(fn, hidden, weight, targets, trainable, use_entropy, seed=1, **kw):
    """Values and grads of a loss mixing logprobs and entropy with random weights per token."""
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_(trainable)
    out = fn(h, w, targets, return_entropy=use_entropy, **kw)
    logp, ent = out if use_entropy else (out, None)
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.randn(targets.shape, generator=g).to(targets.device) for _ in range(2))  # CPU draws: same on CUDA
    loss = (a * logp).sum() + ((b * ent).sum() if use_entropy else 0.0)
    grads = torch.autograd.grad(loss, [h, w] if trainable else [h])
    return logp, ent, grads


def fused(h, w, y, **kw):
    return token_logprobs(h, w, y, compiled=True, **kw)  # the compiled path, whatever the env says


CASES = [  # shape, H, V, chunk, temperature
    ((37,), 16, 1000, 8, 1.0),        # chunk does not divide the tokens
    ((3, 21), 32, 1500, 16, 0.7),     # 3-D (B, T, H) input, T != 1
    ((2, 50), 24, 4096, None, 1.3),   # default chunk (one chunk here)
]


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
@pytest.mark.parametrize("use_entropy", [True, False], ids=["logp+entropy", "logp"])
@pytest.mark.parametrize("shape,H,V,chunk,T", CASES)
def test_matches_eager_fp32(shape, H, V, chunk, T, trainable, use_entropy):
    hidden, weight, targets = make(shape, H, V)
    logp, ent, grads = run(fused, hidden, weight, targets, trainable, use_entropy,
                           chunk_size=chunk, temperature=T)
    ref_logp, ref_ent, ref_grads = run(eager_reference, hidden, weight, targets, trainable,
                                       use_entropy, temperature=T)
    tol = dict(atol=1e-5, rtol=1e-5)
    assert logp.shape == targets.shape and logp.dtype == torch.float32
    torch.testing.assert_close(logp, ref_logp, **tol)
    for g, ref_g in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref_g, **tol)
    ignored = targets == -100
    assert (logp[ignored] == 0).all() and (grads[0][ignored] == 0).all()  # no gradient either
    if use_entropy:
        assert ent.shape == targets.shape and ent.dtype == torch.float32
        torch.testing.assert_close(ent, ref_ent, **tol)
        assert (ent[ignored] == 0).all()


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_only_target_rows_reach_the_lm_head(trainable, monkeypatch):
    """An RL batch is mostly prompt: positions without a target never reach the lm_head, and values and gradients
    are still eager's. With no target at all, the output is zeros with zero gradients (and still has a graph)."""
    hidden, weight, targets = make((3, 40), 16, 1000, n_ignored=0)
    targets[:, :30] = -100  # a 30-token prompt before each 10-token response
    seen = []
    rows = kernels._compiled_softmax_rows
    monkeypatch.setattr(kernels, "_compiled_softmax_rows", lambda z, *a: seen.append(z.shape[0]) or rows(z, *a))
    logp, ent, grads = run(fused, hidden, weight, targets, trainable, True, chunk_size=8)
    assert sum(seen) == 30  # the 3 × 10 response tokens, in chunks of at most 8
    ref_logp, ref_ent, ref_grads = run(eager_reference, hidden, weight, targets, trainable, True)
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)
    for g, ref_g in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref_g, atol=1e-5, rtol=1e-5)
    assert (grads[0][:, :30] == 0).all()
    targets[:] = -100
    logp, ent, grads = run(fused, hidden, weight, targets, trainable, True)
    assert (logp == 0).all() and (ent == 0).all() and all((g == 0).all() for g in grads)


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_bf16_inputs_give_bf16_grads(trainable):
    hidden, weight, targets = make((4, 30), 32, 2000, dtype=torch.bfloat16)
    logp, ent, grads = run(fused, hidden, weight, targets, trainable, True, chunk_size=16)
    ref_logp, ref_ent, ref_grads = run(eager_reference, hidden, weight, targets, trainable, True)
    assert logp.dtype == ent.dtype == torch.float32
    torch.testing.assert_close(logp, ref_logp, atol=1e-4, rtol=1e-4)  # fp32 math inside
    torch.testing.assert_close(ent, ref_ent, atol=1e-4, rtol=1e-4)
    for g, ref_g in zip(grads, ref_grads):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), ref_g.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_entropy_logged_without_its_gradient(trainable, monkeypatch):
    """entropy_grad(False): the entropy's value is eager's, it has no gradient, and the logprobs' values and gradients
    are eager's (a loss that adds the entropy gets the logprob part alone). With a frozen head the forward forms no
    entropy-gradient tile (the q_out buffer, _softmax_rows' last argument) and no (N, H) matmul for it."""
    hidden, weight, targets = make((3, 21), 32, 1500)
    tiles, mms = [], []
    rows, mm = kernels._compiled_softmax_rows, torch.mm
    monkeypatch.setattr(kernels, "_compiled_softmax_rows", lambda *a: tiles.append(a[-1]) or rows(*a))
    monkeypatch.setattr(kernels.torch, "mm", lambda a, b, **kw: mms.append(tuple(b.shape)) or mm(a, b, **kw))
    with kernels.entropy_grad(False):
        logp, ent, grads = run(fused, hidden, weight, targets, trainable, True, chunk_size=16, temperature=0.7)
    monkeypatch.undo()
    assert not ent.requires_grad and logp.requires_grad
    ref_logp, ref_ent, _ = run(eager_reference, hidden, weight, targets, trainable, True, temperature=0.7)
    _, _, ref_grads = run(eager_reference, hidden, weight, targets, trainable, False, temperature=0.7)
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)
    for g, ref_g in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref_g, atol=1e-5, rtol=1e-5)
    if not trainable:  # 60 target tokens in 4 chunks: each a logits matmul and the logprob's gradient matmul only
        assert len(tiles) == 4 and all(q is None for q in tiles)
        assert mms.count((1500, 32)) == 4  # (chunk, V) @ W: the logprob's; the entropy's would double it
    # the switch is scoped: outside it the entropy has its gradient again, the eager one
    logp, ent, grads = run(fused, hidden, weight, targets, trainable, True, chunk_size=16, temperature=0.7)
    _, _, ref_grads = run(eager_reference, hidden, weight, targets, trainable, True, temperature=0.7)
    assert ent.requires_grad
    for g, ref_g in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref_g, atol=1e-5, rtol=1e-5)


def test_no_grad_rollout():
    hidden, weight, targets = make((2, 40), 16, 1000)
    hidden.requires_grad_()
    with torch.no_grad():
        logp, ent = fused(hidden, weight, targets, chunk_size=24, return_entropy=True)
    assert not logp.requires_grad and not ent.requires_grad
    ref_logp, ref_ent = eager_reference(hidden.detach(), weight, targets, return_entropy=True)
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)


def test_hand_computed_logprob():
    # logits (0, log 3) / T with T = 0.5 -> (0, 2 log 3): p = (1/10, 9/10)
    hidden = torch.tensor([[1.0], [1.0]])
    weight = torch.tensor([[0.0], [math.log(3)]])
    logp, ent = fused(hidden, weight, torch.tensor([0, 1]), temperature=0.5, return_entropy=True)
    torch.testing.assert_close(logp, torch.tensor([math.log(0.1), math.log(0.9)]))
    h = -(0.1 * math.log(0.1) + 0.9 * math.log(0.9))
    torch.testing.assert_close(ent, torch.tensor([h, h]))


def test_compiled_flag_and_env_default(monkeypatch):
    calls = []
    compiled_rows = kernels._compiled_softmax_rows
    monkeypatch.setattr(kernels, "_compiled_softmax_rows",
                        lambda *a: calls.append(1) or compiled_rows(*a))
    hidden, weight, targets = make((30,), 16, 1000)
    out_c = token_logprobs(hidden, weight, targets, compiled=True)
    assert calls, "compiled=True must run the compiled chunk function"
    calls.clear()
    out_e = token_logprobs(hidden, weight, targets, compiled=False)
    monkeypatch.setattr(kernels, "COMPILED", False)  # what NANORLHF_EAGER=1 sets at import
    out_default = token_logprobs(hidden, weight, targets)
    assert not calls
    torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_default, out_e, atol=0, rtol=0)


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_never_holds_tokens_by_vocab(trainable):
    from benchmarks.bench_kernels import peak_bytes  # the benchmark's allocation-peak meter

    N, H, V, chunk = 2048, 32, 4096, 128
    full = N * V * 4  # bytes of fp32 logits for all tokens: 32 MiB
    hidden, weight, targets = make((N,), H, V)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(trainable)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    def step(fn):
        def go():
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                logp, ent = fn(h, w, targets, return_entropy=True)
            (-logp.mean() - 0.01 * ent.mean()).backward()
        return go

    fused_step = step(lambda *a, **kw: fused(*a, chunk_size=chunk, **kw))
    fused_step()  # warm up (compile) outside the measurement
    saved.clear()
    peak = peak_bytes(fused_step)
    assert 0 < sum(saved) < full / 8, f"saved {sum(saved) / 2**20:.1f} MiB for backward"
    assert peak < full / 4, f"peak {peak / 2**20:.1f} MiB vs {full / 2**20:.0f} MiB of logits"
    saved.clear()
    eager_peak = peak_bytes(step(eager_reference))  # the meters can fail: eager trips both
    assert sum(saved) >= full and eager_peak >= full


def test_kl_penalty_by_hand():
    # pi = 0.5, ref = 0.25: log r = log 2 = 0.693147, ratio ref/pi = 1/2
    # pi = 0.25, ref = 0.5: log r = -log 2,           ratio ref/pi = 2
    logp = torch.tensor([math.log(0.5), math.log(0.25)])
    ref = torch.tensor([math.log(0.25), math.log(0.5)])
    k1 = [0.693147, -0.693147]                 # log r
    k2 = [0.240227, 0.240227]                  # 0.5 * 0.693147^2
    k3 = [0.193147, 0.306853]                  # (1/2 - 1) + 0.693147, (2 - 1) - 0.693147
    for kind, want in (("k1", k1), ("k2", k2), ("k3", k3)):
        torch.testing.assert_close(kl_penalty(logp, ref, kind), torch.tensor(want),
                                   atol=1e-6, rtol=0)
    torch.testing.assert_close(kl_penalty(logp, logp, "k3"), torch.zeros(2))
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k4")


def test_kl_estimators_expectation_and_sign():
    g = torch.Generator().manual_seed(0)
    logp, ref = (torch.log_softmax(torch.randn(64, 7, generator=g) * 2, -1) for _ in range(2))
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    assert (kl_penalty(logp, ref, "k1") < 0).any()  # k1 is unbiased but not per-sample >= 0
    # Expectation under pi over the whole vocab: k1 and k3 are exactly KL(pi || ref).
    kl = (logp.exp() * (logp - ref)).sum(-1)
    for kind in ("k1", "k3"):
        torch.testing.assert_close((logp.exp() * kl_penalty(logp, ref, kind)).sum(-1), kl)
