"""The shared training plumbing: data stream, schedule, NaN guard, atomic checkpoints, --out safety."""
import json
import math
import os

import pytest
import torch

from nanorlhf.cli import UserError
from nanorlhf.loop import Loop, Stream, adamw, check_out, checkpoints, cosine_with_warmup, total_steps
from train_sft import Args


def args_for(tmp_path, **kw):
    a = Args(out=str(tmp_path / "run"), data="x", batch_size=2, grad_accum=1, max_steps=6, lr=0.1, warmup=0,
              log_every=100, **kw)
    check_out(a)
    return a


def make_loop(args, modules, n_examples, groups=None):
    """A Loop as a stage builds one: its own AdamW (one group, or `groups`) and warmup-cosine schedule."""
    params = groups or [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    steps = total_steps(args.max_steps, args.epochs, n_examples, args.batch_size * args.grad_accum)
    optimizer = adamw(params, args.optim, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(steps, args.warmup))
    return Loop(args, modules, optimizer, scheduler, n_examples, steps, args.max_grad_norm)


def test_stream_visits_every_example_once_per_epoch_and_resumes():
    s = Stream(10, seed=3)
    first = s.take(4) + s.take(4) + s.take(2)
    assert sorted(first) == list(range(10))
    state = s.state_dict()
    nxt = s.take(7)
    assert sorted(nxt + s.take(3)) == list(range(10)) and nxt != first[:7]  # a new shuffle each epoch
    t = Stream(10, seed=3)
    t.load_state_dict(state)
    assert t.take(7) == nxt


def test_cosine_with_warmup_values():
    f = cosine_with_warmup(total=10, warmup=2)
    assert [f(0), f(1)] == [1 / 3, 2 / 3]
    assert f(2) == 1.0 and math.isclose(f(6), 0.5) and f(10) == 0.0
    assert cosine_with_warmup(100, 0.1)(9) == 10 / 11  # a fraction < 1 means a share of the steps


def test_nan_loss_skips_the_step_and_training_continues(tmp_path):
    args = args_for(tmp_path, max_bad_steps=2)
    layer = torch.nn.Linear(3, 1)
    loop = make_loop(args, {"layer": layer}, n_examples=4)
    for step in loop:
        before = layer.weight.detach().clone()
        loss = layer(torch.ones(2, 3)).sum() * (float("nan") if step == 3 else 1.0)
        loss.backward()
        metrics = loop.optimizer_step()
        assert torch.equal(layer.weight, before) == (step == 3)
        loop.end_step({"loss": loss.item(), **metrics})
    with open(os.path.join(args.out, "metrics.jsonl")) as f:
        skipped = [json.loads(line)["skipped_steps"] for line in f]
    assert skipped == [0, 0, 1, 1, 1, 1]


def test_too_many_bad_steps_stop_with_a_message(tmp_path):
    args = args_for(tmp_path, max_bad_steps=2)
    layer = torch.nn.Linear(3, 1)
    loop = make_loop(args, {"layer": layer}, n_examples=4)
    with pytest.raises(UserError, match="2 optimizer steps in a row had a NaN/inf"):
        for _ in loop:
            (layer(torch.ones(2, 3)).sum() * float("inf")).backward()
            loop.end_step(loop.optimizer_step())


def test_a_run_whose_every_step_was_skipped_is_an_error(tmp_path):
    """Fewer NaN steps than --max-bad-steps, but no step trained: not a finished run."""
    layer = torch.nn.Linear(3, 1)
    loop = make_loop(args_for(tmp_path, max_bad_steps=10), {"layer": layer}, n_examples=4)
    steps = []
    with pytest.raises(UserError, match="all 6 optimizer steps had a NaN/inf loss or gradient and were skipped"):
        for step in loop:
            (layer(torch.ones(2, 3)).sum() * float("nan")).backward()
            loop.end_step(loop.optimizer_step())
            steps.append(step)
    assert steps == [1, 2, 3, 4, 5, 6]  # it ran to the end, and raised there


def test_checkpoint_rotation_and_crash_mid_save(tmp_path, monkeypatch):
    args = args_for(tmp_path, save_every=2, keep_checkpoints=2)
    layer = torch.nn.Linear(3, 1)
    loop = make_loop(args, {"layer": layer}, n_examples=4)
    for step in loop:
        layer(torch.ones(2, 3)).sum().backward()
        loop.end_step(loop.optimizer_step())
    assert [os.path.basename(c) for c in checkpoints(args.out)] == ["checkpoint-4", "checkpoint-6"]
    # a crash while writing checkpoint 8 leaves only a .tmp folder behind, which resume ignores
    loop.step = 8

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        loop.save_checkpoint()
    assert os.path.isdir(os.path.join(args.out, ".tmp-checkpoint-8"))
    assert os.path.basename(checkpoints(args.out)[-1]) == "checkpoint-6"


def test_out_folder_is_never_clobbered(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    a = Args(out=str(out), data="x")
    with pytest.raises(UserError, match="already holds a finished run; pass --resume .* or --overwrite"):
        check_out(a)
    a.resume = True
    with pytest.raises(UserError, match="no checkpoint"):
        check_out(a)
    assert (out / "config.json").exists()
    a.resume, a.overwrite = False, True
    check_out(a)
    assert not (out / "config.json").exists()


def test_param_groups_are_clipped_apart(tmp_path):
    """A critic with a huge gradient must not shrink the policy's step: each param group is clipped on its own."""
    args = args_for(tmp_path, max_grad_norm=1.0)
    policy, critic = torch.nn.Linear(2, 1, bias=False), torch.nn.Linear(2, 1, bias=False)
    loop = make_loop(args, {"policy": policy, "critic": critic}, n_examples=4,
                     groups=[{"params": list(policy.parameters()), "name": "policy"},
                             {"params": list(critic.parameters()), "name": "critic"}])
    policy.weight.grad = torch.tensor([[0.3, 0.4]])    # norm 0.5: under the limit, left alone
    critic.weight.grad = torch.tensor([[30.0, 40.0]])  # norm 50: scaled to 1
    seen = {}
    real_step = loop.optimizer_step.optimizer.step

    def spy():
        seen["policy"], seen["critic"] = policy.weight.grad.clone(), critic.weight.grad.clone()
        real_step()
    loop.optimizer_step.optimizer.step = spy
    metrics = loop.optimizer_step()
    torch.testing.assert_close(seen["policy"], torch.tensor([[0.3, 0.4]]))
    torch.testing.assert_close(seen["critic"], torch.tensor([[0.6, 0.8]]))
    assert metrics["grad_norm/policy"] == pytest.approx(0.5) and metrics["grad_norm/critic"] == pytest.approx(50.0)


def test_resuming_with_another_optimizer_layout_is_a_one_line_error(tmp_path):
    """A checkpoint whose optimizer had one group (PPO before its critic had its own) does not fit two groups."""
    layer, head = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    one = make_loop(args_for(tmp_path), {"layer": layer, "head": head}, n_examples=4)
    state = one.optimizer_step.state_dict()
    two = make_loop(args_for(tmp_path / "b"), {"layer": layer, "head": head}, n_examples=4,
                    groups=[{"params": list(layer.parameters()), "name": "policy"},
                            {"params": list(head.parameters()), "name": "critic"}])
    with pytest.raises(UserError, match="--resume: the checkpoint's optimizer does not fit"):
        two.optimizer_step.load_state_dict(state)


def run_steps(args, n=3):
    layer = torch.nn.Linear(3, 1)
    loop = make_loop(args, {"layer": layer}, n_examples=4)
    for step in loop:
        layer(torch.ones(2, 3)).sum().backward()
        loop.end_step({"loss": float(step), **loop.optimizer_step()})
        if step == n:
            break
    return loop


def test_report_to_tensorboard_gets_every_metric(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    args = args_for(tmp_path, report_to="tensorboard")
    run_steps(args)
    events = EventAccumulator(os.path.join(args.out, "runs"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert {"grad_norm", "lr", "step_time"} <= set(events.Tags()["scalars"])


def test_report_to_wandb_logs_through_its_api(tmp_path, monkeypatch):
    import sys
    import types
    logged, inits = [], []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: inits.append(kw) or types.SimpleNamespace(log=lambda d, step: logged.append((step, d)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    args = args_for(tmp_path, report_to="wandb")
    run_steps(args)
    assert inits[0]["project"] == "nanorlhf" and inits[0]["name"] == "run" and inits[0]["config"]["lr"] == 0.1
    assert [(s, d["loss"]) for s, d in logged] == [(1, 1.0), (2, 2.0), (3, 3.0)] and "step" not in logged[0][1]


def test_report_to_without_the_package_is_a_one_line_error(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(UserError, match="--report-to wandb needs wandb"):
        run_steps(args_for(tmp_path, report_to="wandb"))
