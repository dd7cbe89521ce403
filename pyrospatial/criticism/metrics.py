"""Evaluation metrics against a known truth (simulations, pseudo-spots)."""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import adjusted_rand_score, roc_auc_score

__all__ = ["gene_mean_pearson", "interval_coverage", "domain_ari", "edge_auc", "within_type_abs_spearman"]


def gene_mean_pearson(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Mean over genes of the Pearson correlation, across cells, of predicted vs true
    per-cell expression (genes constant in either array are skipped)."""
    p = np.asarray(predicted, dtype=np.float64)
    t = np.asarray(truth, dtype=np.float64)
    pc, tc = p - p.mean(0), t - t.mean(0)
    denom = np.sqrt((pc**2).sum(0) * (tc**2).sum(0))
    ok = denom > 0
    return float(((pc * tc).sum(0)[ok] / denom[ok]).mean())


def interval_coverage(lower: np.ndarray, upper: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of true values inside [lower, upper]."""
    truth = np.asarray(truth)
    return float(np.mean((truth >= lower) & (truth <= upper)))


def domain_ari(labels: np.ndarray, truth: np.ndarray) -> float:
    """Adjusted Rand index of predicted domains against true layers/regions."""
    return float(adjusted_rand_score(np.asarray(truth), np.asarray(labels)))


def edge_auc(prob_edges: np.ndarray, prob_nonedges: np.ndarray) -> float:
    """ROC AUC of edge probabilities on held-out edges (positives) vs non-edges."""
    y = np.r_[np.ones(len(prob_edges)), np.zeros(len(prob_nonedges))]
    return float(roc_auc_score(y, np.r_[prob_edges, prob_nonedges]))


def within_type_abs_spearman(estimate: np.ndarray, truth: np.ndarray, cell_type: np.ndarray) -> float:
    """|Spearman| between estimated and true v within each cell type, averaged over types
    (first dimension of v when it has several). The sign of v is not identifiable."""
    est = np.asarray(estimate).reshape(len(cell_type), -1)[:, 0]
    tru = np.asarray(truth).reshape(len(cell_type), -1)[:, 0]
    values = []
    for t in np.unique(cell_type):
        m = cell_type == t
        if m.sum() > 2:
            rho = spearmanr(est[m], tru[m]).statistic
            if np.isfinite(rho):
                values.append(abs(rho))
    return float(np.mean(values)) if values else float("nan")
