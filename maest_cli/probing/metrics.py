"""Tagging metrics: macro ROC-AUC and macro PR-AUC (average precision), scikit-learn's definitions.

Macro averages are over the tags present in the split: a tag whose column there is all 0
or all 1 has no ROC curve, so it is left out of BOTH macro averages of that split (the same
tags for both figures) and listed in results.json, never a crash. This differs from calling
scikit-learn with average="macro" on the whole matrix, which gives no ROC-AUC for such a tag
(NaN) and counts its average precision as 0 (all-0) or 1 (all-1). `fast_macro_roc_auc` is the
same ROC-AUC computed from ranks (Mann-Whitney U, ties as average ranks) for all tags at once;
it scores the validation split after every epoch, where calling scikit-learn per tag would
cost as much as the epoch. The final test figures come from scikit-learn itself.
"""

from __future__ import annotations

import numpy as np

MACRO_AVERAGE = ("mean over the tags present in the split (at least one positive and one negative track "
                 "there); tags all-0 or all-1 in the split are left out of both averages and listed in "
                 "excluded_tags")


def evaluable(y: np.ndarray) -> np.ndarray:
    """[C] bool: tags with at least one positive and one negative track."""
    pos = np.asarray(y).sum(0)
    return (pos > 0) & (pos < len(y))


def fast_macro_roc_auc(y: np.ndarray, scores: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Macro ROC-AUC over the evaluable tags (mask: precomputed `evaluable(y)`); NaN if none,
    or if any score is not finite."""
    from scipy.stats import rankdata

    mask = evaluable(y) if mask is None else mask
    if not mask.any() or not np.isfinite(scores).all():
        return float("nan")
    yy = np.asarray(y)[:, mask].astype(np.float64)
    ranks = rankdata(np.asarray(scores)[:, mask], axis=0)
    n_pos = yy.sum(0)
    n_neg = len(yy) - n_pos
    auc = ((ranks * yy).sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return float(auc.mean())


def per_tag_scores(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[C] ROC-AUC and [C] average precision per tag (scikit-learn), NaN where not evaluable."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = np.asarray(y)
    roc = np.full(y.shape[1], np.nan)
    ap = np.full(y.shape[1], np.nan)
    if not np.isfinite(scores).all():
        return roc, ap
    for c in np.flatnonzero(evaluable(y)):
        roc[c] = roc_auc_score(y[:, c], scores[:, c])
        ap[c] = average_precision_score(y[:, c], scores[:, c])
    return roc, ap


def macro_scores(y: np.ndarray, scores: np.ndarray) -> dict:
    """Macro ROC-AUC and PR-AUC over the evaluable tags, with the per-tag values behind them."""
    roc, ap = per_tag_scores(y, scores)
    ok = evaluable(y)
    return {"roc_auc": float(np.nanmean(roc)) if np.isfinite(roc).any() else float("nan"),
            "pr_auc": float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan"),
            "per_tag_roc_auc": roc, "per_tag_pr_auc": ap, "evaluable": ok}
