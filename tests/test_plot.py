import json

import pytest

from nanorlhf.cli import UserError
from nanorlhf.plot import plot


def test_plot_writes_a_png_with_one_panel_per_metric(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"step": s, "loss": 1 / s, "kl": 0.1 * s} for s in range(1, 41)] + [{"step": 40, "eval_loss": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = plot(str(tmp_path))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image
    h, w = matplotlib.image.imread(path).shape[:2]
    assert w == 3 * 400  # three metrics side by side at 4 in x 100 dpi
    with pytest.raises(UserError, match="no \\['score'\\]"):
        plot(str(tmp_path), keys=["score"])
    with pytest.raises(UserError, match="no metrics.jsonl"):
        plot(str(tmp_path / "nope"))
