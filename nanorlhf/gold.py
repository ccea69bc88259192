"""Gold rewards: programmatic judges that stand in for a human, so alignment can be measured exactly.

With a known true reward, preference pairs are labelled by it, a reward model learns from those labels,
and every method is judged by the true reward on held-out prompts, against its KL to the starting model
(Ziegler et al. 2019 §4; Rafailov et al. 2023 §6.1; Gao et al. 2023). Use one wherever a reward function
goes: `--reward-fn nanorlhf.gold:sentiment` (PPO, the labeller, the evaluation).
"""
from .cli import UserError

_analyzer = None


def sentiment(prompts, responses):
    """How positive each response reads: VADER's compound score in [-1, 1] (Hutto & Gilbert 2014), a lexicon
    and rules, fast on a CPU. Needs the `demo` extra: pip install -e '.[demo]'."""
    global _analyzer
    if _analyzer is None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise UserError("nanorlhf.gold:sentiment needs vaderSentiment: pip install -e '.[demo]'") from None
        _analyzer = SentimentIntensityAnalyzer()
    return [_analyzer.polarity_scores(r)["compound"] for r in responses]
