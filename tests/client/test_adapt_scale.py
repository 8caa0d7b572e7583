"""A site's model choice at scale: small sites as before, large ones choose on a subsample."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from shared.metrics import sigmoid
from shared.schema import Feature

# Every small site's model (choice, reason, weights, every candidate's scores) as the code
# computed it before large sites chose on a subsample: written by ``write_expectation`` from
# the code of commit dcac046, one BLAS thread (as the ClientApp runs).
EXPECTED = Path(__file__).with_name("adapt_small_sites.json")

GLUCOSE = [Feature("glucose", "numeric", unit="mg/dL", scope="site", required=False)]
Inputs = tuple[np.ndarray, pd.DataFrame, np.ndarray, np.ndarray, list[Feature], int]


def _glucose_site(n: int, effect: float, seed: int, flip: bool = False) -> Inputs:
    """Three shared inputs and glucose (5 % missing); labels follow offset + glucose effect."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    offset = x @ np.array([0.8, -0.5, 0.3]) - 0.5
    glucose = rng.normal(105.0, 15.0, n)
    y = (rng.random(n) < sigmoid(offset + effect * (glucose - 105.0) / 15.0)).astype(int)
    glucose[rng.random(n) < 0.05] = np.nan
    return x, pd.DataFrame({"glucose": glucose}), -offset if flip else offset, y, GLUCOSE, seed


def _wide_site(n: int, seed: int) -> Inputs:
    """Thirty correlated shared inputs, ten site features (8 % missing, two binary).

    The source model's logit carries the shared effects with error and a wrong base rate;
    the labels also depend on the site features.
    """
    rng = np.random.default_rng(seed)
    factors = rng.normal(size=(n, 3))
    x = factors @ rng.normal(0.0, 0.5, (3, 30)) + rng.normal(size=(n, 30))
    own = factors @ rng.normal(0.0, 0.5, (3, 10)) + rng.normal(size=(n, 10))
    beta, gamma = rng.normal(0.0, 0.3, 30), rng.normal(0.0, 0.3, 10)
    y = (rng.random(n) < sigmoid(-1.5 + x @ beta + own @ gamma)).astype(int)
    offset = -1.0 + x @ (0.8 * beta + rng.normal(0.0, 0.1, 30))
    own = 100.0 + 15.0 * own
    own[:, :2] = own[:, :2] > 100.0
    own[rng.random(own.shape) < 0.08] = np.nan
    names = [f"lab{j}" for j in range(10)]
    features = [Feature(name, "binary" if j < 2 else "numeric", scope="site", required=False)
                for j, name in enumerate(names)]
    return x, pd.DataFrame(own, columns=names), offset, y, features, seed


def _no_site_features(n: int, seed: int) -> Inputs:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    offset = x @ np.array([0.8, -0.5, 0.3])
    y = (rng.random(n) < sigmoid(offset + 1.5 * x[:, 2])).astype(int)
    return x, pd.DataFrame(index=range(n)), offset, y, [], seed


def _few_positives(seed: int) -> Inputs:
    """Four positive rows among 300: only a recalibration may be tried."""
    x, rows, offset, y, features, _ = _glucose_site(3000, 3.0, seed)
    idx = np.r_[np.flatnonzero(y == 1)[:4], np.flatnonzero(y == 0)[:300]]
    return x[idx], rows.iloc[idx].reset_index(drop=True), offset[idx], y[idx], features, seed


SMALL_SITES: dict[str, Callable[[], Inputs]] = {
    "glucose effect, 600 rows": lambda: _glucose_site(600, 1.5, 0),
    "source ranks backwards, 800 rows": lambda: _glucose_site(800, 1.5, 8, flip=True),
    "no site effect, 400 rows": lambda: _glucose_site(400, 0.0, 1),
    "30 shared and 10 site features, 3000 rows": lambda: _wide_site(3000, 0),
    "no site features, 500 rows": lambda: _no_site_features(500, 6),
    "four positives": lambda: _few_positives(2),
}


def _blas() -> list[dict[str, Any]]:
    """NumPy's and SciPy's BLAS (their kernels decide the last bits of every sum)."""
    return sorted(({k: str(lib.get(k)) for k in ("internal_api", "version", "architecture")}
                   for lib in threadpool_info()
                   if Path(str(lib.get("filepath"))).parent.name in ("numpy.libs", "scipy.libs")),
                  key=lambda lib: json.dumps(lib, sort_keys=True))


def _fitted(name: str) -> dict[str, Any]:
    """The site's model as stored (``Correction.to_dict`` through JSON), one BLAS thread."""
    from client.adapt import fit_correction

    x, rows, offset, y, features, seed = SMALL_SITES[name]()
    with threadpool_limits(limits=1):
        model = fit_correction(x, rows, offset, y, features, seed=seed)
    return dict(json.loads(json.dumps(model.to_dict(), allow_nan=False)))


def write_expectation(path: Path = EXPECTED) -> None:
    """Store every small site's model as the code computes it now (run on purpose only)."""
    sites = {name: _fitted(name) for name in SMALL_SITES}
    path.write_text(json.dumps({"blas": _blas(), "sites": sites}, indent=1) + "\n")


# AUCs have been computed as the Mann-Whitney statistic since commit bb7004f (scikit-learn's
# roc_auc_score before): the same number up to its last bit (measured: at most 2.2e-16 here).
AUC_TOLERANCE = 1e-12


def _agree(got: Any, want: Any, rtol: float, key: str = "") -> bool:
    """Equal (``rtol=0``) or within ``rtol``; AUCs within ``AUC_TOLERANCE`` at least."""
    if isinstance(want, dict):
        return (isinstance(got, dict) and got.keys() == want.keys()
                and all(_agree(got[k], want[k], rtol, str(k)) for k in want))
    if isinstance(want, list):
        return (isinstance(got, list) and len(got) == len(want)
                and all(_agree(g, w, rtol, key) for g, w in zip(got, want, strict=True)))
    if isinstance(want, float) and isinstance(got, float):
        tol = max(rtol * abs(want), rtol * 1e-3, AUC_TOLERANCE if "auc" in key else 0.0)
        return abs(got - want) <= tol
    return bool(got == want)


@pytest.mark.parametrize("name", list(SMALL_SITES))
def test_small_site_model_is_unchanged(name: str) -> None:
    """Sites below the subsampling size get the very model they got before (choice, weights).

    Bit for bit where the BLAS kernels are those the expectation was computed with (AUCs to
    their last bit, see ``AUC_TOLERANCE``); on other kernels (another CPU) sums round
    differently in the last bit and L-BFGS ends within its tolerance of the same point, so
    there the numbers must agree to 1e-6 and the words exactly.
    """
    expected = json.loads(EXPECTED.read_text())
    want = expected["sites"][name]
    got = _fitted(name)
    assert (got["choice"], got["applied"], got["feature_names"]) == (
        want["choice"], want["applied"], want["feature_names"])
    same_kernels = expected["blas"] == _blas()
    if same_kernels:
        assert (got["coef"], got["intercept"], got["reason"]) == (
            want["coef"], want["intercept"], want["reason"])
    assert _agree(got, want, rtol=0.0 if same_kernels else 1e-6), name


def test_fast_sigmoid_is_bit_for_bit_the_shared_one() -> None:
    """The fit's gradient uses the same sigmoid, element for element, zeros and infinities too."""
    from shared.correction import _sigmoid

    rng = np.random.default_rng(0)
    for scale in (0.01, 1.0, 30.0, 800.0):
        z = rng.normal(0.0, scale, 5001)
        z[::97] = 0.0
        z[::89] = -0.0
        z[:4] = [np.inf, -np.inf, np.nan, 1e-320]
        np.testing.assert_array_equal(_sigmoid(z), sigmoid(z))


def test_warm_start_reaches_the_same_optimum() -> None:
    """Starting L-BFGS elsewhere changes the iterations, not the fitted model."""
    from shared.correction import OffsetLogisticRegression

    x, rows, offset, y, _, _ = _glucose_site(2000, 1.5, 3)
    z = np.column_stack([x, np.nan_to_num(rows["glucose"].to_numpy() - 105.0) / 15.0])
    cold = OffsetLogisticRegression(C=0.3).fit(z, y, offset)
    warm = OffsetLogisticRegression(C=0.3).fit(z, y, offset, coef_init=np.full(4, 2.0),
                                               intercept_init=-3.0)
    np.testing.assert_allclose(warm.coef_, cold.coef_, atol=1e-4)
    assert warm.intercept_ == pytest.approx(cold.intercept_, abs=1e-4)


def test_selection_rows_leave_small_sites_whole_and_keep_class_shares() -> None:
    """Up to SELECTION_ROWS rows: all of them. Above: a seeded, stratified subsample."""
    from client.adapt import SELECTION_MIN_CLASS, SELECTION_ROWS, selection_rows

    rng = np.random.default_rng(0)
    assert selection_rows((rng.random(SELECTION_ROWS) < 0.3).astype(int)) is None
    y = (rng.random(3 * SELECTION_ROWS) < 0.3).astype(int)
    pick = selection_rows(y, seed=1)
    assert pick is not None and abs(len(pick) - SELECTION_ROWS) <= 1
    assert np.all(np.diff(pick) > 0)  # sorted, no row twice
    assert abs(y[pick].mean() - y.mean()) < 1.0 / SELECTION_ROWS + 1e-12
    np.testing.assert_array_equal(pick, selection_rows(y, seed=1))
    other = selection_rows(y, seed=2)
    assert other is not None and not np.array_equal(pick, other)
    # A rare class: the subsample grows to hold SELECTION_MIN_CLASS of its rows ...
    rare = np.zeros(10 * SELECTION_ROWS, dtype=int)
    rare[:4 * SELECTION_MIN_CLASS] = 1
    grown = selection_rows(rare)
    assert grown is not None and rare[grown].sum() == SELECTION_MIN_CLASS
    # ... up to every row, and then the site is cross-validated on all of them.
    rare[SELECTION_MIN_CLASS:] = 0
    assert selection_rows(rare) is None


@pytest.fixture(scope="module")
def large_site() -> Inputs:
    return _glucose_site(26_000, 1.0, 5)


def test_large_site_chooses_on_its_subsample_and_fits_on_all_rows(large_site: Inputs) -> None:
    """The rule sees the subsample only; the chosen model is then fitted on every row."""
    from client.adapt import fit_correction, selection_rows
    from shared.correction import OffsetLogisticRegression, correction_inputs
    from shared.preprocessing import TabularPreprocessor

    x, rows, offset, y, features, seed = large_site
    pick = selection_rows(y, seed)
    assert pick is not None
    with threadpool_limits(limits=1):
        model = fit_correction(x, rows, offset, y, features, seed=seed)
        # The same rule applied to the subsample as a site of its own (cold starts): the same
        # choice, the same scores to L-BFGS's tolerance.
        alone = fit_correction(x[pick], rows.iloc[pick], offset[pick], y[pick], features,
                               seed=seed)
    assert model.applied and model.choice == alone.choice
    assert model.cv["selection_rows"] == len(pick) and model.cv["training_rows"] == len(y)
    assert f"subsample of {len(pick)} of the {len(y)} training rows" in model.reason
    assert [e["candidate"] for e in model.evidence] == [e["candidate"] for e in alone.evidence]
    for mine, theirs in zip(model.evidence, alone.evidence, strict=True):
        assert mine["cv_log_loss"] == pytest.approx(theirs["cv_log_loss"], abs=1e-6)
    # Fitted on all rows: their preprocessing, their optimum.
    assert model.site_preprocessing is not None
    assert model.site_preprocessing["n_samples_seen"] == len(y)
    assert model.source_weight == 1.0 and model.strength is not None
    prep = TabularPreprocessor(features).fit(rows)
    direct = OffsetLogisticRegression(C=model.strength).fit(correction_inputs(x, rows, prep), y,
                                                            offset)
    np.testing.assert_allclose(model.coef, direct.coef_, atol=1e-4)
    assert model.intercept == pytest.approx(direct.intercept_, abs=1e-4)


def test_large_site_choice_never_looks_outside_its_subsample(large_site: Inputs) -> None:
    """Rows outside the subsample change the fitted weights, never the evidence or choice."""
    from client.adapt import fit_correction, selection_rows

    x, rows, offset, y, features, seed = large_site
    pick = selection_rows(y, seed)
    assert pick is not None
    others = np.setdiff1d(np.arange(len(y)), pick)
    # Other inputs and source logits for the rows outside it (the labels, which decide the
    # stratified draw, stay).
    x2, rows2, offset2 = x.copy(), rows.copy(), offset.copy()
    rng = np.random.default_rng(0)
    x2[others] = rng.normal(size=(len(others), x.shape[1]))
    rows2.iloc[others, 0] = rng.normal(90.0, 30.0, len(others))
    offset2[others] = rng.normal(0.0, 2.0, len(others))
    with threadpool_limits(limits=1):
        a = fit_correction(x, rows, offset, y, features, seed=seed)
        b = fit_correction(x2, rows2, offset2, y, features, seed=seed)
    assert a.evidence == b.evidence and a.choice == b.choice
    assert a.coef != b.coef
