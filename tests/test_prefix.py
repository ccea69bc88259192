import pytest
import torch

import train_rm
from nanorlhf import model as M
from nanorlhf import prefix
from nanorlhf.data import PairRow, collate
from nanorlhf.lora import add_lora, lora_layers


def test_pack_and_mask_by_hand():
    """Row 0: prompt (5, 6), chosen (7), rejected (8, 9); row 1 is longer, so row 0 ends in one padding column."""
    rows = [PairRow([5, 6], [7], [8, 9], None), PairRow([5], [7, 7], [8, 8, 8], None)]
    b = prefix.pack(rows, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0], [5, 7, 7, 8, 8, 8]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 2, 3, 0], [0, 1, 2, 1, 2, 3]]  # rejected restarts after prompt
    assert b["segments"].tolist() == [[0, 0, 1, 2, 2, -1], [0, 1, 1, 2, 2, 2]]
    assert b["chosen_end"].tolist() == [2, 2] and b["rejected_end"].tolist() == [4, 5]
    mask = prefix.attention_mask(b["segments"])
    assert mask.shape == (2, 1, 6, 6)
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0, 0, 0],   # p
                                         [1, 1, 0, 0, 0, 0],   # p
                                         [1, 1, 1, 0, 0, 0],   # c: the prompt and itself
                                         [1, 1, 0, 1, 0, 0],   # r: the prompt and itself, not c
                                         [1, 1, 0, 1, 1, 0],   # r
                                         [1, 1, 0, 0, 0, 1]]   # padding: the prompt and itself
    assert mask[1, 0].int().tolist() == [[1, 0, 0, 0, 0, 0],
                                         [1, 1, 0, 0, 0, 0],
                                         [1, 1, 1, 0, 0, 0],
                                         [1, 0, 0, 1, 0, 0],
                                         [1, 0, 0, 1, 1, 0],
                                         [1, 0, 0, 1, 1, 1]]


def reward_model(tiny_dir, attn):
    """The tiny Llama as a reward model with a LoRA adapter that does something (B != 0) and a trained head."""
    from transformers import AutoModelForSequenceClassification
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1, attn_implementation=attn)
    add_lora(model, r=4, alpha=8, verbose=False)
    for _, m in lora_layers(model):
        torch.nn.init.normal_(m.lora_B["default"].weight, std=0.05)
    train_rm.init_head(model.score)
    model.score.requires_grad_(True)
    return model


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_pairs_match_two_rows_forward_and_backward(tiny_dir, attn):
    """One packed row per pair gives the scores, loss and every gradient of the two rows [prompt, reply] that
    M.reward_scores computes, over pairs whose prompts and replies differ in length (so both layouts pad)."""
    model = reward_model(tiny_dir, attn)
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(3, 1000, (n,), generator=g).tolist()  # noqa: E731
    rows = [PairRow(ids(7), ids(3), ids(5), None), PairRow(ids(2), ids(6), ids(1), None),
            PairRow(ids(11), ids(4), ids(4), None)]
    margin = torch.tensor([0.0, 0.5, -0.2])

    def loss_and_grads(chosen, rejected):
        loss = train_rm.reward_loss(chosen, rejected, margin).mean()
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad()
        return loss.detach(), grads

    assert prefix.shares_prompt(model, rows)
    chosen, rejected, tokens = prefix.pair_scores(model, rows, pad_id=0, device=torch.device("cpu"))
    assert tokens == sum(len(r.prompt) + len(r.chosen) + len(r.rejected) for r in rows)  # each prompt once
    packed = loss_and_grads(chosen, rejected)

    batch = collate([(r.prompt, r.chosen) for r in rows] + [(r.prompt, r.rejected) for r in rows], 0)
    scores = M.reward_scores(model, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(chosen, scores[:3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rejected, scores[3:], atol=1e-5, rtol=1e-5)
    loss, grads = loss_and_grads(scores[:3], scores[3:])
    torch.testing.assert_close(packed[0], loss, atol=1e-6, rtol=1e-6)
    assert len(grads) > 2 and all(g.abs().sum() > 0 for g in grads)  # LoRA A and B of every layer, and the head
    for ours, ref in zip(packed[1], grads):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_rows_past_a_sliding_window_are_scored_as_two_rows(tiny_dir):
    """A 4D mask switches off a model's sliding window, so a pair longer than the window is not packed; its scores
    are still those of the two rows."""
    model = reward_model(tiny_dir, "sdpa")
    rows = [PairRow([5, 6, 7], [8, 9], [10], None)]
    model.config.sliding_window = 5
    assert prefix.shares_prompt(model, rows)  # prompt + the longer reply: 5 tokens, within the window
    model.config.sliding_window = 4
    assert not prefix.shares_prompt(model, rows)
    with torch.no_grad():
        chosen, rejected, tokens = prefix.pair_scores(model, rows, pad_id=0, device=torch.device("cpu"))
        batch = collate([([5, 6, 7], [8, 9]), ([5, 6, 7], [10])], 0)
        scores = M.reward_scores(model, batch["input_ids"], batch["attention_mask"])
    assert tokens == 9 and torch.equal(torch.cat([chosen, rejected]), scores)
    model.config._attn_implementation = "flash_attention_2"  # takes no 4D mask
    model.config.sliding_window = None
    assert not prefix.shares_prompt(model, rows)
