"""Rank correlations against hand computations; the probe rows that must be left out."""

import math

import numpy as np
import pandas as pd
import pytest

from sensitivity.attribution import agreement, kendall_tau_b, rank_correlation, spearman


def test_spearman_and_kendall_without_ties():
    # Ranks differ by one swap in each of two adjacent pairs: sum d^2 = 4, rho = 1 - 6*4/(5*24) = 0.8;
    # 2 of the 10 pairs are discordant: tau = (8 - 2) / 10 = 0.6.
    x, y = [1, 2, 3, 4, 5], [2, 1, 4, 3, 5]
    assert rank_correlation(x, y) == pytest.approx((0.8, 0.6))
    assert rank_correlation(x, y[::-1]) == pytest.approx((-0.8, -0.6))
    assert spearman([10, 20, 30], [1, 100, 1000]) == pytest.approx(1.0)  # ranks only


def test_spearman_and_kendall_with_ties():
    # x ranks [1, 2.5, 2.5, 4], y ranks [1, 2, 3.5, 3.5]: centred dot 3.75, both sums of squares 4.5 -> 0.8333.
    # Pairs: 4 concordant, 0 discordant, one tie in x, one tie in y: tau_b = 4 / sqrt(5 * 5) = 0.8.
    x, y = [1, 2, 2, 3], [1, 2, 3, 3]
    assert spearman(x, y) == pytest.approx(3.75 / 4.5)
    assert kendall_tau_b(x, y) == pytest.approx(0.8)


def test_degenerate_inputs():
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])) and math.isnan(kendall_tau_b([1, 2, 3], [4, 4, 4]))
    assert math.isnan(kendall_tau_b([1], [2]))
    assert kendall_tau_b([1, 2, np.inf], [0, 1, 2]) == pytest.approx(1.0)  # a collapsed model's inf damage ranks
    with pytest.raises(ValueError, match="equal length"):
        spearman([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="NaN"):
        kendall_tau_b([1, np.nan], [1, 2])


def _attribution():
    pairs = [(0, "x"), (0, "z"), (1, "x"), (1, "z"), (1, "dt")]
    rows = [(ly, c, "taylor", "sum", v, 0) for (ly, c), v in zip(pairs, [1.0, 2.0, 3.0, 4.0, 5.0])]
    rows += [(ly, c, "fisher", "sum", v, 0) for (ly, c), v in zip(pairs, [5.0, 4.0, 3.0, 2.0, 1.0])]
    rows += [(0, "x", "grad_x_act", "abs_sum", 1.0, 0), (1, "x", "grad_x_act", "abs_sum", 2.0, 0)]  # 2 pairs only
    return pd.DataFrame(rows, columns=["layer", "component", "kind", "metric", "value", "seed"])


def _probes():
    nan = float("nan")
    pairs = [(0, "x"), (0, "z"), (1, "x"), (1, "z"), (1, "dt")]
    rows = [(ly, c, nan, "zero", nan, "delta_nll", v, 0) for (ly, c), v in zip(pairs, [2.0, 1.0, 4.0, 3.0, 5.0])]
    rows += [(ly, c, nan, "zero", nan, "kl", v, 0) for (ly, c), v in zip(pairs, [5.0, 4.0, 3.0, 2.0, 1.0])]
    # Two seeds of "mean" average to [1, 2, 3, 4] on four shared pairs.
    rows += [(ly, c, nan, "mean", nan, "delta_nll", v + s, s) for s in (0, 1) for (ly, c), v in
             zip(pairs[:4], [0.5, 1.5, 2.5, 3.5])]  # fmt: skip
    # Unit probes (index set) and the whole mixer must be ignored: they would reverse the rankings.
    rows += [(ly, c, float(i), "zero", nan, "delta_nll", 100.0 - 10 * k, 0) for k, (ly, c) in enumerate(pairs)
             for i in range(2)]  # fmt: skip
    rows += [(0, "mixer", nan, "zero", nan, "delta_nll", 1000.0, 0), (1, "mixer", nan, "zero", nan, "delta_nll", -1, 0)]
    cols = ["layer", "component", "index", "kind", "sparsity", "metric", "value", "seed"]
    return pd.DataFrame(rows, columns=cols)


def test_agreement_table():
    out = agreement(_probes(), _attribution())
    assert list(out.columns) == ["attribution", "attribution_metric", "ablation", "sparsity", "probe_metric", "n",
                                 "spearman", "kendall"]  # fmt: skip
    assert out["sparsity"].isna().all()  # zero and mean have no sparsity
    assert list(out["ablation"]) == ["mean"] * 3 + ["zero"] * 3  # sorted by ablation, then spearman descending
    got = out.set_index(["ablation", "attribution"])
    # zero: damage [2, 1, 4, 3, 5] vs taylor [1, 2, 3, 4, 5] -> (0.8, 0.6); fisher is its reverse.
    assert got.loc[("zero", "taylor"), ["n", "spearman", "kendall"]].tolist() == pytest.approx([5, 0.8, 0.6])
    assert got.loc[("zero", "fisher"), ["spearman", "kendall"]].tolist() == pytest.approx([-0.8, -0.6])
    # mean: four shared pairs, seeds averaged to [1, 2, 3, 4]: taylor agrees perfectly.
    assert got.loc[("mean", "taylor"), ["n", "spearman", "kendall"]].tolist() == pytest.approx([4, 1.0, 1.0])
    # fewer than 3 shared pairs: NaN, listed last within its ablation
    row = got.loc[("zero", "grad_x_act")]
    assert row["n"] == 2 and math.isnan(row["spearman"]) and math.isnan(row["kendall"])
    assert out.iloc[2]["attribution"] == "grad_x_act" and out.iloc[5]["attribution"] == "grad_x_act"


def test_agreement_other_probe_metric_and_errors():
    out = agreement(_probes(), _attribution(), probe_metric="kl")
    assert set(out["ablation"]) == {"zero"} and set(out["probe_metric"]) == {"kl"}
    assert out.set_index("attribution").loc["fisher", "spearman"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="probe_metric 'ppl' is not in the probes table; allowed: delta_nll, kl"):
        agreement(_probes(), _attribution(), probe_metric="ppl")
    with pytest.raises(ValueError, match="lacks column\\(s\\) index"):
        agreement(_probes().drop(columns="index"), _attribution())


def test_several_sparsities_of_one_kind_are_separate_ablations():
    probes = _probes().query("kind == 'zero' and metric == 'delta_nll' and index.isna()").copy()
    probes = pd.concat([probes.assign(kind="magnitude", sparsity=0.25),
                        probes.assign(kind="magnitude", sparsity=0.5, value=-probes["value"])])  # fmt: skip
    out = agreement(probes, _attribution()).set_index(["ablation", "sparsity", "attribution"])
    assert out.loc[("magnitude", 0.25, "taylor"), "spearman"] == pytest.approx(0.8)
    assert out.loc[("magnitude", 0.5, "taylor"), "spearman"] == pytest.approx(-0.8)


def test_a_metric_without_values_is_refused_saying_why():
    probes = _probes()
    probes.loc[probes["metric"] == "kl", "value"] = float("nan")  # as estimated probes leave kl
    with pytest.raises(ValueError, match=r"^probe_metric 'kl' is not in the probes table \(its values are all empty: "
                                         r"estimated probes do not measure it\); allowed: delta_nll$"):  # fmt: skip
        agreement(probes, _attribution(), probe_metric="kl")


def test_tables_of_different_models_are_refused():
    other = _attribution().assign(component="q", layer=7)  # no (layer, component) in common with the probes
    with pytest.raises(ValueError, match="share no \\(layer, component\\) with values: nothing to correlate"):
        agreement(_probes(), other)
