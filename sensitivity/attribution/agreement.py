"""Rank agreement between attribution scores and the damage that ablating each (layer, component) does.

Spearman's rho is the Pearson correlation of average ranks; Kendall's tau is tau-b (ties in either ranking
corrected); both from ``scipy.stats``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd

from ..core.tables import PROBE_COLUMNS

__all__ = ["agreement", "kendall_tau_b", "rank_correlation", "spearman"]

_KEYS = ["layer", "component"]
_PROBE_COLUMNS = PROBE_COLUMNS
ATTRIBUTION_COLUMNS = ("layer", "component", "kind", "metric", "value")
"""Columns every attribution table has."""
MIN_PAIRS = 3


def _pair(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"need two 1-D sequences of equal length, got shapes {x.shape} and {y.shape}")
    if np.isnan(x).any() or np.isnan(y).any():
        raise ValueError("rank correlation of NaN values; drop them first")
    return x, y


def _statistic(name: str, x, y) -> float:
    """A ``scipy.stats`` rank statistic, NaN (without scipy's warning) when a side is constant or n < 2."""
    if len(x) < 2:
        return math.nan
    from scipy import stats  # 0.4 s to import: only when a correlation is computed

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(getattr(stats, name)(x, y).statistic)


def spearman(x, y) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks (NaN if either side is constant or n < 2)."""
    return _statistic("spearmanr", *_pair(x, y))


def kendall_tau_b(x, y) -> float:
    """Kendall's tau-b ``(n_c - n_d) / sqrt((n_0 - n_1)(n_0 - n_2))`` over all pairs (``scipy.stats.kendalltau``).

    ``n_0 = n(n-1)/2``; ``n_1``, ``n_2`` count the pairs tied in ``x`` and in ``y``. NaN if either side is constant
    or n < 2.
    """
    return _statistic("kendalltau", *_pair(x, y))


def rank_correlation(x, y) -> tuple[float, float]:
    """``(spearman, kendall_tau_b)`` of two equal-length sequences."""
    return spearman(x, y), kendall_tau_b(x, y)


def _check_columns(df: pd.DataFrame, needed: tuple[str, ...], what: str) -> None:
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(f"{what} table lacks column(s) {', '.join(missing)}; needed: {', '.join(needed)}")


def agreement(
    probes_df: pd.DataFrame, attribution_df: pd.DataFrame, *, probe_metric: str = "delta_nll"
) -> pd.DataFrame:
    """Rank correlation between each attribution ranking of (layer, component) and each ablation's damage ranking.

    Probe rows with a unit ``index`` (heads, states) and components absent from the attribution table (e.g.
    ``mixer``) are left out; values are averaged over seeds (and, for attributions, nothing else: one row per
    (layer, component, kind, metric) is expected). The damage ranking uses ``probe_metric`` as it is (larger =
    more damage, true of ``delta_nll``, ``kl`` and ``ppl_ratio``); correlations are computed on the (layer,
    component) pairs present in both tables (rows with a NaN value dropped), and are NaN when fewer than 3 pairs
    are shared (or a side is constant).

    Args:
        probes_df: Ablation probes: ``layer, component, index, kind, sparsity, metric, value, seed``.
        attribution_df: Output of :func:`attribute`.
        probe_metric: Which probe metric ranks the damage.

    Returns:
        Columns ``attribution, attribution_metric, ablation, sparsity, probe_metric, n, spearman, kendall``, one row
        per (attribution kind, attribution metric, ablation kind and its sparsity: empty for kinds without one),
        sorted by ablation and sparsity, then descending Spearman.

    Raises:
        ValueError: Missing columns, ``probe_metric`` absent from the probes table (or without any value), or no
            (layer, component) with values in both tables.

    Examples:
        >>> agreement(probes, attribute(lm, windows)).query("ablation == 'zero'").head()
    """
    _check_columns(probes_df, _PROBE_COLUMNS, "probes")
    _check_columns(attribution_df, ATTRIBUTION_COLUMNS, "attribution")
    metrics = sorted(probes_df.dropna(subset=["value"])["metric"].dropna().astype(str).unique())
    if probe_metric not in metrics:
        empty = " (its values are all empty: estimated probes do not measure it)" if probe_metric in set(
            probes_df["metric"].astype(str)) else ""  # fmt: skip
        raise ValueError(f"probe_metric {probe_metric!r} is not in the probes table{empty}; allowed: "
                         f"{', '.join(metrics) or 'none (no probe has a value)'}")  # fmt: skip
    attr = attribution_df.dropna(subset=["value"])
    attr = attr.groupby(["kind", "metric", *_KEYS], as_index=False)["value"].mean()
    probes = probes_df[probes_df["index"].isna() & (probes_df["metric"] == probe_metric) & probes_df["value"].notna()]
    probes = probes[probes["component"].isin(set(attr["component"]))]
    sparsity = probes["sparsity"] if "sparsity" in probes.columns else pd.Series(math.nan, index=probes.index)
    probes = probes.assign(ablation=probes["kind"].astype(str), sparsity=sparsity.fillna(-1.0))  # -1: no sparsity
    probes = probes.groupby(["ablation", "sparsity", *_KEYS], as_index=False)["value"].mean()

    rows = []
    for (ablation, level), damage in probes.groupby(["ablation", "sparsity"], sort=True):
        for (kind, metric), scores in attr.groupby(["kind", "metric"], sort=True):
            both = scores.merge(damage, on=_KEYS, suffixes=("_attr", "_probe"))
            n = len(both)
            rho, tau = (math.nan, math.nan)
            if n >= MIN_PAIRS:
                rho, tau = rank_correlation(both["value_attr"], both["value_probe"])
            rows.append((kind, metric, ablation, math.nan if level < 0 else level, probe_metric, n, rho, tau))
    if not rows or max(row[5] for row in rows) == 0:
        raise ValueError("the probes and the attribution share no (layer, component) with values: nothing to "
                         "correlate (were they measured on the same model?)")
    columns = ["attribution", "attribution_metric", "ablation", "sparsity", "probe_metric", "n", "spearman", "kendall"]
    out = pd.DataFrame(rows, columns=columns).astype({"sparsity": "float64", "n": "int64", "spearman": "float64",
                                                      "kendall": "float64"})  # fmt: skip
    out = out.sort_values(["ablation", "sparsity", "spearman"], ascending=[True, True, False], na_position="last",
                          kind="stable")  # fmt: skip
    return out.reset_index(drop=True)
