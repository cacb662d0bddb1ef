"""How well an image came back, and what a set of scores says.

Per image: similarity of original and recovered on the recovered half in latent space
(cosine and MSE over the removed entries), SSIM/PSNR in pixel space (scikit-image), and
optionally the cosine of CLIP or DINO image embeddings (the paper's metrics) from a local
weights folder. Over labelled sets: AUC, best-threshold accuracy, TPR at 1 % FPR
(scikit-learn). Against controls: an empirical p-value, a z-score and a verdict per image,
and one rank-test p-value for the whole suspect set (``set_verdict``).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from cgidm.config import DEFAULT_METRIC as DEFAULT_SCORE
from cgidm.config import HIGHER_IS_BETTER


def latent_scores(x0: torch.Tensor, x_rec: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image ``[B]``: cosine and MSE between ``x0`` and ``x_rec`` on the removed
    entries only (the kept half is copied and would only dilute the score)."""
    free = (1 - mask.float()).expand_as(x0).flatten(1).bool()
    a = x0.float().flatten(1)
    b = x_rec.float().flatten(1)
    cos, mse = [], []
    for i in range(a.shape[0]):
        ai, bi = a[i][free[i]], b[i][free[i]]
        cos.append(torch.nn.functional.cosine_similarity(ai, bi, dim=0))
        mse.append((ai - bi).pow(2).mean())
    return {"latent_cos": torch.stack(cos), "latent_mse": torch.stack(mse)}


def _to_unit(image: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` in [-1, 1] -> ``[H, W, 3]`` float64 in [0, 1]."""
    return ((image.detach().float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().double().numpy()


def pixel_scores(original: torch.Tensor, recovered: torch.Tensor) -> dict[str, float]:
    """SSIM and PSNR (scikit-image) between two images ``[3, H, W]`` in [-1, 1]; PSNR is
    capped at 100 dB (identical images)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    a, b = _to_unit(original), _to_unit(recovered)
    side = min(a.shape[:2])
    win = min(7, side if side % 2 else side - 1)  # the largest odd window that fits, skimage's 7 at most
    if win < 3:
        raise ValueError(f"SSIM needs images of at least 3 px a side, got {a.shape[1]}x{a.shape[0]}")
    ssim = structural_similarity(a, b, channel_axis=2, data_range=1.0, win_size=win)
    with np.errstate(divide="ignore"):
        psnr = peak_signal_noise_ratio(a, b, data_range=1.0)
    return {"ssim": float(ssim), "psnr": float(min(psnr, 100.0))}


def _oriented(scores: Sequence[float], metric: str) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    return s if HIGHER_IS_BETTER.get(metric, True) else -s


def set_metrics(scores: Sequence[float], is_member: Sequence[bool], metric: str = DEFAULT_SCORE) -> dict:
    """AUC, best-threshold accuracy and TPR at 1 % FPR of members against hold-outs."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.asarray(is_member, dtype=bool)
    s = _oriented(scores, metric)
    bad = ~np.isfinite(s)
    if bad.any():
        # a score that is not a finite number (a non-finite recovery, an edited results
        # file) ranks: NaN as the worst recovery, an infinite one by its sign once
        # oriented (an infinite latent_mse is the worst); sklearn refuses them as they are
        fin = s[~bad]
        lo, hi = (float(fin.min()), float(fin.max())) if fin.size else (0.0, 0.0)
        s = np.where(np.isnan(s) | (s == -np.inf), lo - 1.0, np.where(s == np.inf, hi + 1.0, s))
    else:
        lo, hi = -math.inf, math.inf
    if y.all() or (~y).all():
        return {"auc": None, "accuracy": None, "tpr_at_1fpr": None, "n_members": int(y.sum()),
                "n_holdouts": int((~y).sum())}
    fpr, tpr, thr = roc_curve(y, s)
    p, n = y.sum(), (~y).sum()
    acc = (tpr * p + (1 - fpr) * n) / (p + n)
    best = int(np.argmax(acc))
    ok = fpr <= 0.01
    t = float(thr[best])
    t = math.inf if t > hi else -math.inf if t < lo else t  # a stand-in above is the infinite score it stood for
    return {
        "auc": float(roc_auc_score(y, s)),
        "accuracy": float(acc[best]),
        "threshold": t if HIGHER_IS_BETTER.get(metric, True) else -t,
        "tpr_at_1fpr": float(tpr[ok].max()) if ok.any() else 0.0,
        "n_members": int(p),
        "n_holdouts": int(n),
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
    }


@dataclass(frozen=True)
class Calibration:
    """Scores of control images (known not to be in the fine-tune)."""

    scores: tuple[float, ...]
    metric: str
    level: float

    def min_p(self) -> float:
        return 1.0 / (len(self.scores) + 1)

    @functools.cached_property
    def _controls(self) -> tuple[np.ndarray, float, float]:
        """The oriented control scores sorted (NaN left out: never "at least as extreme"),
        their mean and standard deviation: computed once, not per image judged (a screen
        judges every image against the same controls)."""
        c = _oriented(self.scores, self.metric)
        sd = float(c.std(ddof=1)) if len(c) > 1 else 0.0
        return np.sort(c[~np.isnan(c)]), float(c.mean()) if len(c) else math.nan, sd

    def judge(self, score: float) -> dict:
        """Empirical p-value (share of controls at least as extreme, with the +1 rule),
        z-score against the controls, and the verdict at ``level``."""
        s = float(_oriented([score], self.metric)[0])
        if not math.isfinite(s):
            return {"p_value": None, "z": None, "verdict": "failed"}
        ordered, mean, sd = self._controls
        at_least = len(ordered) - int(np.searchsorted(ordered, s, side="left"))
        p = (1 + at_least) / (len(self.scores) + 1)
        z = (s - mean) / sd if sd > 0 else None
        verdict = VERDICTS[0] if p <= self.level else VERDICTS[2] if self.min_p() > self.level else VERDICTS[1]
        return {"p_value": p, "z": z, "verdict": verdict}

    def flag_line(self) -> Optional[float]:
        """The score an image must be beyond to be flagged (strictly above it, or below it
        for a lower-is-better metric): the (m+1)-th most extreme control, with m the most
        controls at least as extreme that ``judge`` still flags at ``level``. ``None``
        when no p-value the count allows reaches the level. Made by ``calibrate``, which
        keeps finite control scores only (a NaN among them would count in ``judge``'s
        denominator and never as at least as extreme)."""
        ordered, _, _ = self._controls
        n = len(self.scores)
        m = int(math.floor(self.level * (n + 1))) - 1
        while m >= 0 and (1 + m) / (n + 1) > self.level:  # the same comparison as judge's
            m -= 1
        while (2 + m) / (n + 1) <= self.level:
            m += 1
        if m < 0 or m >= len(ordered):
            return None
        return float(_oriented([ordered[-(m + 1)]], self.metric)[0])


# "inconclusive": no p-value the counts allow is at or below the level (too few controls,
# or too few suspect and control images for the set), so "no evidence" would say what the
# test could not have found
VERDICTS = ("fine-tuned on", "no evidence", "inconclusive")
SET_VERDICTS = ("fine-tuned on some of these images", "no evidence", "inconclusive")
# scipy's exact null distribution of U takes milliseconds up to ~200 images (seconds at 400)
EXACT_MAX = 200


def set_verdict(suspect_scores: Sequence[float], control_scores: Sequence[float], metric: str,
                level: float) -> dict:
    """Was the model fine-tuned on some of the suspect images? One p-value for the whole
    suspect set against the controls: the one-sided Mann-Whitney U test (scipy) of
    "suspect scores tend to be higher (``HIGHER_IS_BETTER``-oriented) than controls'".

    ``statistic`` is U of the suspects (pairs suspect > control, ties counting 1/2); under
    the null of exchangeable scores it is ``n_suspect * n_controls / 2`` on average.
    Without ties and with at most ``EXACT_MAX`` images the p-value is exact (the
    permutation distribution of U); with ties, the permutation distribution with the ties
    where there are at most ``PERMUTATIONS`` splits (``_u_permutation``), else the normal
    approximation with the tie and continuity corrections, never below ``min_p``, the
    smallest p-value these counts can give: ``1 / C(n_suspect + n_controls, n_controls)``.
    Non-finite scores are dropped."""
    from scipy.stats import mannwhitneyu

    s = _oriented([x for x in suspect_scores if x is not None and math.isfinite(x)], metric)
    c = _oriented([x for x in control_scores if x is not None and math.isfinite(x)], metric)
    if len(s) < 1 or len(c) < 2:
        raise ValueError(f"a set verdict needs at least 1 suspect and 2 control scores, got {len(s)} and {len(c)}")
    ties = len(np.unique(np.concatenate([s, c]))) < len(s) + len(c)
    min_p = math.exp(math.lgamma(len(s) + 1) + math.lgamma(len(c) + 1) - math.lgamma(len(s) + len(c) + 1))
    if ties and math.comb(len(s) + len(c), len(s)) <= PERMUTATIONS:
        # the normal approximation can give less than the smallest p-value these counts
        # allow (two images at PSNR's cap against three controls: 0.048 where the exact p
        # is 1/10); the permutation distribution of U with the ties as they are, every split
        statistic, p = _u_permutation(s, c)
        method = "exact (permutation, ties)"
    else:
        method = "exact" if not ties and len(s) + len(c) <= EXACT_MAX else "asymptotic"
        res = mannwhitneyu(s, c, alternative="greater", method=method, use_continuity=True)
        # with ties in a large set (float32 scores tie by chance) the approximation, kept
        # at or above the smallest p-value the counts allow
        statistic, p = float(res.statistic), max(float(res.pvalue), min_p)
    return {
        "test": "Mann-Whitney U, one-sided (suspects > controls)",
        "method": method,
        "statistic": statistic,
        "p_value": min(max(p, 0.0), 1.0),
        "n_suspect": int(len(s)),
        "n_controls": int(len(c)),
        "min_p": min_p,
        "level": float(level),
        "verdict": SET_VERDICTS[0] if p <= level else SET_VERDICTS[2] if min_p > level else SET_VERDICTS[1],
    }


def worse_p(scores: Sequence[float], others: Sequence[float], metric: str) -> float:
    """The p-value of "``scores`` recover worse than ``others``" (oriented by ``metric``):
    what a pair with base and fine-tune swapped gives its members against hold-outs, its
    suspects against controls. ``set_verdict`` with the roles turned round (its exact,
    tie-aware p-values, never below the smallest the counts allow); 1.0 with too few."""
    try:
        return float(set_verdict(others, scores, metric, 0.05)["p_value"])
    except ValueError:  # too few scores
        return 1.0


PERMUTATIONS = 20_000  # with ties, splits up to which the permutation distribution is enumerated


def _u_permutation(s: np.ndarray, c: np.ndarray) -> tuple[float, float]:
    """``(U, p)`` with tied scores: U from mid-ranks, p the share of all splits of the
    pooled mid-ranks whose suspects' rank sum is at least theirs (every split: callers
    keep ``C(N, n) <= PERMUTATIONS``). One suspect: the share of pooled scores at least
    its own."""
    from scipy.stats import permutation_test, rankdata

    ranks = rankdata(np.concatenate([s, c]))
    n = len(s)
    statistic = float(ranks[:n].sum() - n * (n + 1) / 2)
    if n == 1:  # scipy's permutation_test needs two values a sample
        return statistic, float((ranks >= ranks[0]).sum() / len(ranks))
    res = permutation_test((ranks[:n], ranks[n:]), lambda x, y, axis: np.sum(x, axis=axis), vectorized=True,
                           permutation_type="independent", alternative="greater", n_resamples=PERMUTATIONS)
    return statistic, float(res.pvalue)


def calibrate(control_scores: Sequence[float], metric: str, level: float) -> Calibration:
    finite = tuple(float(s) for s in control_scores if s is not None and math.isfinite(s))
    if len(finite) < 2:
        raise ValueError("need at least 2 scored control images to calibrate a verdict")
    return Calibration(finite, metric, level)
