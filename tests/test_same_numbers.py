"""The numbers every stage computes, pinned: a refactor that means to change no behaviour must leave them alone.

Each of the six scripts runs a few optimizer steps on a tiny random Llama of conftest.py, on CPU, in float32, from
--seed 0, in a subprocess with OMP_NUM_THREADS=1 (so the thread count cannot change a reduction's order). PPO and
GRPO sample from one whose EOS is likely (`ending_model`), so their steps hold responses that end and responses cut
at --max-new-tokens, and the test checks they do. Every per-step metric it writes to metrics.jsonl (losses, eval
losses, scores, KL, grad norms, lr, ...; timings left out) is compared with tests/same_numbers.json:
  - bit for bit when this machine has the signature the record was made on (torch and transformers versions, CPU
    architecture and kernel path, bf16 instructions, float32 matmul precision);
  - on another machine, within a relative 1e-4 plus an absolute 2e-5: a kernel of another CPU sums in another order.
    Losses, scores and grad norms then move by ~1e-6 relative, but metrics that are differences of nearly equal
    numbers (KL, implicit rewards, PPO's pg_loss near 0) by up to ~2e-6 absolute (measured against this machine's
    AVX2 path: ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 with a fresh TORCHINDUCTOR_CACHE_DIR), hence the
    absolute floor. Squares of a small log-ratio (PPO's approx_kl, GRPO's k3 kl: 1e-9 to 3e-4 here) sit below that
    floor, and their rounding scales with them (at most 8e-4 relative on the AVX2 path), so they are compared
    relatively, within 1e-2. A real change of behaviour (a default, a loss term, the data order) moves them by far
    more: β 0.1 -> 0.11 in DPO, 0.12 in KTO or vf_coef 0.1 -> 0.12 in PPO each fail both ways.
The test says which of the two comparisons ran (a warning when it is the tolerance). The knobs the runs do not set
(--lr, --warmup, --weight-decay, --max-grad-norm, --lora-r, ...) keep their defaults, so moving a flag must not
change its default either.

Re-record ONLY for an intended numeric change (a fixed bug, a new default), and say so in the commit:

    python tests/test_same_numbers.py --record
"""
import json
import os
import platform
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import transformers
from conftest import ROOT
from test_dpo import pairs as preference_pairs
from test_kto import labelled
from test_sft import alpaca

RECORD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "same_numbers.json")
RTOL, ATOL = 1e-4, 2e-5
SQUARES, SQUARES_RTOL = {("ppo", "approx_kl"), ("grpo", "kl")}, 1e-2  # compared relatively, see above
TIMING = ("step_time", "tokens_per_s", "peak_mem_gb", "time/", "perf/")
COMMON = ["--device", "cpu", "--dtype", "float32", "--seed", "0", "--max-steps", "3", "--log-every", "100"]


def signature():
    """What decides the bits of a float32 CPU run, besides the code."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return {"torch": torch.__version__, "transformers": transformers.__version__, "machine": platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def ending_model(path, tokenizer):
    """The tiny random Llama with the EOS row of its (tied) lm_head turned towards the mean final hidden state of the
    runs' chat prompts, so that within 6 new tokens some responses end and some do not: the online stages' numbers
    then cover EOS (kept in the mask, the score on it) as well as truncation. Saved to `path`."""
    from conftest import tiny_llama
    from nanorlhf.data import render_prompt
    model = tiny_llama(len(tokenizer))
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": f"Say something {i}."}]) for i in range(8)]
    with torch.no_grad():
        d = model.model(torch.tensor(prompts)).last_hidden_state.reshape(-1, model.config.hidden_size).mean(0)
        model.get_input_embeddings().weight[tokenizer.eos_token_id] = 5 * d / d.norm() ** 2
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def commands(tmp_path, tiny_dir, tiny_rm_dir, tokenizer):
    """stage -> argv of a short run; each writes <tmp_path>/<stage>/metrics.jsonl."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something {i}."}) + "\n" for i in range(16)))
    offline = ["--model", tiny_dir, "--batch-size", "2", "--grad-accum", "2", "--max-length", "48",
               "--eval-frac", "0.25", "--eval-every", "2"]
    online = ["--model", ending_model(tmp_path / "ending", tokenizer), "--rm", tiny_rm_dir, "--data", str(prompts),
              "--max-new-tokens", "6", "--sample-every", "0"]
    return {
        "sft": ["train_sft.py", *offline, "--data", alpaca(tmp_path / "sft.json"), "--samples", "0"],
        "rm": ["train_rm.py", *offline, "--data", preference_pairs(tmp_path / "rm.json", n=8), "--norm-samples", "6"],
        "dpo": ["train_dpo.py", *offline, "--data", preference_pairs(tmp_path / "dpo.json", n=8)],
        "kto": ["train_kto.py", *offline, "--data", labelled(tmp_path / "kto.json", n=8)],
        "ppo": ["train_ppo.py", *online, "--rollout-batch-size", "4", "--minibatch-size", "2", "--batch-size", "2",
                "--ppo-epochs", "2"],
        "grpo": ["train_grpo.py", *online, "--rollout-batch-size", "2", "--num-generations", "2", "--ppo-epochs",
                 "2", "--minibatch-size", "2", "--beta", "0.1"],
    }


def run(stage, argv, out):
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, *argv, "--out", out, *COMMON], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, f"{stage}: {r.stderr[-3000:]}"
    path = os.path.join(out, "metrics.jsonl")
    assert os.path.exists(path), f"{stage} wrote no metrics.jsonl"
    with open(path) as f:
        lines = [json.loads(line) for line in f]
    lines = [{k: v for k, v in line.items() if not k.startswith(TIMING)} for line in lines]
    assert sum("loss" in line for line in lines) == 3, f"{stage} wrote no loss for some of its 3 steps: {lines}"
    return lines


def same(a, b, exact, relative=False):
    if isinstance(a, float) and isinstance(b, float):
        if a != a and b != b:  # NaN where the record has NaN
            return True
        if exact:
            return a == b
        if relative:
            return abs(a - b) <= SQUARES_RTOL * max(abs(a), abs(b))
        return abs(a - b) <= RTOL * max(abs(a), abs(b)) + ATOL
    return a == b


def how(exact):
    return ("bit for bit (this machine has the record's signature)" if exact else
            f"within rtol {RTOL} + atol {ATOL} (squares of a log-ratio within rtol {SQUARES_RTOL}), since this "
            f"machine's signature {signature()} differs from the record's and its kernels may round differently")


def compare(stage, recorded, got, exact):
    assert len(got) == len(recorded), f"{stage}: {len(got)} metrics lines, the record has {len(recorded)}"
    for want, have in zip(recorded, got):
        for key, value in want.items():  # a new metric is fine; a recorded one must be there, with its value
            assert key in have, f"{stage} step {want.get('step')}: no {key!r} any more"
            assert same(value, have[key], exact, (stage, key) in SQUARES), (
                f"{stage} step {want.get('step')} {key}: {have[key]!r}, recorded {value!r}; compared {how(exact)}")


def test_every_stage_computes_the_recorded_numbers(tiny_dir, tiny_rm_dir, tokenizer, tmp_path):
    stages = commands(tmp_path, tiny_dir, tiny_rm_dir, tokenizer)
    with ThreadPoolExecutor(2) as pool:  # one thread each, so two stages at a time fill the two cores
        lines = pool.map(lambda stage: run(stage, stages[stage], str(tmp_path / stage)), stages)
        runs = dict(zip(stages, lines))
    for stage in ("ppo", "grpo"):  # the sampled responses both end and run to the limit, or EOS goes unchecked
        assert any(0 < line["eos_frac"] < 1 for line in runs[stage]), f"{stage}: {runs[stage]}"
    if os.environ.get("NANORLHF_RECORD_SAME_NUMBERS"):
        with open(RECORD, "w") as f:
            json.dump({"signature": signature(), "stages": runs}, f, indent=1)
            f.write("\n")
        return
    with open(RECORD) as f:
        record = json.load(f)
    assert set(record["stages"]) == set(runs), "re-record: the stages changed"
    exact = record["signature"] == signature()
    print(f"same numbers compared {how(exact)}")
    if not exact:
        warnings.warn(f"same numbers compared {how(exact)}")
    for stage, lines in runs.items():
        compare(stage, record["stages"][stage], lines, exact)


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit(f"usage: python {sys.argv[0]} --record   (re-record tests/same_numbers.json; run it under pytest "
                 "to compare)")
    os.environ["NANORLHF_RECORD_SAME_NUMBERS"] = "1"
    sys.exit(pytest.main(["-x", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__)]))
