"""The sampling engine: every response nanorlhf samples (PPO's and GRPO's rollouts, the labeller, the evaluation)
comes from `generate` here.

    out = generate(model, tokenizer, prompts, max_new_tokens=48, temperature=0.7)   # prompts: token-id lists

What it does for speed, each step in plain view in `generate`:
  1. prefill: each distinct prompt once, however many of its samples the batch holds (GRPO's groups, the labeller's
     k); its keys and values are then copied to every row that samples it (as nanochat's Engine does);
  2. decode: one token per row per step, into a KV cache allocated once for the whole response, so a step writes its
     column instead of concatenating every layer's cache (`Preallocated`); a row that emitted a stop token leaves
     the batch, cache and all, and costs nothing after;
  3. on CUDA, the decode step runs compiled as CUDA graphs (`compiled_step`), which removes the launch cost that
     bounds a small batch's step; on a CPU it runs eagerly (compiled, it was slower there: docs/benchmarks.md).

What it keeps exact:
  - each token is drawn from softmax(z / T) (optional top-p) where z are fp32 logits h·Wᵀ formed from the final
    hidden state exactly as the fused logprob kernel forms them (nanorlhf/kernels.py): the distribution sampled is
    the one PPO and GRPO score, in every dtype. (A bf16 lm_head would round z to 3 significant digits: 0.014-0.018
    nats a token between the sampled and the scored logprobs of SmolLM2 at T = 0.7.)
  - nothing else from the checkpoint's generation_config is applied (repetition penalties, top-k, suppressed
    tokens): those would sample from another distribution than the one the KL and the ratio assume. Only its stop
    tokens are read: a stop rule, which changes where a response ends, not what is drawn.
  - each row draws its uniforms from a generator of its own, so a row's stream does not depend on which other rows
    share its batch or when they end: two models given the same prompts and seed draw the same stream per row.
"""
import inspect
import itertools

import torch
from transformers.cache_utils import DynamicLayer

from .cli import UserError
from .kernels import chunk_rows
from .model import lm_head


DECODE = ["auto", "eager", "compiled"]
DECODE_HELP = ("How a decoding step runs: compiled as CUDA graphs (torch.compile's reduce-overhead mode, static "
               "shapes), eager, or auto: compiled on a GPU, eager on a CPU (compiled, it was slower on a 2-core CPU). "
               "Both sample the same distribution.")


def sample_token(logits, temperature, top_p=1.0, u=None):
    """(B,) one token per row of logits (B, V): drawn from softmax(logits / temperature), renormalised over the top-p
    nucleus (the fewest most likely tokens whose mass reaches top_p; Holtzman et al. 2020) when top_p < 1;
    temperature 0 is the argmax. u (B,): the rows' uniforms in [0, 1), default torch.rand.

    The draw inverts the CDF with one uniform per row (torch.multinomial draws an exponential for every vocabulary
    entry: 31 ms a step at 32 × 49k on a 2-core CPU). The CDF is summed in float64: in float32, once the running sum
    nears 1 a token with p < 2⁻²⁴ adds nothing to it, so it would get probability 0 or about 2⁻²⁴ instead of p."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)  # (B, V)
    order = None
    if top_p < 1:
        probs, order = probs.sort(-1, descending=True)
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0)  # mass before it reaches top_p: outside
    cdf = probs.cumsum(-1, dtype=torch.float64)  # (B, V), non-decreasing; its last entry is the total mass
    if u is None:
        u = torch.rand(len(cdf), device=cdf.device)
    u = (1 - u.to(cdf)[:, None]) * cdf[:, -1:]  # (B, 1), uniform on (0, total]
    token = torch.searchsorted(cdf, u).squeeze(1)  # the first i with cdf[i] >= u > cdf[i-1]: probs[i] > 0
    return token if order is None else order.gather(-1, token[:, None]).squeeze(1)


def left_pad(prompts, pad_id, device=None):
    """Token-id prompts as (B, P) queries, left-padded so that every prompt ends at the last column, and their
    query_mask, 1 on prompt tokens."""
    B, P = len(prompts), max(len(p) for p in prompts)
    queries = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    query_mask = torch.zeros_like(queries)
    for b, p in enumerate(prompts):
        queries[b, P - len(p):], query_mask[b, P - len(p):] = torch.tensor(p), 1
    return queries, query_mask


def stop_ids(model, tokenizer):
    """The ids that end a response: the tokenizer's EOS and every EOS id the checkpoint's generation_config lists
    (Llama 3.x Instruct lists <|end_of_text|>, <|eom_id|> and <|eot_id|>, its tokenizer's EOS being the last)."""
    listed = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    listed = listed if isinstance(listed, (list, tuple)) else [listed]
    return sorted({tokenizer.eos_token_id, *listed} - {None})


def context_length(config):
    """The most positions the model takes (None where its config does not say)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def check_lengths(config, max_prompt_length, max_new_tokens):
    """Refuse, before anything runs or is written, a prompt budget plus response budget that the model's positions
    cannot hold."""
    n = context_length(config)
    if n is not None and max_prompt_length + max_new_tokens > n:
        raise UserError(f"--max-prompt-length {max_prompt_length} + --max-new-tokens {max_new_tokens} = "
                        f"{max_prompt_length + max_new_tokens} tokens exceed the model's context of {n}; lower one")


def row_seeds(n):
    """One seed per row, drawn from the global generator, so torch.manual_seed (and a resumed run's saved state)
    still decides every draw."""
    return torch.randint(0, 2**62, (n,)).tolist()


class Preallocated(DynamicLayer):
    """One full-attention layer's KV cache as buffers (rows, heads, capacity, head_dim): a decode step writes its
    column in place, where transformers' DynamicLayer concatenates the whole cache at every step.

    Eager, the model sees what a DynamicLayer shows it: `keys` and `values` are the filled part, and transformers
    builds the attention mask for that length. Static (for a compiled step), every step has the same shapes: the
    model reads the whole buffers, the unwritten positions masked out, and the step writes at a position held in a
    tensor, so a captured graph replays unchanged from step to step."""

    def __init__(self, layer, capacity, static=False):
        super().__init__()
        n = layer.keys.shape[-2]
        self.key_buffer = layer.keys.new_zeros(*layer.keys.shape[:2], capacity, layer.keys.shape[-1])
        self.value_buffer = layer.values.new_zeros(*layer.values.shape[:2], capacity, layer.values.shape[-1])
        self.key_buffer[:, :, :n], self.value_buffer[:, :, :n] = layer.keys, layer.values
        self.length, self.static = n, static
        self.position = torch.tensor([n], device=layer.keys.device)  # static: where the next step writes
        self.device, self.is_initialized = layer.keys.device, True
        self._show()

    def _show(self):
        n = self.key_buffer.shape[2] if self.static else self.length
        self.keys, self.values = self.key_buffer[:, :, :n], self.value_buffer[:, :, :n]
        if self.static and self.device.type == "cuda":  # a graph reads and writes these in place: fixed addresses
            for t in (self.key_buffer, self.value_buffer, self.position):
                torch._dynamo.mark_static_address(t)

    def update(self, key_states, value_states, *args, **kwargs):
        if self.static:  # one column, at a position kept in a tensor
            self.key_buffer.index_copy_(2, self.position, key_states)
            self.value_buffer.index_copy_(2, self.position, value_states)
            self.position += 1
            return self.keys, self.values
        n = self.length + key_states.shape[-2]
        self.key_buffer[:, :, self.length:n] = key_states
        self.value_buffer[:, :, self.length:n] = value_states
        self.length = n
        self._show()
        return self.keys, self.values

    def reorder_cache(self, rows):
        """Keep (and repeat) the batch rows `rows` (b,), in that order."""
        self.key_buffer, self.value_buffer = self.key_buffer[rows], self.value_buffer[rows]
        self._show()


def preallocate(cache, capacity, static=False):
    """Swap each full-attention layer of a transformers cache for a `Preallocated` one of `capacity` positions, static
    if asked and every layer is one (a static step needs them all); returns whether they are static. Other layer
    kinds (sliding windows, linear attention) keep their own cache: correct, only not preallocated."""
    layers = getattr(cache, "layers", [])
    plain = [type(layer) is DynamicLayer and layer.keys is not None and layer.keys.numel() > 0 for layer in layers]
    static = static and bool(layers) and all(plain)
    for i, ok in enumerate(plain):
        if ok:
            layers[i] = Preallocated(layers[i], capacity, static)
    return static


def _step(body, cache, cache_kw, tokens, positions, mask):
    """hidden (b, H): the model's base (no lm_head: the engine forms fp32 logits itself) fed one token per row."""
    out = body(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None], use_cache=True,
               **{cache_kw: cache})
    return out.last_hidden_state[:, -1]


def _eager_step(*args):
    """`_step` run eagerly, through decoder layers compiled for training (--compile) too: their graphs, traced for a
    whole sequence, would be traced again at every decoding step."""
    with torch.compiler.set_stance("force_eager"):
        return _step(*args)


_COMPILED = {}


def compiled_step(device):
    """`_step` compiled once per process for static shapes: on CUDA as CUDA graphs (mode "reduce-overhead"), which
    replay a whole step in one launch; elsewhere as plain inductor code (on a 2-core CPU slower than eager, so only
    asked for by --decode compiled, and by the tests)."""
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    if mode not in _COMPILED:
        _COMPILED[mode] = torch.compile(_step, mode=mode, dynamic=False)
    return _COMPILED[mode]


def cache_keyword(model):
    """transformers 5.2x renamed the forward's `past_key_values` to `cache`; take whichever this model has."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens, temperature=1.0, top_p=1.0, seeds=None, decode="auto"):
    """Sample a response to each token-id prompt (identical prompts give independent samples); temperature 0 is
    greedy. seeds: one int per row for its uniforms (default: drawn from the global generator, `row_seeds`).
    decode: "eager", "compiled" (a static-shape step, `compiled_step`), or "auto": compiled on CUDA, else eager.

    Returns a dict: queries (B, P) the prompts left-padded (every prompt ends where its response starts) and
    query_mask; responses (B, R) cut after their first stop token (`stop_ids`) and right-padded, R the longest, with
    mask (B, R) 1 on their tokens, lengths (B,), and ended (B,) whether each one emitted a stop token."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    queries, query_mask = left_pad(prompts, pad, device)  # (B, P)
    B, P = queries.shape
    n = context_length(model.config)
    if n is not None and P + max_new_tokens > n:
        raise UserError(f"--max-new-tokens {max_new_tokens}: a {P}-token prompt and its response would need "
                        f"{P + max_new_tokens} positions, more than the model's {n}; lower --max-new-tokens or "
                        "--max-prompt-length")
    stops = torch.tensor(stop_ids(model, tokenizer), device=device)
    weight, scale = lm_head(model)
    weight = weight.float()  # (V, H), once per call, as the kernel does: the logits' operands are the scorer's
    tile = chunk_rows(B, weight.shape[0])  # rows whose (rows, V) logits, probabilities and CDF are alive at once
    generators = [torch.Generator().manual_seed(s) for s in (seeds if seeds is not None else row_seeds(B))]
    was_training = model.training
    model.eval()  # gradient checkpointing disables the KV cache in train mode
    try:
        # 1. prefill: each distinct prompt once; `source` (B,) says which one each row samples, and its keys and values
        # are copied to that row (`reorder_cache` with repeated indices)
        distinct, first = {}, []  # prompt -> its number; the first row of each
        for i, p in enumerate(map(tuple, prompts)):
            if p not in distinct:
                distinct[p] = len(first)
                first.append(i)
        source = torch.tensor([distinct[tuple(p)] for p in prompts], device=device)  # (B,)
        positions = (query_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P): left padding, each prompt starts at 0
        cache_kw = cache_keyword(model.base_model)
        with torch.compiler.set_stance("force_eager"):  # as `_eager_step`
            out = model.base_model(input_ids=queries[first], attention_mask=query_mask[first],
                                   position_ids=positions[first], use_cache=True)
        cache = out.get(cache_kw)
        if cache is None:  # decoding on without it would feed each new token with no context
            raise UserError(f"{type(model).__name__} returned no KV cache (`{cache_kw}`); generation needs a causal "
                            "LM that caches")
        static = preallocate(cache, P + max_new_tokens, decode == "compiled" or (decode == "auto" and
                                                                               device.type == "cuda"))
        cache.reorder_cache(source)
        hidden = out.last_hidden_state[source, -1]  # (B, H) the state before each row's first response token
        step = compiled_step(device) if static else _eager_step

        # 2. decode. `rows` (b,) are the original rows of the batch, `live` which of them still sample. Eager, a row
        # that stops leaves the batch at once, cache and all. Static, the batch keeps its shape (a dead row's step is
        # computed and ignored) until half its rows are dead, so a compiled step meets at most log2(B) batch sizes.
        mask = torch.zeros(B, P + max_new_tokens, dtype=torch.bool, device=device)  # (b, capacity) attended
        mask[:, :P] = query_mask.bool()
        position = positions[:, -1]  # (b,)
        rows, live = torch.arange(B, device=device), torch.ones(B, dtype=torch.bool, device=device)
        responses = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=device)
        lengths = torch.full((B,), max_new_tokens, device=device)
        ended = torch.zeros(B, dtype=torch.bool, device=device)
        for t in range(max_new_tokens):
            u = torch.cat([torch.rand(1, generator=generators[r]) for r in rows.tolist()]).to(device)
            token = torch.cat([sample_token(torch.mm(h.float(), weight.t()), temperature / scale, top_p, v)
                               for h, v in zip(hidden.split(tile), u.split(tile))])  # fp32 logits, as the kernel's
            responses[rows[live], t] = token[live]
            stopped = live & torch.isin(token, stops)
            lengths[rows[stopped]], ended[rows[stopped]] = t + 1, True  # the stop token is part of the response
            live &= ~stopped
            if t + 1 == max_new_tokens or not bool(live.any()):
                break
            if not bool(live.all()) and (not static or 2 * int(live.sum()) <= len(live)):  # drop the dead rows
                keep = live.nonzero().squeeze(1)
                rows, live, token, position, mask = rows[keep], live[keep], token[keep], position[keep], mask[keep]
                cache.reorder_cache(keep)
            mask[:, P + t] = True
            position = position + 1
            if static:  # the whole capacity, as an additive mask: the same shape every step
                attend = torch.zeros(mask.shape, dtype=hidden.dtype, device=device)
                attend = attend.masked_fill(~mask, torch.finfo(hidden.dtype).min)[:, None, None]
            else:
                attend = mask[:, :P + t + 1]
            hidden = step(model.base_model, cache, cache_kw, token, position, attend)
    finally:
        model.train(was_training)
    R = int(lengths.max())
    mask = (torch.arange(R, device=device)[None] < lengths[:, None]).long()
    return {"queries": queries, "query_mask": query_mask, "responses": responses[:, :R].masked_fill(mask == 0, pad),
            "mask": mask, "lengths": lengths, "ended": ended}


@torch.no_grad()
def generate_all(model, tokenizer, prompts, max_new_tokens, temperature=1.0, batch_size=8, desc=None, decode="auto"):
    """`generate` over many token-id prompts, at most `batch_size` rows at a time, with a progress bar when `desc` is
    given. Returns each response's token ids (cut after its stop token) and whether it ended with one, in prompt
    order.

    Batches hold prompts of similar length (sorted), so little of each is left-padding, and a batch takes the copies
    of a prompt whole, so they share one prefill (a prompt with more copies than `batch_size` is split). Each row's
    seed is drawn up front, in prompt order, so a row's samples depend on its prompt and the global seed alone: two
    models given the same prompts and seed draw the same random stream per row."""
    from tqdm.auto import tqdm
    seeds = row_seeds(len(prompts))
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), prompts[i]))  # copies side by side
    batches = [[]]
    for _, copies in itertools.groupby(order, key=lambda i: prompts[i]):
        copies = list(copies)
        for k in range(0, len(copies), batch_size):
            part = copies[k:k + batch_size]
            if len(batches[-1]) + len(part) > batch_size:
                batches.append([])
            batches[-1] += part
    responses, ended = [None] * len(prompts), [None] * len(prompts)
    for rows in tqdm(batches, desc=desc, disable=desc is None, dynamic_ncols=True):
        out = generate(model, tokenizer, [prompts[j] for j in rows], max_new_tokens, temperature,
                       seeds=[seeds[j] for j in rows], decode=decode)
        for j, r, n, e in zip(rows, out["responses"].cpu(), out["lengths"].cpu(), out["ended"].tolist()):
            responses[j], ended[j] = r[:n].tolist(), e
    return responses, ended
