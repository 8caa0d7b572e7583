"""What a site's results mean: intervals on paired differences, the best model, small sets."""

from __future__ import annotations

import math
from typing import Any

import pytest
from scipy import stats

from server.assessment import MIN_CLASS_ROWS_TO_JUDGE, assess, judgeable, paired_interval


def _reply(diff: float, low: float = math.nan, high: float = math.nan) -> dict[str, float]:
    return {"diff.adapted-local.auc": diff, "diff.adapted-local.auc_lo": low,
            "diff.adapted-local.auc_hi": high}


def test_one_split_keeps_the_site_s_bootstrap_interval() -> None:
    """With one split the interval is the paired bootstrap the site computed."""
    c = paired_interval([_reply(0.05, 0.01, 0.09)], "adapted", "local", 100, 50)
    assert (c["difference"], c["low"], c["high"], c["method"]) == (0.05, 0.01, 0.09,
                                                                   "bootstrap")


def test_several_splits_use_the_corrected_resampled_t_interval() -> None:
    """K splits: mean ± t(K-1) * sqrt((1/K + n_test/n_train) * s^2) (Nadeau and Bengio)."""
    diffs = [0.02, 0.05, 0.01, 0.04, 0.03]
    c = paired_interval([_reply(d) for d in diffs], "adapted", "local", 140, 60)
    k, mean = len(diffs), sum(diffs) / len(diffs)
    var = stats.tvar(diffs) * (1 / k + 60 / 140)
    half = stats.t.ppf(0.975, k - 1) * math.sqrt(var)
    assert c["method"] == "corrected t" and c["splits"] == 5
    assert c["difference"] == pytest.approx(mean)
    assert (c["low"], c["high"]) == pytest.approx((mean - half, mean + half))
    # Wider than the naive interval that treats the splits as independent samples.
    naive = stats.t.ppf(0.975, k - 1) * math.sqrt(stats.tvar(diffs) / k)
    assert half > naive


def test_undefined_differences_are_skipped() -> None:
    """Splits where AUC was undefined (one class) do not count."""
    c = paired_interval([_reply(math.nan), _reply(0.02), _reply(0.04)], "adapted", "local",
                        100, 30)
    assert c["splits"] == 2 and c["difference"] == pytest.approx(0.03)
    assert paired_interval([_reply(math.nan)], "adapted", "local", 100, 30)["difference"] is None


def test_a_set_with_few_rows_of_a_class_cannot_judge() -> None:
    """Ten rows of each class are needed to tell models apart."""
    assert judgeable(MIN_CLASS_ROWS_TO_JUDGE, 2 * MIN_CLASS_ROWS_TO_JUDGE)
    assert not judgeable(MIN_CLASS_ROWS_TO_JUDGE - 1, 200)
    assert not judgeable(195, 200)


def _entry(aucs: dict[str, float], positives: int = 40, n_test: int = 120) -> dict[str, Any]:
    return {"n_train": 280, "n_test": n_test, "positives_test": positives,
            "metrics": {m: {"auc": v} for m, v in aucs.items()},
            "model": {"choice": "local C=0.3", "reason": "local C=0.3: cross-validated ..."}}


def test_a_clear_lead_and_one_within_its_uncertainty() -> None:
    """Best method named; 'clear' only when the interval of its lead excludes zero."""
    values = [{"diff.adapted-local.auc": 0.06, "diff.adapted-local.auc_lo": 0.02,
               "diff.adapted-local.auc_hi": 0.10}]
    a = assess(_entry({"local": 0.80, "source": 0.75, "adapted": 0.86}), values)
    assert (a["best"], a["runner_up"], a["lead"]) == ("adapted", "local", "clear")
    assert a["verdict"].startswith("adapted is best, clearly ahead of local")
    assert a["use"] == "use local C=0.3: cross-validated ..."
    values[0]["diff.adapted-local.auc_lo"] = -0.01
    a = assess(_entry({"local": 0.80, "source": 0.75, "adapted": 0.86}), values)
    assert a["lead"] == "within uncertainty" and "not clearly ahead" in a["verdict"]


def test_a_lead_in_the_other_direction_reads_the_stored_pair_backwards() -> None:
    """Local best, the stored pair is adapted-local: the interval is flipped, not reused."""
    values = [{"diff.adapted-local.auc": -0.06, "diff.adapted-local.auc_lo": -0.10,
               "diff.adapted-local.auc_hi": -0.02}]
    a = assess(_entry({"local": 0.86, "source": 0.75, "adapted": 0.80}), values)
    assert (a["best"], a["lead"]) == ("local", "clear")
    assert "+0.060, 95 % interval +0.020 to +0.100" in a["verdict"]


def test_too_small_sets_are_flagged_not_judged() -> None:
    """Three positives: the best is named, but the verdict says there are too few to judge."""
    a = assess(_entry({"local": 0.9, "source": 0.7, "adapted": 0.8}, positives=3, n_test=30),
               [])
    assert not a["judgeable"] and a["lead"] == "not judged"
    assert a["verdict"].startswith("too few patients to judge: 3 positive / 27 negative")
    assert "no model can be judged on them" in a["verdict"]


def test_a_site_using_the_source_model_is_not_compared_with_itself() -> None:
    """Uses source: adapted is the source model, so the runner-up and rival are local."""
    values = [{"diff.adapted-local.auc": -0.036, "diff.adapted-local.auc_lo": -0.096,
               "diff.adapted-local.auc_hi": 0.024,
               "diff.local-source.auc": 0.036, "diff.local-source.auc_lo": -0.024,
               "diff.local-source.auc_hi": 0.096}]
    entry = _entry({"local": 0.666, "source": 0.630, "adapted": 0.630})
    entry["model"] = {"choice": "source", "reason": "no candidate beat the source model"}
    a = assess(entry, values)
    assert (a["best"], a["runner_up"]) == ("local", "source")
    assert "adapted" not in a["verdict"]
    assert a["uses"]["versus"] == "local" and a["uses"]["difference"] == pytest.approx(-0.036)
