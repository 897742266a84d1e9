"""Open-set metrics: closed-set accuracy, AUROC, FPR at 95% TPR and OSCR.

Convention everywhere: a higher score means "more likely known"; known test
images are the positives. Ties are counted half, as ``roc_auc_score`` does.
"""
from __future__ import annotations

import numpy as np
import torch

from backmix.osr_data.errors import BackMixError


def _scores(known: np.ndarray, unknown: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    known = np.asarray(known, dtype=np.float64).ravel()
    unknown = np.asarray(unknown, dtype=np.float64).ravel()
    if known.size == 0 or unknown.size == 0:
        raise BackMixError("open-set metrics need at least one known and one unknown test image")
    return known, unknown


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """Area under the ROC curve separating known (positive) from unknown scores."""
    from sklearn.metrics import roc_auc_score   # here, not at the top: 2 s of start-up for every command

    known, unknown = _scores(known, unknown)
    y = np.r_[np.ones(known.size), np.zeros(unknown.size)]
    return float(roc_auc_score(y, np.r_[known, unknown]))


def fpr_at_tpr(known: np.ndarray, unknown: np.ndarray, tpr: float = 0.95) -> float:
    """Share of unknowns accepted at the highest threshold that accepts >= ``tpr`` of the knowns."""
    from sklearn.metrics import roc_curve

    if isinstance(tpr, bool) or not isinstance(tpr, (int, float, np.integer, np.floating)):
        raise TypeError(f"tpr must be a number in (0, 1], not {type(tpr).__name__}")
    if not 0 < tpr <= 1:
        raise BackMixError(f"tpr must lie in (0, 1], got {tpr}")
    known, unknown = _scores(known, unknown)
    y = np.r_[np.ones(known.size), np.zeros(unknown.size)]
    fprs, tprs, _ = roc_curve(y, np.r_[known, unknown], drop_intermediate=False)
    # tprs is non-decreasing; the small slack keeps 19/20 >= 0.95 true in floating point.
    return float(fprs[np.searchsorted(tprs, tpr - 1e-12, side="left")])


def oscr(known: np.ndarray, unknown: np.ndarray, correct: np.ndarray) -> float:
    """Open-Set Classification Rate (Chen et al., ARPL): area under CCR(t) against FPR(t).

    CCR(t) = share of knowns classified correctly with score >= t, FPR(t) = share
    of unknowns with score >= t, as t sweeps every score from +inf down. Images
    with equal scores enter the curve together (a diagonal step), so the result
    equals sum over correct knowns i and unknowns j of [s_i > s_j] + 0.5 [s_i = s_j],
    divided by (#knowns * #unknowns).
    """
    known, unknown = _scores(known, unknown)
    correct = np.asarray(correct, dtype=bool).ravel()
    if correct.shape != known.shape:
        raise BackMixError(f"oscr: {correct.size} correctness flags for {known.size} known scores")
    scores = np.r_[known, unknown]
    is_cc = np.r_[correct, np.zeros(unknown.size, bool)].astype(np.float64)
    is_u = np.r_[np.zeros(known.size), np.ones(unknown.size)]
    thresholds, group = np.unique(-scores, return_inverse=True)   # descending scores, ties grouped
    cc = np.bincount(group, weights=is_cc, minlength=thresholds.size).cumsum() / known.size
    fp = np.bincount(group, weights=is_u, minlength=thresholds.size).cumsum() / unknown.size
    ccr, fpr = np.r_[0.0, cc], np.r_[0.0, fp]
    return float(np.sum(np.diff(fpr) * (ccr[1:] + ccr[:-1]) / 2))


# (key suffix, name) of every open-set score; higher means "more likely known".
SCORES = (("msp", "max softmax probability"), ("mls", "max logit"), ("energy", "energy (logsumexp)"))


def open_set_scores(logits: torch.Tensor) -> dict[str, np.ndarray]:
    """Each score of ``SCORES`` per image: MSP, MLS and the negative free energy logsumexp(logits)
    (Liu et al. 2020; with temperature 1)."""
    return {"msp": logits.softmax(1).amax(1).numpy(), "mls": logits.amax(1).numpy(),
            "energy": torch.logsumexp(logits, 1).numpy()}


def open_set_metrics(logits_known: torch.Tensor | np.ndarray, labels_known: torch.Tensor | np.ndarray,
                     logits_unknown: torch.Tensor | np.ndarray) -> dict[str, float]:
    """Everything the trainer reports, from closed-set logits of known and unknown test images.

    ``labels_known`` are closed-set labels (0..K-1). Scores (``SCORES``): maximum softmax
    probability (MSP), maximum logit (MLS) and energy, each giving AUROC, FPR95 and OSCR; with no unknown
    image (every class known) only the accuracy.
    """
    lk = torch.as_tensor(logits_known).double()
    lu = torch.as_tensor(logits_unknown).double()
    yk = torch.as_tensor(labels_known).long()
    if not (torch.isfinite(lk).all() and torch.isfinite(lu).all()):
        raise BackMixError("the model's logits are not finite (NaN or inf): training diverged; "
                           "try a lower --lr, --clip-grad, or a larger --batch-size")
    if lk.ndim != 2 or yk.shape != (lk.shape[0],):
        raise BackMixError(f"labels_known must hold one label per row of logits_known: {tuple(yk.shape)} labels "
                           f"for logits of shape {tuple(lk.shape)}")
    outside = yk[(yk < 0) | (yk >= lk.shape[1])]
    if len(outside):   # argmax never equals them: the accuracy would be silently low
        raise BackMixError(f"labels_known must be closed-set labels in 0..{lk.shape[1] - 1} "
                           f"(one per logit), got {outside[0].item()}")
    correct = (lk.argmax(1) == yk).numpy()
    out = {"accuracy": float(correct.mean())}
    if lu.shape[0] == 0:   # every class known (--split all): nothing to score against here
        return {**out, "num_known": int(lk.shape[0]), "num_unknown": 0}
    known, unknown = open_set_scores(lk), open_set_scores(lu)
    for measure, fn in (("auroc", auroc), ("fpr95", fpr_at_tpr), ("oscr", oscr)):
        for score, _ in SCORES:
            args = (known[score], unknown[score]) + ((correct,) if measure == "oscr" else ())
            out[f"{measure}_{score}"] = fn(*args)
    return {**out, "num_known": int(lk.shape[0]), "num_unknown": int(lu.shape[0])}
