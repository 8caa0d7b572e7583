"""Report numbers over repeated splits: means, standard deviations, undefined AUC."""

from __future__ import annotations

import math

from server.summary import RepeatResult, build_report, method_metrics


def _metrics(auc: float, acc: float) -> dict[str, float]:
    values = {"n-test": 10.0, "n-train": 20.0, "positives-test": 4.0,
              "correction-applied": 1.0, "correction-strength": 0.1}
    for method in ("local", "source", "adapted"):
        values.update({f"{method}.auc": auc, f"{method}.accuracy": acc,
                       f"{method}.brier": 0.2, f"{method}.log_loss": 0.5})
    return values


def test_method_metrics_mean_sd_and_undefined_auc() -> None:
    """Means and sample sds over repeats; an undefined AUC is skipped and counted."""
    out = method_metrics([_metrics(0.8, 0.7), _metrics(math.nan, 0.9), _metrics(0.6, 0.8)],
                         "source")
    assert math.isclose(out["auc"], 0.7) and out["auc_n"] == 2
    assert math.isclose(out["auc_sd"], math.sqrt(0.02))
    assert math.isclose(out["accuracy"], 0.8)
    assert method_metrics([_metrics(math.nan, 0.7)], "source")["auc"] is None


def test_build_report_marks_failed_sites_and_keeps_the_others() -> None:
    """A site that failed every repeat is listed as failed with its error."""
    r = RepeatResult(repeat=0, split_seed=42, evaluate={"a": _metrics(0.8, 0.7)},
                     failures={"b": "stats: DataError: x.csv:3:2: not a number"},
                     rounds=[{"round": 1, "loss": 0.6, "global_loss": 0.69, "rejected": []}],
                     timing={"stats": 1.0, "train": 2.0, "adapt": 0.5, "evaluate": 0.5})
    report = build_report({"seed": 42}, [r], total_seconds=4.2)
    assert report["sites"]["a"]["status"] == "ok"
    assert report["sites"]["b"]["status"] == "failed"
    assert "x.csv:3:2" in report["sites"]["b"]["error"]
    assert report["timing_s"] == {"total": 4.2, "stats": 1.0, "train": 2.0, "groups": 0.0,
                                  "adapt": 0.5, "evaluate": 0.5}
    assert report["rounds"][0]["loss"] == 0.6 and report["rounds"][0]["loss_sd"] is None
    assert report["summary"]["majority_accuracy_all_sites"] == 0.6
    assert report["summary"]["majority_accuracy"] is None  # no held-out set can judge
    assert report["summary"]["sites_too_small"] == ["a"]


def _sized(auc: float, n: float, positives: float) -> dict[str, float]:
    return {**_metrics(auc, 0.8), "n-test": n, "positives-test": positives}


def test_small_sets_are_left_out_of_per_site_means_but_weighted_in() -> None:
    """A site with 2 positives does not count as much as one with 40: means and weights."""
    r = RepeatResult(repeat=0, split_seed=1, evaluate={
        "big": _sized(0.9, 100.0, 40.0), "tiny": _sized(0.3, 10.0, 2.0)})
    report = build_report({}, [r], total_seconds=1.0)
    source = report["summary"]["methods"]["source"]
    assert source["mean_auc"] == 0.9  # the tiny site cannot judge
    assert math.isclose(source["weighted_auc"], (0.9 * 100 + 0.3 * 10) / 110)
    assert report["summary"]["sites_judged"] == ["big"]
    assert report["sites"]["tiny"]["assessment"]["verdict"].startswith("too few patients")


def test_a_site_that_refused_by_policy_is_reported_refused_with_the_rule() -> None:
    """A stats refusal makes the site ``refused``; a training refusal is listed by round."""
    from server.summary import RepeatResult, refusals, site_entry

    reason = "refused by policy rule 'min-rows': the training rows would rest on 9 rows"
    result = RepeatResult(repeat=0, split_seed=42, failures={"a": f"stats: {reason}"})
    entry = site_entry("a", [result])
    assert entry["status"] == "refused"
    assert entry["refused"] == [{"phase": "stats", "round": None, "rule": "min-rows",
                                 "reason": "the training rows would rest on 9 rows"}]
    drop = {"round": 4, "reason": "[site b] refused by policy rule 'max-epsilon-total': spent",
            "rounds_missed": [4, 5]}
    assert refusals([], [drop]) == [{"phase": "train", "round": 4, "rule": "max-epsilon-total",
                                     "reason": "spent"}]
    assert refusals(["evaluate: no reply in time"], []) == []
