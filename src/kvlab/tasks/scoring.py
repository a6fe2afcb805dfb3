"""Answer scoring: exact match, substring and token F1 over normalised text (SQuAD rules).

A verbatim answer (a password: case and punctuation are the answer) is matched on its exact
characters by `exact` and `substring`; `f1` stays on normalised tokens.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    pred = normalize(prediction)
    return float(any(pred == normalize(a) for a in answers))


def substring_match(prediction: str, answers: Sequence[str]) -> float:
    """1 when some accepted answer appears in the prediction (after normalising both)."""
    pred = normalize(prediction)
    return float(any(normalize(a) and normalize(a) in pred for a in answers))


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """The best token-overlap F1 against any accepted answer."""
    pred_tokens = normalize(prediction).split()
    best = 0.0
    for answer in answers:
        gold = normalize(answer).split()
        common = Counter(pred_tokens) & Counter(gold)
        overlap = sum(common.values())
        if not pred_tokens or not gold or overlap == 0:
            score = float(pred_tokens == gold)
        else:
            precision, recall = overlap / len(pred_tokens), overlap / len(gold)
            score = 2 * precision * recall / (precision + recall)
        best = max(best, score)
    return best


SCORERS = {"exact": exact_match, "substring": substring_match, "f1": token_f1}


def verbatim_exact(prediction: str, answers: Sequence[str]) -> float:
    """1 when the prediction, less surrounding space, quotes and a closing period, is an answer."""
    pred = prediction.strip().strip("'\"").removesuffix(".").strip("'\"")
    return float(any(pred == a for a in answers))


def verbatim_substring(prediction: str, answers: Sequence[str]) -> float:
    """1 when some answer appears in the prediction character for character."""
    return float(any(a and a in prediction for a in answers))


VERBATIM = {"exact": verbatim_exact, "substring": verbatim_substring, "f1": token_f1}


def score(prediction: str, answers: Sequence[str], verbatim: bool = False) -> dict[str, float]:
    scorers = VERBATIM if verbatim else SCORERS
    return {name: fn(prediction, answers) for name, fn in scorers.items()}
