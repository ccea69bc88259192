"""Draw a run's metrics.jsonl curves to PNG.

    python -m nanorlhf.plot out/ppo                 # -> out/ppo/metrics.png, one panel per metric
    python -m nanorlhf.plot out/ppo --keys score kl  # only these
"""
import argparse
import json
import math
import os
import sys

from .cli import UserError

FIRST = ("score", "kl", "loss", "eval_loss", "rewards/accuracy", "eval_rewards/accuracy", "entropy", "response_length")
SKIP = {"step", "skipped_steps"}


def read_metrics(run):
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.exists(path):
        raise UserError(f"{run}: no metrics.jsonl (is this a run's --out folder?)")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot(run, keys=None, out=None):
    """Write the PNG and return its path."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install -e '.[plots]'") from None
    rows = read_metrics(run)
    found = {k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and k not in SKIP}
    keys = keys or [k for k in FIRST if k in found] + sorted(found - set(FIRST))
    missing = [k for k in keys if k not in found]
    if missing:
        raise UserError(f"{run}: metrics.jsonl has no {missing}; it has {sorted(found)}")
    cols = min(4, len(keys))
    rows_n = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 2.8 * rows_n), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(r["step"], r[key]) for r in rows if key in r]
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, linewidth=1)
        if len(points) >= 30:  # an exponential moving average shows the trend through the noise
            ema, smooth = values[0], []
            for v in values:
                ema = 0.9 * ema + 0.1 * v
                smooth.append(ema)
            ax.plot(steps, smooth, linewidth=2)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(os.path.basename(os.path.normpath(run)))
    fig.tight_layout()
    out = out or os.path.join(run, "metrics.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def frontier(points, out, title="gold reward against KL to the SFT model"):
    """A reward-KL frontier PNG (Rafailov et al. 2023, Fig. 2): one marker per model at (KL to the baseline,
    mean gold reward ± standard error), one colour and line per method, in order of KL. `points` is a list of
    dicts with method, label, kl, mean and se. Returns the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for method in dict.fromkeys(p["method"] for p in points):
        mine = sorted((p for p in points if p["method"] == method), key=lambda p: p["kl"])
        ax.errorbar([p["kl"] for p in mine], [p["mean"] for p in mine], yerr=[p["se"] for p in mine], marker="o",
                    capsize=3, linewidth=1, label=method)
        for p in mine:
            if p.get("label"):
                ax.annotate(p["label"], (p["kl"], p["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("KL(π ‖ π_SFT) per response, nats")
    ax.set_ylabel("gold reward (mean ± s.e.)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="Run folders (each holds metrics.jsonl).")
    p.add_argument("--keys", nargs="+", help="Metrics to draw (default: all, the telling ones first).")
    p.add_argument("--out", help="PNG path (one run only; default RUN/metrics.png).")
    args = p.parse_args(argv)
    try:
        if args.out and len(args.runs) > 1:
            raise UserError("--out takes one run; without it each run gets RUN/metrics.png")
        for run in args.runs:
            print(plot(run, args.keys, args.out))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
