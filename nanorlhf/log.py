"""Where a run's numbers go, on rank 0: a tqdm progress bar, a human line every --log-every steps, every step in
<out>/metrics.jsonl, and with --report-to TensorBoard or Weights & Biases too. The Loop holds one as `loop.log`;
a stage logs its evaluations and samples through it:

    loop.log.metrics({"step": 0, "eval_loss": ...})   # before step 1
    loop.log.write("a line that leaves the bar intact")
    loop.log.final(loop.step, {"eval_loss": ...})      # held-out numbers after the last step
"""
import json
import os
import sys
from dataclasses import asdict

from tqdm.auto import tqdm

from . import dist
from .cli import UserError


def drop_metrics_after(path, step):
    """A resumed run logs its steps again: drop the lines its previous life logged after the checkpoint."""
    if os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if json.loads(line).get("step", 0) <= step]
        with open(path, "w") as f:
            f.writelines(kept)


def reporter(args, step):
    """A function that sends a metrics dict to --report-to, or None. The package is imported only when asked."""
    if args.report_to == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--report-to tensorboard needs tensorboard: pip install -e '.[tensorboard]'") from None
        # purge_step: a resumed run drops the events its previous life logged after the checkpoint
        writer = SummaryWriter(os.path.join(args.out, "runs"), purge_step=step + 1 if step else None)

        def send(metrics):
            for k, v in metrics.items():
                if k != "step":
                    writer.add_scalar(k, v, metrics["step"])
            writer.flush()
        return send
    if args.report_to == "wandb":
        try:
            import wandb
        except ImportError:
            raise UserError("--report-to wandb needs wandb: pip install -e '.[wandb]'") from None
        run = wandb.init(project="nanorlhf", name=os.path.basename(os.path.normpath(args.out)), config=asdict(args),
                         dir=args.out, resume="allow")
        return lambda metrics: run.log({k: v for k, v in metrics.items() if k != "step"}, step=metrics["step"])
    return None


class Log:
    """A run's log from `step` (0, or the step a resume starts at) to `total_steps`. Only rank 0 writes; the
    other ranks' bar is disabled and their metrics calls return at once."""

    def __init__(self, args, step, total_steps):
        self.path, self.every, self.total_steps = os.path.join(args.out, "metrics.jsonl"), args.log_every, total_steps
        if args.resume and dist.is_main():
            drop_metrics_after(self.path, step)
        self.report = reporter(args, step) if dist.is_main() else None
        self.bar = tqdm(total=total_steps, initial=step, dynamic_ncols=True, file=sys.stdout,
                        disable=not dist.is_main())

    def metrics(self, metrics):
        """One step's numbers: metrics.jsonl, --report-to, the bar, and a human line every --log-every."""
        if not dist.is_main():
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.report:
            self.report(metrics)
        self.bar.update(metrics["step"] - self.bar.n)
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "score", "kl", "lr")})
        if metrics["step"] % self.every == 0 or metrics["step"] == self.total_steps:
            self.bar.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))

    def final(self, step, metrics):
        """The held-out metrics after the last step, logged as final_<name> at that step."""
        self.metrics({"step": step, **{f"final_{k}": v for k, v in metrics.items()}})

    def write(self, text):
        """A line in the log that leaves the progress bar intact."""
        self.bar.write(text)

    def samples(self, prompts, responses, scores, label="score", extra=None):
        """A prompt -> response -> score table (PPO and GRPO, every --sample-every iterations); extra: {column: a
        value per response} that reward functions sent through TRL's log_extra, shown under each response."""
        for i, (prompt, response, score) in enumerate(zip(prompts, responses, scores)):
            more = "".join(f"\n    {k}: {str(v[i])[:200]!r}" for k, v in (extra or {}).items() if i < len(v))
            self.bar.write(f"--- prompt: {prompt[:200]!r}\n    response: {response[:300]!r}\n    {label}: {score:.3f}"
                           + more)

    def close(self):
        self.bar.close()
