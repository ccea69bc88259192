"""What DPO and KTO share: summed response logprobs of (prompt, completion) rows, for the policy or
the reference, and the reference computed once over a whole dataset (`--precompute-ref`).

Both losses score a response by log π(y|x) = Σ_t log π(y_t | x, y_<t), the sum over its tokens
(EOS included), not the mean (Rafailov et al. 2023, eq. 7; Ethayarajh et al. 2024).
"""
import torch

from . import model as M
from .data import collate


def summed_logprobs(model, seqs, pad_id, ref_model=None, reference=False, temperature=1.0):
    """Σ_t log π(y_t) over each completion, (N,), for N (prompt_ids, completion_ids) rows in one forward.

    reference=True: the reference instead, without grad: `ref_model`, or `model` with adapters disabled.
    temperature: of the distribution scored (evaluation compares models at the sampling temperature).
    """
    device = next(model.parameters()).device
    b = {k: v.to(device) for k, v in collate(seqs, pad_id).items()}
    inputs = b["input_ids"], b["attention_mask"], b["targets"]  # (N, T) each; targets -100 off the completion
    if reference:
        return M.reference_logprobs(model, ref_model, *inputs, temperature).sum(-1)  # (N, T) -> (N,)
    return M.logprobs(model, *inputs, temperature).sum(-1)                           # (N, T) -> (N,)


@torch.no_grad()
def precompute_reference(model, ref_model, seqs, pad_id, batch_size):
    """Reference summed logprobs (N,) of every row, on the CPU, computed once, `batch_size` rows per forward.

    Call it before `Loop` loads a checkpoint: then `model` is still the untrained start, which is the
    reference itself even for full fine-tuning (no frozen copy needed), and a resumed run recomputes
    exactly the same numbers. Batch rows as the later forward will (e.g. evaluation): the same batch
    gives the same bits, another padding only the same value up to rounding.
    """
    return torch.cat([summed_logprobs(model, seqs[i:i + batch_size], pad_id, ref_model, reference=True).cpu()
                      for i in range(0, len(seqs), batch_size)])
