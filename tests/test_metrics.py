"""Open-set metrics against sklearn and against hand computation (ties included)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from backmix.osr_data.errors import BackMixError
from backmix.trainers.metrics import auroc, fpr_at_tpr, open_set_metrics, oscr


def pairwise_oscr(known, unknown, correct):
    """The definition by brute force: P(correct known outranks unknown), ties counted half."""
    k = np.asarray(known)[np.asarray(correct, bool)][:, None]
    u = np.asarray(unknown)[None, :]
    return ((k > u).sum() + 0.5 * (k == u).sum()) / (len(known) * len(unknown))


def test_auroc_equals_sklearn_with_ties():
    known = np.array([0.9, 0.8, 0.8, 0.3, 0.5])
    unknown = np.array([0.8, 0.1, 0.5, 0.2])
    y = np.r_[np.ones(5), np.zeros(4)]
    assert auroc(known, unknown) == roc_auc_score(y, np.r_[known, unknown])
    # by hand: pairs known > unknown = 4+3+3+2+2 = 14 of 20; ties (0.8,0.8)x2, (0.5,0.5)x1 -> +1.5
    assert auroc(known, unknown) == pytest.approx(15.5 / 20)


def test_oscr_hand_computed_with_ties():
    known = np.array([0.9, 0.8, 0.7, 0.6])
    correct = np.array([True, False, True, True])
    unknown = np.array([0.8, 0.7, 0.1])
    # Curve points (FPR, CCR) as t sweeps down: (0,0) -> t=.9 (0,1/4) -> t=.8 (1/3,1/4)
    # -> t=.7 (2/3,2/4) -> t=.6 (2/3,3/4) -> t=.1 (1,3/4).
    # Trapezoids: 1/3*(1/4+1/4)/2 + 1/3*(1/4+2/4)/2 + 0 + 1/3*(3/4+3/4)/2 = (1/12 + 1/8 + 1/4)
    expected = 1 / 12 + 1 / 8 + 1 / 4
    assert oscr(known, unknown, correct) == pytest.approx(expected)
    assert oscr(known, unknown, correct) == pytest.approx(pairwise_oscr(known, unknown, correct))


def test_oscr_matches_the_pairwise_definition_on_random_tied_scores():
    rng = np.random.default_rng(0)
    for _ in range(20):
        known = rng.integers(0, 6, 30) / 5.0      # few distinct values: many ties
        unknown = rng.integers(0, 6, 17) / 5.0
        correct = rng.random(30) < 0.7
        assert oscr(known, unknown, correct) == pytest.approx(pairwise_oscr(known, unknown, correct))


def test_oscr_is_auroc_when_every_known_is_correct_and_at_most_auroc_otherwise():
    rng = np.random.default_rng(1)
    known, unknown = rng.normal(1, 1, 50), rng.normal(0, 1, 40)
    assert oscr(known, unknown, np.ones(50, bool)) == pytest.approx(auroc(known, unknown))
    assert oscr(known, unknown, rng.random(50) < 0.5) < auroc(known, unknown)
    assert oscr(known, unknown, np.zeros(50, bool)) == 0.0


def test_fpr_at_95_tpr_by_hand():
    known = np.arange(20, dtype=float) + 10      # 10..29
    unknown = np.array([0.0, 10.5, 11.0, 30.0])  # 11.0 ties with a known
    # 95% TPR accepts 19 of 20 knowns: threshold 11 -> unknowns >= 11: 11.0 and 30.0 -> 2/4
    assert fpr_at_tpr(known, unknown) == pytest.approx(0.5)
    # Every known accepted needs threshold 10 -> 10.5, 11, 30 accepted
    assert fpr_at_tpr(known, unknown, tpr=1.0) == pytest.approx(0.75)


def test_open_set_metrics_from_logits():
    lk = torch.tensor([[5.0, 0.0], [0.0, 3.0], [2.0, 1.0]])
    yk = torch.tensor([0, 1, 1])                # the third is misclassified
    lu = torch.tensor([[1.0, 1.0], [0.0, 4.0]])
    m = open_set_metrics(lk, yk, lu)
    assert m["accuracy"] == pytest.approx(2 / 3)
    mls_k, mls_u = np.array([5.0, 3.0, 2.0]), np.array([1.0, 4.0])
    assert m["auroc_mls"] == auroc(mls_k, mls_u) == pytest.approx(4 / 6)
    assert m["oscr_mls"] == pytest.approx(pairwise_oscr(mls_k, mls_u, [True, True, False]))
    msp_k = lk.double().softmax(1).amax(1).numpy()
    msp_u = lu.double().softmax(1).amax(1).numpy()
    assert m["auroc_msp"] == auroc(msp_k, msp_u)
    assert m["num_known"] == 3 and m["num_unknown"] == 2
    energy_k = np.log(np.exp(lk.double().numpy()).sum(1))
    energy_u = np.log(np.exp(lu.double().numpy()).sum(1))
    assert m["auroc_energy"] == auroc(energy_k, energy_u)
    assert m["oscr_energy"] == pytest.approx(pairwise_oscr(energy_k, energy_u, [True, True, False]))
    assert m["fpr95_energy"] == fpr_at_tpr(energy_k, energy_u)


def test_energy_ranks_by_logsumexp_where_the_max_logit_does_not():
    # MLS: 3.5 > 3.0 (known ahead); energy: 3.5 + log(1 + e^-3.5) = 3.53 < 3 + log 2 = 3.69 (unknown ahead)
    m = open_set_metrics(torch.tensor([[3.5, 0.0]]), torch.tensor([0]), torch.tensor([[3.0, 3.0]]))
    assert (m["auroc_mls"], m["oscr_mls"]) == (1.0, 1.0)
    assert (m["auroc_energy"], m["oscr_energy"], m["fpr95_energy"]) == (0.0, 0.0, 1.0)


def test_metrics_refuse_empty_sets():
    with pytest.raises(BackMixError, match="at least one known and one unknown"):
        auroc(np.array([0.5]), np.array([]))


def test_logits_that_are_not_finite_are_one_line():
    """A diverged model (NaN logits) is reported as such, not as scikit-learn's traceback."""
    good = torch.randn(4, 3)
    bad = good.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(BackMixError, match="not finite"):
        open_set_metrics(bad, torch.tensor([0, 1, 2, 0]), good)
    with pytest.raises(BackMixError, match="not finite"):
        open_set_metrics(good, torch.tensor([0, 1, 2, 0]), bad * float("inf"))
