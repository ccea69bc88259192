"""bf16 on the CPU: a base in bf16 with fp32 LoRA weights, through the compiled logprob kernel (fp32 inside), gives
every stage's loss and its LoRA gradients within bf16's tolerance of the same model in fp32 computed eagerly (full
logits, log_softmax, gather). bf16 keeps 8 bits of mantissa: a relative error near 2^-8 per op is its nature."""
import copy

import pytest
import torch
from conftest import tiny_llama

import train_dpo
import train_grpo
import train_kto
import train_ppo
import train_rm
import train_sft
from nanorlhf import model as M
from nanorlhf.lora import add_lora, use_adapter
from nanorlhf.rollout import join, response_slice

V, B, P, R = 49152, 4, 5, 6


@pytest.fixture(scope="module")
def models():
    """(fp32 model, bf16 model): the same weights, LoRA B non-zero so the adapter acts, LoRA fp32 in both."""
    m32 = tiny_llama(V, seed=1)
    add_lora(m32, 8, 16, name="policy", verbose=False)
    with torch.no_grad():
        for n, p in m32.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    m16 = copy.deepcopy(m32)
    for n, p in m16.named_parameters():
        if ".lora_" not in n:
            p.data = p.data.to(torch.bfloat16)
    return m32, m16


def batch():
    g = torch.Generator().manual_seed(0)
    queries, responses = torch.randint(3, V, (B, P), generator=g), torch.randint(3, V, (B, R), generator=g)
    query_mask, mask = torch.ones(B, P, dtype=torch.long), torch.ones(B, R, dtype=torch.long)
    query_mask[0, :2], mask[1, 4:] = 0, 0  # left-padded prompt, right-padded response
    rollout = {"queries": queries, "query_mask": query_mask, "responses": responses, "mask": mask}
    return join(**rollout), rollout


def eager_logprobs(model, input_ids, attention_mask, targets, temperature=1.0):
    """The fp32 reference: every logit, log_softmax, gather."""
    hidden = M.hidden_states(model, input_ids, attention_mask).float()
    logp = torch.log_softmax(hidden @ model.get_output_embeddings().weight.float().T / temperature, -1)
    return torch.where(targets != -100, logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1), 0.0)


def stage_losses(model, logprobs_fn, ref, rollout, inputs):
    """Each stage's loss on one batch, from per-token logprobs (B, T) of `logprobs_fn`; ref: fixed fp32 values."""
    input_ids, attention_mask, targets = inputs
    with use_adapter(model, "policy"):
        token_logp = logprobs_fn(model, input_ids, attention_mask, targets, 0.7)                   # (B, T)
        hidden = M.hidden_states(model, input_ids, attention_mask)                                 # (B, T, H)
    mask = rollout["mask"]
    logprobs, summed = response_slice(token_logp, rollout), token_logp.sum(-1)                     # (B, R), (B,)
    head = torch.ones(hidden.shape[-1]) / hidden.shape[-1] ** 0.5
    values = response_slice(hidden.float() @ head, rollout)                                       # (B, R)
    last = hidden[:, -1].float() @ head                                                           # (B,)
    advantages, returns = ref["advantages"], ref["returns"]
    pg, vf, _ = train_ppo.ppo_loss(logprobs, ref["logprobs"], values, ref["values"], advantages, returns, mask, 0.2,
                                   0.2)
    per_token, _ = train_grpo.grpo_loss(logprobs, ref["logprobs"], advantages, mask, 0.2, 0.28, ref["logprobs"], 0.05)
    return {
        "sft": train_sft.sft_loss(token_logp, targets, int((targets != -100).sum())),
        "rm": train_rm.reward_loss(last[:2], last[2:]).mean(),
        "dpo": train_dpo.dpo_loss(summed[:2], summed[2:], ref["summed"][:2], ref["summed"][2:], 0.1)[0].mean(),
        "kto": train_kto.kto_loss(summed, ref["summed"], torch.tensor([True, False, True, False]), 0.1, 0.1)[0].mean(),
        "ppo": pg + 0.1 * vf,
        "grpo": train_grpo.aggregate(per_token, mask, "grpo", B, int(mask.sum()), R),
    }


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "kto", "ppo", "grpo"])
def test_bf16_loss_and_lora_grads_match_fp32_eager(models, stage):
    m32, m16 = models
    inputs, rollout = batch()
    with torch.no_grad(), use_adapter(m32, None):  # fixed references, the same for both precisions
        base = eager_logprobs(m32, *inputs, 0.7)
    g = torch.Generator().manual_seed(1)
    ref = {"logprobs": response_slice(base, rollout) - 0.01, "summed": base.sum(-1) - 0.5,
           "values": torch.randn(B, R, generator=g) * 0.1, "advantages": torch.randn(B, R, generator=g),
           "returns": torch.randn(B, R, generator=g)}
    results = []
    for model, fn in ((m32, eager_logprobs), (m16, M.logprobs)):
        model.zero_grad(set_to_none=True)
        loss = stage_losses(model, fn, ref, rollout, inputs)[stage]
        loss.backward()
        grads = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if ".lora_" in n])
        assert grads.dtype == torch.float32  # LoRA weights, their gradients and Adam's states stay fp32
        results.append((loss.detach().float(), grads))
    (loss32, grad32), (loss16, grad16) = results
    torch.testing.assert_close(loss16, loss32, rtol=2e-2, atol=1e-2)
    cosine = torch.nn.functional.cosine_similarity(grad16, grad32, dim=0)
    assert cosine > 0.99, f"{stage}: cosine {cosine:.4f}"
    assert (grad16.norm() / grad32.norm() - 1).abs() < 0.05
