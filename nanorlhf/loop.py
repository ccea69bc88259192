"""The training plumbing every stage shares, written once: the plumbing flags, output folder, the data stream,
NaN guard, atomic checkpoints, exact resume and signals. Where the numbers go is nanorlhf/log.py's Log.

A stage builds its optimizer and schedule itself, hands them to the Loop, and calls, per optimizer step:

    for step in loop:                                 # resumes, stops after `steps` or on SIGTERM
        for idx in loop.batches(args.batch_size, args.grad_accum):  # micro-batches of example indices
            (loss / args.grad_accum).backward()
        metrics |= loop.optimizer_step()              # GuardedStep: clip, skip NaN/inf, step, schedule
        loop.end_step(metrics)                        # log it (loop.log: tqdm, metrics.jsonl), checkpoint
    if loop.interrupted:                              # a signal: the checkpoint holds the run, no final save
        return
"""
import json
import math
import os
import random
import shlex
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass

import torch
from . import dist
from .cli import UserError, arg
from .formats import FORMATS
from .log import Log
from .perf import peak_memory_gb


@dataclass
class RunArgs:
    """The plumbing every stage shares, with the same names in every script: data and output folders, resume,
    device and dtype, quantisation, LoRA, saving and logging, the seed. What a stage learns with (--model, the
    learning rate, batch sizes, lengths, steps, evaluation) each script declares itself, with its own defaults."""
    data: str = arg("", "Training data (for PPO and GRPO, prompts): .json/.jsonl file (alpaca, sharegpt, messages, "
                    "prompt/completion, preference, hh, ranked, prompt) or a hub dataset id.")
    format: str | None = arg(None, "Force the data format instead of detecting it.", choices=list(FORMATS))
    limit: int | None = arg(None, "Use only the first N training examples (quick runs).", gt=0)
    out: str = arg("", "Output folder (checkpoints, metrics.jsonl, the final model).")
    overwrite: bool = arg(False, "Delete what --out holds and start over.")
    resume: bool = arg(False, "Continue from the newest checkpoint in --out.")
    lora_r: int = arg(16, "LoRA rank; 0 = full fine-tuning.", ge=0)
    lora_alpha: float = arg(32.0, "LoRA alpha; the update is scaled by alpha / r.", gt=0)
    load_in_4bit: bool = arg(False, "Quantise the frozen base to 4-bit NF4 (QLoRA). Needed for 7-8B on 24 GB.")
    load_in_8bit: bool = arg(False, "Quantise the frozen base to 8-bit.")
    optim: str = arg("adamw", "Optimizer; adamw8bit keeps Adam moments in 8 bits (bitsandbytes).",
                     choices=["adamw", "adamw8bit"])
    gradient_checkpointing: bool = arg(False, "Recompute activations in backward: less memory, ~30% slower. "
                                       "Turn on for 7B.")
    compile: bool = arg(False, "torch.compile each decoder layer for the passes that train and score (one compile "
                        "that every layer shares, 15-60 s on a 2-core CPU): an update took 0.75x the time in bf16 and "
                        "0.82x in fp32 there. Sampling stays eager on a CPU.")
    device: str = arg("auto", "cuda, cpu, or auto (cuda when available).")
    dtype: str = arg("auto", "Compute dtype; auto = bf16 on GPUs that support it, else fp32 (bfloat16 on a CPU with "
                     "AVX512-BF16 or AMX is about 1.4x faster end to end).",
                     choices=["auto", "float32", "bfloat16", "float16"])
    seed: int = arg(0, "Random seed (data order, LoRA init, sampling). Under torchrun every rank starts from it (LoRA "
                    "starts equal everywhere), then rank r samples from seed + r.")
    save_every: int = arg(0, "Write a checkpoint every N optimizer steps (0 = only on interrupt).", ge=0)
    keep_checkpoints: int = arg(2, "Keep the newest K checkpoints.", gt=0)
    log_every: int = arg(1, "Print a human-readable line every N steps (metrics.jsonl gets every step).", gt=0)
    max_bad_steps: int = arg(5, "Stop after this many NaN/inf steps in a row.", gt=0)
    report_to: str = arg("none", "Also send every metric to TensorBoard (event files in <out>/runs) or Weights & "
                         "Biases (project nanorlhf, run named after --out); needs that extra installed.",
                         choices=["none", "tensorboard", "wandb"])


def check_out(args):
    """Refuse to touch a non-empty --out unless told to resume or overwrite: users never lose a run."""
    if not args.out:
        raise UserError("--out is required: the folder for checkpoints, metrics.jsonl and the final model")
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite contradict each other; pick one")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a file; expected a folder for the run (new or to resume)")
    exists = os.path.isdir(args.out) and os.listdir(args.out)
    if exists and not (args.resume or args.overwrite):
        what = "a finished run" if os.path.exists(os.path.join(args.out, "config.json")) else "files"
        raise UserError(f"--out {args.out} already holds {what}; pass --resume to continue it or --overwrite to "
                        f"start over")
    if args.resume and not checkpoints(args.out):
        raise UserError(f"--resume: no checkpoint in {args.out} to resume from")
    dist.barrier()  # every rank has checked the folder before rank 0 changes it
    if dist.is_main():
        if args.overwrite and exists:
            shutil.rmtree(args.out)
        os.makedirs(args.out, exist_ok=True)
    dist.barrier()


def checkpoints(out):
    """Complete checkpoints, oldest first. Half-written ones live under a .tmp name and never match."""
    if not os.path.isdir(out):
        return []
    names = [n for n in os.listdir(out) if n.startswith("checkpoint-") and n[11:].isdigit()]
    return [os.path.join(out, n) for n in sorted(names, key=lambda n: int(n[11:]))]


def write_checkpoint(out, step, state, keep):
    """<out>/checkpoint-<step>/state.pt via a temporary folder, fsync and rename: a crash mid-save leaves the previous
    checkpoint intact. Then only the newest `keep` checkpoints stay."""
    final = os.path.join(out, f"checkpoint-{step}")
    tmp = os.path.join(out, f".tmp-checkpoint-{step}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with open(os.path.join(tmp, "state.pt"), "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in checkpoints(out)[:-keep]:
        shutil.rmtree(old)


def read_checkpoint(path):
    """A checkpoint's state, refused when another number of processes wrote it (each rank's RNG state is in it)."""
    state = torch.load(os.path.join(path, "state.pt"), weights_only=False)
    if state["world_size"] != dist.world():
        raise UserError(f"--resume: {path} was written by {state['world_size']} process(es) and this run has "
                        f"{dist.world()}; resume with the same torchrun --nproc_per_node")
    return state


def rng_state():
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def adamw(params, optim="adamw", **kw):
    """torch's AdamW, or with --optim adamw8bit bitsandbytes' AdamW8bit (Adam's moments in 8 bits). `params`: a list
    of parameters or of param groups; `kw`: AdamW's own (lr, weight_decay, ...)."""
    if optim == "adamw8bit":
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(params, **kw)
    return torch.optim.AdamW(params, **kw)


def total_steps(max_steps, epochs, n_examples, per_step):
    """Optimizer steps of a run (PPO and GRPO: iterations): max_steps, else enough for `epochs` passes over
    n_examples when every rank takes per_step of them a step."""
    return max_steps or max(1, math.ceil(epochs * n_examples / (per_step * dist.world())))


def cosine_with_warmup(total, warmup):
    """LR multiplier: linear warmup to 1, then cosine decay to 0 at `total` steps."""
    warmup = int(warmup * total) if warmup < 1 else int(warmup)
    def f(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


class Stream:
    """Example indices in a seeded shuffled order, epoch after epoch; its position is checkpointed."""

    def __init__(self, n, seed):
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0

    def take(self, k):
        out = []
        while len(out) < k:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
            step = min(k - len(out), self.n - self.pos)
            out += order[self.pos:self.pos + step].tolist()
            self.pos += step
        return out

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, s):
        self.epoch, self.pos = s["epoch"], s["pos"]


class GuardedStep:
    """The optimizer step with its guard: the gradient summed over ranks, each param group clipped to max_grad_norm
    (0 = never) on its own, and a NaN/inf gradient (from a NaN loss too) skipping the step instead of poisoning the
    weights; max_bad_steps of those in a row stop the run."""

    def __init__(self, optimizer, scheduler, max_grad_norm, max_bad_steps, out):
        self.optimizer, self.scheduler, self.max_grad_norm = optimizer, scheduler, max_grad_norm
        self.max_bad_steps, self.out = max_bad_steps, out  # out: where to point at the last good checkpoint
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.bad_steps, self.skipped = 0, 0

    def __call__(self):
        """Clip and step; the metrics: grad_norm (per named param group), lr and the skipped steps so far."""
        dist.all_sum_grads(self.params)  # each rank's loss was scaled by global counts: the sum is the global gradient
        max_norm = self.max_grad_norm or float("inf")
        norms = {group.get("name", ""): torch.nn.utils.clip_grad_norm_(group["params"], max_norm)
                 for group in self.optimizer.param_groups}
        ok = all(bool(torch.isfinite(n)) for n in norms.values())
        if ok:
            self.optimizer.step()
            self.bad_steps = 0
        else:
            self.bad_steps, self.skipped = self.bad_steps + 1, self.skipped + 1
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.bad_steps >= self.max_bad_steps:
            last = checkpoints(self.out)
            raise UserError(f"{self.bad_steps} optimizer steps in a row had a NaN/inf loss or gradient; stopped. "
                            f"Last good checkpoint: {last[-1] if last else 'none'}. Try a lower --lr.")
        grad_norms = {f"grad_norm/{name}" if name else "grad_norm": float(n) for name, n in norms.items()}
        return grad_norms | {"lr": self.scheduler.get_last_lr()[0], "skipped_steps": self.skipped}

    def nothing_trained(self):
        """Every step so far was skipped (the scheduler steps once per step, skipped or not, and is checkpointed)."""
        return 0 < self.skipped == self.scheduler.last_epoch

    def state_dict(self):
        return {"skipped": self.skipped, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state):
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as e:  # e.g. a PPO checkpoint from before the critic had a parameter group of its own
            raise UserError(f"--resume: the checkpoint's optimizer does not fit this run's ({e}); it was written by "
                            "another version or with other flags, so start a new --out") from None
        self.scheduler.load_state_dict(state["scheduler"])
        self.skipped = state["skipped"]


class Loop:
    """Everything about a run but the algorithm and its optimizer: the data stream, the guarded optimizer step
    (`loop.optimizer_step()`), checkpoints, signals and resume; every step goes to its Log, `loop.log`. `modules` are
    checkpointed by their trainable parameters; `stateful` objects (e.g. a KL controller) by their state_dicts."""

    def __init__(self, args, modules, optimizer, scheduler, n_examples, steps, max_grad_norm=0.0, stateful=None):
        """steps: optimizer steps (PPO and GRPO: iterations) to run, see total_steps; max_grad_norm: see GuardedStep,
        which logs each param group's norm as grad_norm/<its "name">."""
        self.args, self.modules, self.stateful = args, modules, dict(stateful or {})
        self.optimizer_step = GuardedStep(optimizer, scheduler, max_grad_norm, args.max_bad_steps, args.out)
        self.stream = Stream(n_examples, args.seed)  # the same order on every rank; each takes its own share
        self.total_steps = steps
        self.device = next(p for m in modules.values() for p in m.parameters()).device  # whose memory to report
        self.step, self.stop, self.interrupted = 0, False, False
        if dist.rank():  # every rank initialised from the shared --seed; from here each samples its own responses
            # (rank 0 keeps its stream, so one process runs as it always did)
            torch.manual_seed(args.seed + dist.rank())
        if args.resume:  # restores every rank's own RNG state
            self._load(checkpoints(args.out)[-1])
        elif dist.is_main():
            with open(os.path.join(args.out, "args.json"), "w") as f:
                json.dump(asdict(args) | {"world_size": dist.world()}, f, indent=2)
        self.log = Log(args, self.step, steps)  # the stage's own lines go through loop.log too
        self.old_handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    def __iter__(self):
        """Yields the 1-based number of the step about to run."""
        self.t_step = time.perf_counter()  # an evaluation before step 1 is not part of step 1's time
        while self.step < self.total_steps and not self.interrupted:
            yield self.step + 1
        self.log.close()
        for sig, handler in self.old_handlers.items():
            signal.signal(sig, handler)
        if self.interrupted:  # the stage returns without its final save: the checkpoint holds the run
            argv = [a for a in sys.argv if a not in ("--resume", "--overwrite")]
            print(f"stopped by signal at step {self.step}; resume with:\n  python {shlex.join(argv)} --resume")
            return
        if self.optimizer_step.nothing_trained():  # the stage's save comes after this loop
            raise UserError(f"all {self.optimizer_step.skipped} optimizer steps had a NaN/inf loss or gradient and "
                            "were skipped: nothing was trained, so no model is saved. Check the data and rewards, "
                            "or lower --lr.")

    def take(self, n):
        """This rank's n example indices at the stream's position (the stream advances n × world size)."""
        return dist.shard(self.stream.take(n * dist.world()))

    def batches(self, batch_size, grad_accum):
        """grad_accum micro-batches of batch_size example indices for this rank."""
        return [self.take(batch_size) for _ in range(grad_accum)]

    def end_step(self, metrics):
        """Count the step, log it everywhere once, checkpoint when due or when a signal asked to stop."""
        self.step += 1
        now = time.perf_counter()
        metrics = {"step": self.step, **dist.mean_metrics({k: float(v) for k, v in metrics.items()})}
        metrics["step_time"] = now - self.t_step
        if "tokens" in metrics:
            metrics["tokens_per_s"] = metrics.pop("tokens") / metrics["step_time"]
        metrics["peak_mem_gb"] = peak_memory_gb(self.device)
        self.t_step = now
        self.log.metrics(metrics)
        self.stop = dist.all_sum(float(self.stop)) > 0  # a signal seen by any rank stops them all at this step
        if (self.args.save_every and self.step % self.args.save_every == 0) or self.stop:
            self.save_checkpoint()
        self.interrupted = self.stop  # the stage's `for step in loop` ends here; it checks loop.interrupted

    def _on_signal(self, signum, frame):
        if self.stop:  # a second Ctrl-C means now
            raise KeyboardInterrupt
        self.stop = True
        self.log.write(f"signal {signum}: finishing this step, then checkpointing")

    def state_dict(self):
        """Everything a resume needs; `rng` holds every rank's generators (sampling differs per rank)."""
        return {
            "step": self.step, "stream": self.stream.state_dict(), "rng": dist.gather(rng_state()),
            "world_size": dist.world(), **self.optimizer_step.state_dict(),
            "modules": {k: {n: p.detach() for n, p in m.named_parameters() if p.requires_grad}
                        for k, m in self.modules.items()},
            "stateful": {k: s.state_dict() for k, s in self.stateful.items()},
        }

    def save_checkpoint(self):
        """Write to a temporary folder, fsync, rename: a crash mid-save leaves the previous checkpoint intact."""
        state = self.state_dict()  # every rank takes part (their RNG states); rank 0 alone writes
        if dist.is_main():
            write_checkpoint(self.args.out, self.step, state, self.args.keep_checkpoints)
        dist.barrier()

    def _load(self, path):
        state = read_checkpoint(path)
        for k, m in self.modules.items():
            m.load_state_dict(state["modules"][k], strict=False)
        self.optimizer_step.load_state_dict(state)
        for k, s in self.stateful.items():
            s.load_state_dict(state["stateful"][k])
        self.stream.load_state_dict(state["stream"])
        self.step = state["step"]
        set_rng_state(state["rng"][dist.rank()])
        print(f"resumed from {path} at step {self.step}")
