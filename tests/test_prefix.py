import pytest
import torch

import train_rm
from nanorlhf import model as M
from nanorlhf import prefix
from nanorlhf.data import PairRow, collate
from nanorlhf.lora import add_lora, lora_layers


def reward_model(tiny_dir, attn="sdpa"):
    """The tiny Llama as a reward model with a LoRA adapter that does something (B != 0) and a trained head."""
    from transformers import AutoModelForSequenceClassification
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1, attn_implementation=attn)
    add_lora(model, r=4, alpha=8, verbose=False)
    for _, m in lora_layers(model):
        torch.nn.init.normal_(m.lora_B["default"].weight, std=0.05)
    train_rm.init_head(model.score)
    model.score.requires_grad_(True)
    return model.train()


def pairs():
    """Prompts and replies of different lengths, so every pass pads (and pass 2 pads between prompt and reply)."""
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(3, 1000, (n,), generator=g).tolist()  # noqa: E731
    return [PairRow(ids(7), ids(3), ids(5), None), PairRow(ids(2), ids(6), ids(1), None),
            PairRow(ids(11), ids(4), ids(4), None)]


def loss_and_grads(model, chosen, rejected):
    loss = train_rm.reward_loss(chosen, rejected, torch.tensor([0.0, 0.5, -0.2])).mean()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    return loss.detach(), grads


def two_rows(model, rows):
    """The reference: rows [prompt, chosen] and [prompt, rejected], each prompt computed twice."""
    batch = collate([(r.prompt, r.chosen) for r in rows] + [(r.prompt, r.rejected) for r in rows], 0)
    scores = M.reward_scores(model, batch["input_ids"], batch["attention_mask"])
    return scores[:len(rows)], scores[len(rows):]


def assert_same(model, shared, rows):
    """pair_scores' scores, loss and every gradient == the two rows'."""
    chosen, rejected, tokens = shared
    ours = loss_and_grads(model, chosen, rejected)
    ref_chosen, ref_rejected = two_rows(model, rows)
    torch.testing.assert_close(chosen, ref_chosen, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rejected, ref_rejected, atol=1e-5, rtol=1e-5)
    loss, grads = loss_and_grads(model, ref_chosen, ref_rejected)
    torch.testing.assert_close(ours[0], loss, atol=1e-6, rtol=1e-6)
    assert len(grads) > 2 and all(g.abs().sum() > 0 for g in grads)  # LoRA A and B of every layer, and the head
    for g, ref in zip(ours[1], grads):
        torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prompt_once_matches_two_rows_forward_and_backward(tiny_dir, attn):
    """The prompt's cache serving both replies gives the scores, loss and every gradient of the two rows, and runs
    each prompt once."""
    model, rows = reward_model(tiny_dir, attn), pairs()
    assert prefix.shares_prompt(model, rows)
    shared = prefix.pair_scores(model, rows, pad_id=0, device=torch.device("cpu"))
    assert shared[2] == sum(len(r.prompt) + len(r.chosen) + len(r.rejected) for r in rows)
    assert_same(model, shared, rows)


def test_checkpointing_runs_two_rows_with_grad_and_shares_without(tiny_dir):
    """Gradient checkpointing drops the cache in a pass with grad: there the two rows run (same numbers); without
    grad (evaluation) the cache survives and the prompt is shared again."""
    model, rows = reward_model(tiny_dir), pairs()
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert not prefix.shares_prompt(model, rows)
    shared = prefix.pair_scores(model, rows, pad_id=0, device=torch.device("cpu"))
    assert shared[2] == sum(2 * len(r.prompt) + len(r.chosen) + len(r.rejected) for r in rows)
    assert_same(model, shared, rows)
    with torch.no_grad():
        assert prefix.shares_prompt(model, rows)
        chosen, rejected, _ = prefix.pair_scores(model, rows, pad_id=0, device=torch.device("cpu"))
        ref_chosen, ref_rejected = two_rows(model, rows)
    torch.testing.assert_close(torch.cat([chosen, rejected]), torch.cat([ref_chosen, ref_rejected]),
                               atol=1e-5, rtol=1e-5)


def test_a_sliding_window_shorter_than_the_rows_runs_two_rows(tiny_dir):
    """Pass 2's columns are the longest prompt + the longest reply (padding between them included); a window shorter
    than that would cut what the two rows see, so they run instead."""
    model, rows = reward_model(tiny_dir), pairs()  # longest prompt 11, longest reply 6
    model.config.sliding_window = 17
    assert prefix.shares_prompt(model, rows)
    model.config.sliding_window = 16
    assert not prefix.shares_prompt(model, rows)
    with torch.no_grad():
        chosen, rejected, tokens = prefix.pair_scores(model, rows, pad_id=0, device=torch.device("cpu"))
        assert torch.equal(torch.cat([chosen, rejected]), torch.cat(two_rows(model, rows)))
