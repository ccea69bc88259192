"""Data parallelism on the CPU with gloo, 2 processes: the math equals one process on the global batch, rank 0
alone writes, resume is exact under the same world size, bad input is one line from one rank."""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file
from test_reliability import sft_data, write_json

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _whiten_worker(rank, world, init_file, x, mask, out):
    """One of two gloo ranks: whiten its half of the batch and store the result."""
    import torch.distributed as dist

    from nanorlhf.rollout import whiten
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    half = len(x) // world
    mine = slice(rank * half, (rank + 1) * half)
    torch.save(whiten(x[mine], mask[mine]), f"{out}.{rank}")
    dist.destroy_process_group()


def test_whitening_uses_every_ranks_statistics(tmp_path):
    """PPO's advantage whitening on 2 ranks, each with half the rollouts, equals one process on all of them."""
    g = torch.Generator().manual_seed(0)
    x, mask = torch.randn(6, 5, generator=g) * 3 + 1, (torch.rand(6, 5, generator=g) > 0.3).long()
    mask[:, 0] = 1
    torch.multiprocessing.spawn(_whiten_worker, args=(2, str(tmp_path / "init"), x, mask, str(tmp_path / "w")), nprocs=2)
    from nanorlhf.rollout import whiten
    together = torch.cat([torch.load(tmp_path / f"w.{r}") for r in range(2)])
    torch.testing.assert_close(together, whiten(x, mask), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(torch.load(tmp_path / "w.0"), whiten(x[:3], mask[:3]), atol=1e-3)  # not local stats


def _kto_pairs_worker(rank, world, init_file, rows, batches, out):
    """One of two gloo ranks: its share of KTO's mismatched pairs, held-out (the rows load_data deals it) and of a
    step (its share of each micro-batch)."""
    import torch.distributed as dist

    import train_kto
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.save((train_kto.held_out_pairs(rows[rank::world], 100), train_kto.step_pairs(rows, batches[rank], 100)),
               f"{out}.{rank}")
    dist.destroy_process_group()


def test_kto_pairs_on_two_ranks_are_one_processs(tmp_path):
    """KTO's z₀ pairs completion i with prompt i+1 of the whole batch. On 2 ranks the pairs are one process's, split
    between the ranks, not pairs within each rank's own rows (which would pair other completions and prompts)."""
    import train_kto
    from nanorlhf.data import UnpairedRow
    rows = [UnpairedRow([i], [10 + i], i % 2 == 0) for i in range(5)]
    # one process's two micro-batches of 4 example indices; each rank holds half of each (Loop.take)
    step = [[3, 1, 4, 0], [2, 0, 1, 3]]
    batches = [[mb[:2] for mb in step], [mb[2:] for mb in step]]
    torch.multiprocessing.spawn(_kto_pairs_worker, args=(2, str(tmp_path / "init"), rows, batches,
                                                         str(tmp_path / "p")), nprocs=2)
    (held0, step0), (held1, step1) = (torch.load(tmp_path / f"p.{r}") for r in range(2))
    held = train_kto.mismatched(rows, 100)  # one process on all 5 held-out rows: 5 pairs
    assert len(held) == 5 and (held0, held1) == (held[0::2], held[1::2])
    pairs = train_kto.mismatched([rows[i] for mb in step for i in mb], 100)
    assert len(pairs) == 7 and (step0, step1) == (pairs[0::2], pairs[1::2])  # the last, 3 after 3, is matched
    assert ([2], [10]) not in held0 + held1  # within rank 0's own held-out rows 0, 2, 4 it would pair 0 with 2


def cpu_stand_in(spec):
    """A group spec that serves the devices `spec` serves, as torch reads it ("nccl" alone: cuda only), with gloo in
    place of NCCL, which a CPU build lacks: a CPU tensor can be reduced in it exactly when it can in `spec`'s."""
    import torch.distributed as dist
    pairs = [p.split(":") for p in spec.split(",")] if ":" in spec else \
        [(d, spec) for d in dist.Backend.backend_capability[spec]]
    return ",".join(f"{d}:{'gloo' if b == 'nccl' else b}" for d, b in pairs)


def _all_sum_worker(rank, world, init_file, spec, out):
    """One of two ranks in a group built like `spec`: sum a Python number, as every stage does, and store it."""
    import torch.distributed as dist

    from nanorlhf import dist as ndist
    dist.init_process_group(spec, init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(ndist.all_sum(rank + 1.5), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_numbers_are_summed_in_the_group_init_builds_on_cuda(tmp_path):
    """Under NCCL the group must also serve CPU tensors: `all_sum` reduces Python numbers on the CPU."""
    from nanorlhf.dist import backend
    spec = cpu_stand_in(backend(cuda=True))
    assert "cuda:gloo" in spec and cpu_stand_in("nccl") == "cuda:gloo"  # GPUs keep NCCL; the stand-in is faithful
    torch.multiprocessing.spawn(_all_sum_worker, args=(2, str(tmp_path / "init"), spec, str(tmp_path / "s")),
                                nprocs=2)
    assert [torch.load(tmp_path / f"s.{r}") for r in range(2)] == [4.0, 4.0]


def run(cmd, cwd=ROOT):
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONPATH=ROOT)
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900, env=env)


def losses(out, key="loss"):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(r["step"], r[key]) for r in map(json.loads, f) if key in r]


def adapter(out):
    return load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))


def assert_same_run(one, two):
    (s1, l1), (s2, l2) = zip(*losses(one)), zip(*losses(two))
    assert s1 == s2 == tuple(range(1, len(s1) + 1))
    assert l1 == pytest.approx(l2, abs=1e-5, rel=1e-5), (l1, l2)
    a, b = adapter(one), adapter(two)
    assert a.keys() == b.keys()
    for k in a:  # summation order differs in the last bits, and Adam's first steps move by ~lr whatever the size
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3)


def pairs_data(tmp_path):
    return write_json(tmp_path / "pairs.json", [{"prompt": f"Question {i}?", "chosen": f"Yes {i}.",
                                                  "rejected": f"No, not {i}."} for i in range(8)])


def desirable_data(tmp_path):
    """KTO examples, all desirable and alike but for their number: raising them raises the mismatched pairs' log-ratios
    too (an answer after another question), so z₀ moves off its clamp at 0."""
    return write_json(tmp_path / "kto.json", [{"prompt": f"Question {i}?", "completion": f"Yes {i}.", "label": True}
                                              for i in range(16)])


@pytest.mark.parametrize("stage", ["sft", "dpo", "kto"])
def test_two_ranks_equal_one_process_on_the_global_batch(tiny_dir, tmp_path, stage):
    """2 ranks × batch 2 (× grad-accum 2) give the per-step losses and the final adapter of 1 process × batch 4. KTO's
    z₀ is one process's too: its mismatched pairs are formed over every rank's examples."""
    data = {"sft": sft_data, "dpo": pairs_data, "kto": desirable_data}[stage](tmp_path)
    common = [f"train_{stage}.py", "--model", tiny_dir, "--data", data, "--max-steps", "3", "--grad-accum", "2",
              "--lr", "1e-2", "--eval-frac", "0", "--max-length", "48", "--log-every", "100"]
    common += ["--samples", "0"] if stage == "sft" else []
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    r1 = run([sys.executable] + common + ["--out", one, "--batch-size", "4"])
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = run(TORCHRUN + common + ["--out", two, "--batch-size", "2"])
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert_same_run(one, two)
    if stage == "kto":
        (s1, kl1), (s2, kl2) = zip(*losses(one, "kl")), zip(*losses(two, "kl"))
        assert s1 == s2 == (1, 2, 3) and max(kl1) > 0, kl1  # π = π_ref at step 1: z₀ 0; then it has moved
        assert kl1 == pytest.approx(kl2, abs=1e-6, rel=1e-5), (kl1, kl2)
    assert json.load(open(os.path.join(two, "args.json")))["world_size"] == 2
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(two).config.vocab_size == 49152  # rank 0's merged model loads


def test_ppo_and_grpo_run_on_two_ranks(tiny_dir, tmp_path, lengthy):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}."}) + "\n" for i in range(8)))
    common = ["--actor", tiny_dir, "--data", str(prompts), "--max-steps", "2", "--max-new-tokens", "4",
              "--reward-fn", lengthy, "--sample-every", "0", "--log-every", "100"]
    for script, extra in (("train_ppo.py", ["--rollout-batch-size", "2", "--minibatch-size", "2", "--ppo-epochs", "2"]),
                          ("train_grpo.py", ["--rollout-batch-size", "1", "--num-generations", "2", "--beta", "0.1"])):
        out = tmp_path / script
        # run from tmp_path, where the reward module is
        r = run(TORCHRUN + [os.path.join(ROOT, script)] + common + extra + ["--out", str(out)], cwd=tmp_path)
        assert r.returncode == 0, (script, r.stderr[-3000:])
        assert [s for s, _ in losses(out, "step_time")] == [1, 2]  # one line per step: rank 0 alone logs
        assert (out / "config.json").exists() and (out / "adapter" / "adapter_config.json").exists()


@pytest.mark.parametrize("script", ["train_ppo.py", "train_grpo.py"])
def test_an_epoch_of_prompts_counts_every_ranks_share(tiny_dir, tmp_path, script, lengthy):
    """8 prompts, 2 per rank per iteration, 2 ranks: one epoch is 2 iterations, not 4. (PPO runs --critic head
    here, so that critic runs under torchrun too; test_ppo_and_grpo_run_on_two_ranks runs the adapter critic.)"""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}."}) + "\n" for i in range(8)))
    extra = ["--num-generations", "2"] if script == "train_grpo.py" else ["--critic", "head"]
    out = tmp_path / "out"
    r = run(TORCHRUN + [os.path.join(ROOT, script), "--actor", tiny_dir, "--data", str(prompts), "--epochs", "1",
                        "--rollout-batch-size", "2", "--minibatch-size", "2", "--max-new-tokens", "2",
                        "--reward-fn", lengthy, "--sample-every", "0", "--log-every", "100",
                        "--out", str(out)] + extra, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [s for s, _ in losses(out, "step_time")] == [1, 2]
    (_, first), (_, last) = losses(out, "lr")  # each the mean over the iteration's updates
    assert last < first / 2  # the cosine ends with the epoch; one over 4 iterations is above half-way at the 2nd


@pytest.mark.parametrize("stage,frac", [("sft", "0.15"), ("dpo", "0.15"), ("kto", "0.1")])  # RM: as SFT
def test_a_rank_without_held_out_rows_still_evaluates(tiny_dir, tmp_path, stage, frac):
    """One held-out row (8 examples; KTO: 16, each pair split in two) on 2 ranks: the rank without one takes part
    in every evaluation with zeros, and the loss is the one row's, as one process computes it."""
    data = sft_data(tmp_path) if stage == "sft" else pairs_data(tmp_path)
    cmd = [f"train_{stage}.py", "--model", tiny_dir, "--data", data, "--eval-frac", frac, "--eval-every", "1",
           "--max-steps", "1", "--batch-size", "2", "--grad-accum", "1", "--max-length", "48", "--log-every", "100"]
    cmd += ["--samples", "0"] if stage == "sft" else []
    r2 = run(TORCHRUN + cmd + ["--out", str(tmp_path / "two")])
    assert r2.returncode == 0, r2.stderr[-3000:]
    r1 = run([sys.executable] + cmd + ["--out", str(tmp_path / "one")])
    assert r1.returncode == 0, r1.stderr[-2000:]
    for key in ("eval_loss", "final_eval_loss"):
        (s2, l2), = losses(tmp_path / "two", key)[-1:]
        (s1, l1), = losses(tmp_path / "one", key)[-1:]
        assert s1 == s2 == 1 and l2 == pytest.approx(l1, rel=1e-4), (key, l1, l2)


def test_ranks_sample_from_their_own_streams(tiny_dir, tmp_path):
    """Every prompt the same: after the shared seed set up equal adapters, the two ranks' responses still differ."""
    (tmp_path / "record.py").write_text(
        "import json, os\n"
        "def reward(prompts, responses):\n"
        "    with open(f'responses.{os.environ[\"RANK\"]}.json', 'w') as f:\n"
        "        json.dump(responses, f)\n"
        "    return [0.0] * len(responses)\n")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text((json.dumps({"prompt": "Say something."}) + "\n") * 4)
    r = run(TORCHRUN + [os.path.join(ROOT, "train_grpo.py"), "--actor", tiny_dir, "--data", str(prompts),
                        "--max-steps", "1", "--rollout-batch-size", "1", "--num-generations", "2",
                        "--max-new-tokens", "4", "--reward-fn", "record:reward", "--sample-every", "0",
                        "--out", str(tmp_path / "out")], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"responses.{rank}.json").read_text()) for rank in range(2))
    assert len(one) == len(two) == 2 and one != two


def test_resume_on_two_ranks_is_exact_and_refuses_another_world_size(tiny_dir, tmp_path):
    data = sft_data(tmp_path)
    cmd = ["train_sft.py", "--model", tiny_dir, "--data", data, "--max-steps", "4", "--batch-size", "2",
           "--grad-accum", "1", "--lr", "1e-2", "--eval-frac", "0", "--max-length", "48", "--samples", "0",
           "--save-every", "2", "--keep-checkpoints", "3", "--log-every", "100"]
    straight = tmp_path / "straight"
    r = run(TORCHRUN + cmd + ["--out", str(straight)])
    assert r.returncode == 0, r.stderr[-3000:]
    # the same run as if it had died after its step-2 checkpoint: keep that, drop everything after it
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoint-4")
    for f in glob.glob(str(resumed / "*.safetensors")) + [str(resumed / "config.json")]:
        os.remove(f)
    r = run([sys.executable] + cmd + ["--out", str(resumed), "--resume"])  # one process: refused, in one line
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --resume:"), r.stderr[-2000:]
    assert "written by 2 process(es)" in r.stderr and "Traceback" not in r.stderr
    r = run(TORCHRUN + cmd + ["--out", str(resumed), "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(resumed) == losses(straight)
    assert_same_run(str(straight), str(resumed))


def test_bad_input_on_two_ranks_is_one_line_from_one_rank(tiny_dir, tmp_path):
    logs = tmp_path / "logs"
    r = run(TORCHRUN[:-2] + ["--nproc_per_node", "2", "--log-dir", str(logs), "--redirects", "3", "train_sft.py",
                             "--model", tiny_dir, "--data", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")])
    assert r.returncode != 0
    rank_logs = glob.glob(str(logs / "**" / "std*.log"), recursive=True)
    assert len(rank_logs) == 4  # stdout and stderr of each rank
    text = "".join(open(f).read() for f in rank_logs)
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: data file not found: {tmp_path / 'missing.json'}"] and "Traceback" not in text


def test_columns_travel_with_their_prompts_on_two_ranks(tiny_dir, tmp_path):
    """A TRL-style reward reading an `answer` column under 2 gloo ranks: each rank gets its own prompts' answers.
    Neither function applies (None) to rank 0's 4 samples, nor to rank 1's first: the warning counts both ranks, once,
    and each function's logged mean, and the reward's, is over the samples it applies to on any rank, not NaN from
    rank 0 (and not 0 for the unscored samples)."""
    (tmp_path / "record.py").write_text(
        "import json, os\n"
        "RANK = os.environ['RANK']\n"
        "def reward(prompts, completions, answer, **kwargs):\n"
        "    with open(f'seen.{RANK}.json', 'w') as f:\n"
        "        json.dump(list(zip(prompts, answer)), f)\n"
        "    return [None if RANK == '0' or i == 0 else 0.5 for i in range(len(completions))]\n"
        "def half(prompts, completions, **kwargs):\n"
        "    return [None if RANK == '0' or i == 0 else 1.5 for i in range(len(completions))]\n")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}.", "answer": i}) + "\n" for i in range(8)))
    r = run(TORCHRUN + [os.path.join(ROOT, "train_grpo.py"), "--actor", tiny_dir, "--data", str(prompts),
                        "--max-steps", "1", "--rollout-batch-size", "2", "--num-generations", "2",
                        "--max-new-tokens", "2", "--reward-fn", "record:reward", "record:half", "--sample-every", "0",
                        "--out", str(tmp_path / "out")], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [line for line in r.stderr.splitlines() if "no --reward-fn applies" in line]
    assert len(warnings) == 1 and "applies to 5 of 8 responses" in warnings[0], warnings
    with open(tmp_path / "out" / "metrics.jsonl") as f:
        (metrics,) = [m for m in map(json.loads, f) if "reward/half" in m]
    assert (metrics["reward/reward"], metrics["reward/half"]) == (0.5, 1.5)
    assert metrics["reward"] == 0.5 + 1.5  # over the 3 scored samples: the 5 no function applied to have no score
    assert "advantage 0" in warnings[0]
    seen = [json.loads((tmp_path / f"seen.{rank}.json").read_text()) for rank in range(2)]
    assert all(p == f"Say {a}." for rank in seen for p, a in rank)  # every answer with its own prompt
    answers = [{a for _, a in rank} for rank in seen]
    assert all(len(rank) == 4 and len(a) == 2 for rank, a in zip(seen, answers)) and not answers[0] & answers[1]
