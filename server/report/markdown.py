"""Render a run's report as a Markdown document."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from server.report.common import (
    _DASH,
    _METRIC_TITLES,
    METRICS,
    _best_method,
    _fmt,
    _fmt_int,
    _fmt_pct,
    _is_failed,
    _mean_metric,
    _num,
    _plural,
    _positives,
    _repeats,
    _site_metrics,
    _sites,
    _value_sd,
    methods_in,
    to_jsonable,
)

MAX_MARKDOWN_SITES = 50
"""Sites listed in the Markdown tables; the rest are counted in a note (all are in the JSON)."""

_TIMING_ORDER = ("total", "stats", "train", "adapt", "evaluate")


# ---------------------------------------------------------------- Markdown cells


def _md(text: Any) -> str:
    """Make text safe for a Markdown table cell (no pipes, no line breaks)."""
    return " ".join(str(text).split()).replace("|", r"\|")


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str = "") -> list[str]:
    """Return the lines of a Markdown table; ``align`` holds ``l``/``r`` per column."""
    aligns = align.ljust(len(header), "l")
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if a == "r" else ":---" for a in aligns) + "|",
    ]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return lines


# ---------------------------------------------------------------- sections


def _metric_section(
    report: Mapping[str, Any],
    metric: str,
    methods: Sequence[str],
    shown: Sequence[tuple[str, dict[str, Any]]],
) -> list[str]:
    """Return a per-metric Markdown table: sites as rows, methods as columns, a mean row."""
    repeats = _repeats(report)
    header = ["site", "n test", "positives (prevalence)",
              *("true model" if m == "oracle" else m for m in methods)]
    rows: list[list[str]] = []
    partial_auc = False
    for name, site in shown:
        row = [_md(name), _fmt_int(site.get("n_test")), _positives(site)]
        if _is_failed(site):
            rows.append(row + [_md(site.get("status", "failed"))] * len(methods))
            continue
        site_methods = [m for m in methods if m in ("local", "source", "adapted")]
        best = _best_method(site, site_methods, metric) if metric == "auc" else None
        for method in methods:
            value, sd = _value_sd(site, method, metric)
            cell = _fmt(value, sd)
            if metric == "auc" and value is not None and repeats:
                auc_n = _num(_site_metrics(site, method).get("auc_n"))
                if auc_n is not None and int(auc_n) < repeats:
                    cell += f" (n={int(auc_n)})"
                    partial_auc = True
            if method == best:
                cell = f"**{cell}**"
            row.append(cell)
        rows.append(row)
    judged = len((report.get("summary") or {}).get("sites_judged") or [])
    rows.append(
        [f"**mean over the {_plural(judged, 'site')} that can judge**", "", ""]
        + [_fmt(_mean_metric(report, m, metric)) for m in methods]
    )
    lines = [f"### {_METRIC_TITLES[metric]}", ""]
    lines += _md_table(header, rows, "lrr" + "r" * len(methods))
    notes = []
    if metric == "auc":
        notes.append("Bold: the best AUC of the site's three models (local, source, adapted). "
                     "A dash: AUC undefined (one class in test).")
        if partial_auc:
            notes.append(
                f"(n=k): AUC was defined in only k of the {repeats} repeats; "
                "the mean is over those."
            )
    if notes:
        lines += ["", " ".join(notes)]
    return [*lines, ""]


def _models_section(shown: Sequence[tuple[str, dict[str, Any]]], repeats: int | None) -> list[str]:
    """Return what each site should use and why, and how sure its lead is."""
    lines = ["## What each site should use, and why", ""]
    lines += [
        "Each site chose its model by repeated cross-validation on its own training rows only "
        "(the held-out rows are never seen): the source model, a recalibration, a correction of "
        "strength C, its local-only model, or a blend of the two. Another model is taken only "
        "when it beats the source model's cross-validated log-loss by more than one standard "
        "error (and ranks patients at least as well); among those, the lowest log-loss wins. "
        "The held-out comparison below then shows how that choice did on patients it never "
        "saw.",
        "",
    ]
    for name, site in shown:
        if _is_failed(site):
            continue
        assessment = site.get("assessment") or {}
        model = site.get("model") or {}
        choices = model.get("choices") or {}
        chosen = ""
        if repeats and repeats > 1 and choices:
            chosen = " Chosen over the splits: " + ", ".join(
                f"{_md(c)} ({n})" for c, n in choices.items()) + "."
        lines += [f"- **{_md(name)}** should {_md(assessment.get('use', ''))}.{chosen} "
                  f"{_md(assessment.get('verdict', ''))}."]
    lines += [""]
    header = ["site", "adapted − local", "adapted − source", "local − source"]
    rows = []
    for name, site in shown:
        comparisons = (site.get("assessment") or {}).get("comparisons") or {}
        if _is_failed(site) or not comparisons:
            continue
        row = [_md(name)]
        for key in ("adapted-local", "adapted-source", "local-source"):
            c = comparisons.get(key) or {}
            if c.get("difference") is None:
                row.append(_DASH)
            elif c.get("low") is None:
                row.append(f"{c['difference']:+.3f}")
            else:
                row.append(f"{c['difference']:+.3f} ({c['low']:+.3f} to {c['high']:+.3f})")
        rows.append(row)
    if rows:
        lines += ["### Paired AUC differences on the same held-out patients", "",
                  "Difference and 95 % interval: the paired bootstrap of one split's held-out "
                  "patients, or, over several seeded splits, the corrected resampled t interval "
                  "(Nadeau and Bengio). An interval that excludes 0 is a lead larger than its "
                  "uncertainty.", "", *_md_table(header, rows, "lrrr"), ""]
    return lines


def _calibration_section(shown: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    """Return each method's calibration slope and intercept per site."""
    header = ["site", *(f"{m} slope / intercept" for m in ("local", "source", "adapted"))]
    rows = []
    for name, site in shown:
        if _is_failed(site):
            continue
        row = [_md(name)]
        for method in ("local", "source", "adapted"):
            slope, _ = _value_sd(site, method, "cal_slope")
            intercept, _ = _value_sd(site, method, "cal_intercept")
            row.append(f"{_fmt(slope, digits=2)} / {_fmt(intercept, digits=2)}")
        rows.append(row)
    if not rows:
        return []
    return ["## Calibration", "",
            "Clinicians act on risks, not ranks. The calibration slope (1 is ideal; below 1: "
            "risks too extreme) and intercept (0 is ideal; below 0: risks too high on average) "
            "come from a logistic fit of the held-out outcomes on each model's logits; the "
            "figure shows the reliability curves.", "", *_md_table(header, rows, "lrrr"), ""]


def _groups_section(report: dict[str, Any]) -> list[str]:
    """Each feature group: members, rows, rounds, the effects learned, who chose it."""
    groups = report.get("groups") or {}
    if not groups:
        return []
    lines = ["## Feature groups", "",
             "Sites measuring the same site-only features trained a group extension together "
             "(Newton over their rows, the source model fixed); each member could choose it, "
             "or it plus a private correction.", "",
             "| group | members | rows | rounds | effects (per standardised unit) | chosen by |",
             "|---|---|---|---|---|---|"]
    for name, g in groups.items():
        rows = "—" if g.get("rows") is None else f"{g['rows']:.0f}"
        rounds = "—" if g.get("rounds") is None else f"{g['rounds']:.1f}"
        effects = ", ".join(f"{_md(k)} {v:+.3f}" for k, v in (g.get("effects") or {}).items()
                            if v is not None) or "—"
        chosen = ", ".join(f"{_md(k)} ({n})" for k, n in (g.get("chosen_by") or {}).items())
        skipped = f"; skipped: {_md('; '.join(g['skipped']))}" if g.get("skipped") else ""
        lines.append(f"| {_md(name)} | {_md(', '.join(g['members']))} | {rows} | {rounds} | "
                     f"{effects} | {chosen or 'none'}{skipped} |")
    return [*lines, ""]


def _glossary(methods: Sequence[str]) -> list[str]:
    """How to read the report: the methods present, the choices, the statuses, the flags."""
    words = ("- **local**: the site's own model, trained on its own rows alone (what it could "
             "build without the federation). **source**: the shared model trained by federated "
             "learning. **adapted**: the model the site chose (see below).")
    if "pooled" in methods:
        words += (" **pooled**: one central model on every site's rows (simulation only: what "
                  "pooling records would give).")
    if "oracle" in methods:
        words += (" **true model** (generated data only): the AUC of the model that generated "
                  "the data, on the same held-out patients. It is not a ceiling: on a few "
                  "held-out rows a fitted model can score higher by chance.")
    return ["## How to read this report", "", words, *GLOSSARY]


GLOSSARY = [
    "- **Choices**: *source* (the shared model unchanged); *recalibration* (the shared model "
    "with the site's own base rate: risks shift, the ranking does not); *correction C=c* (the "
    "shared model plus a penalised logistic regression on the site's inputs and its own "
    "features; **strength** C is the inverse penalty: larger C lets the site's data move the "
    "model further from the shared one); *local C=c* (the site's own model, ignoring the "
    "shared one); *blend s source* (share s of the shared model's logit plus 1 - s of the "
    "local one).",
    "- **Status**: *ok* (evaluated), *refused* (the site's policy refused a phase; the rule is "
    "named), *failed* (the phase and reason are given), *lost* (missed "
    "training rounds and did not come back; a site that came back is *ok* with its missed "
    "rounds listed). A correction *refused* at evaluation (tampered, foreign, other model) "
    "means the site fell back to the source model and says why.",
    "- **Too few to judge**: a held-out set with fewer than 10 rows of either class; its AUCs "
    "are shown but left out of the per-site means (the weighted means count every row).",
    "",
]


def _training_lines(report: Mapping[str, Any]) -> list[str]:
    """Say when Newton converged before the planned rounds (the loss plot ends there)."""
    planned = (report.get("config") or {}).get("num-server-rounds")
    done = [r for r in report.get("converged_rounds") or [] if r is not None]
    if not done or planned is None or max(done) >= planned:
        return []
    rounds = ", ".join(str(r) for r in done)
    return [f"Training converged in round {rounds} of the {planned} planned (Newton: the "
            "step changed no weight by more than newton-tolerance); later rounds were not "
            "run, so the loss plot ends there. Flower still prints the headings of the "
            "planned rounds, with nothing sent.", ""]


def _summary_section(report: Mapping[str, Any], methods: Sequence[str]) -> list[str]:
    """Return the summary: mean metrics per method next to the majority-label baseline."""
    summary = report.get("summary") or {}
    majority = _num(summary.get("majority_accuracy"))
    rows = []
    summary_methods = summary.get("methods") or {}
    for method in methods:
        accuracy = _mean_metric(report, method, "accuracy")
        gain = _DASH
        if accuracy is not None and majority is not None:
            gain = f"{accuracy - majority:+.3f}"
        weighted = summary_methods.get(method) or {}
        rows.append(
            [
                "true model" if method == "oracle" else method,
                _fmt(_mean_metric(report, method, "auc")),
                _fmt(_num(weighted.get("weighted_auc"))),
                _fmt(accuracy),
                gain,
                _fmt(_mean_metric(report, method, "brier")),
                _fmt(_mean_metric(report, method, "log_loss")),
                _fmt_int(weighted.get("sites_best_auc")),
            ]
        )
    rows.append(["majority label (baseline)", _DASH, _DASH, _fmt(majority), _DASH, _DASH, _DASH,
                 _DASH])
    header = ["method", "mean AUC", "weighted AUC", "mean accuracy", "vs majority",
              "mean Brier", "log loss", "sites best"]
    sites = _sites(report)
    failed = sum(_is_failed(site) for _, site in sites)
    judged = len(summary.get("sites_judged", []))
    lines = [
        "## Summary",
        "",
        f"{len(sites) - failed} of {_plural(len(sites), 'site')} have results. Means are over "
        f"the {judged} whose held-out sets can judge (at least 10 patients of each class); "
        "weighted means over every site with results, weighted by its held-out rows. The "
        "majority-label baseline predicts each site's most frequent label; an accuracy at or "
        "below it means the model adds little.",
        "",
        *_md_table(header, rows, "lrrrrrrr"),
        "",
        "Sites best: where the method has the highest AUC of the site's three.",
        "",
        *_training_lines(report),
    ]
    compared = [
        (a, s)
        for _, site in sites
        if not _is_failed(site)
        for a, s in [(_value_sd(site, "adapted", "auc")[0], _value_sd(site, "source", "auc")[0])]
        if a is not None and s is not None
    ]
    if compared:
        better = sum(a > s for a, s in compared)
        lines += [
            f"Adapted beats source on AUC at {better} of {_plural(len(compared), 'site')}.",
            "",
        ]
    return lines


def _failed_section(sites: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    """Return the list of failed sites with their error."""
    failed = [(name, site) for name, site in sites if _is_failed(site)]
    if not failed:
        return []
    lines = ["## Failed sites", ""]
    for name, site in failed[:MAX_MARKDOWN_SITES]:
        status = _md(site.get("status", "failed"))
        lines.append(f"- **{_md(name)}** ({status}): {_md(site.get('error') or 'no error given')}")
    if len(failed) > MAX_MARKDOWN_SITES:
        lines.append(f"- … and {len(failed) - MAX_MARKDOWN_SITES} more (see report.json).")
    return [*lines, ""]


def _refused_section(sites: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    """Return what each site refused by its own policy, with the rule."""
    rows = [(name, r) for name, site in sites for r in site.get("refused", [])]
    if not rows:
        return []
    lines = ["## Refused by a site's policy", "",
             "| site | phase | round | rule | why |", "|---|---|---|---|---|"]
    for name, r in rows[:MAX_MARKDOWN_SITES]:
        rnd = _DASH if r.get("round") is None else str(r["round"])
        lines.append(f"| {_md(name)} | {_md(r['phase'])} | {rnd} | {_md(r['rule'])} | "
                     f"{_md(r['reason'])} |")
    if len(rows) > MAX_MARKDOWN_SITES:
        lines.append(f"\n… and {len(rows) - MAX_MARKDOWN_SITES} more (see report.json).")
    return [*lines, ""]


def _privacy_section(sites: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    """Return each site's privacy spend (dp = "record"): epsilon per round, and any stop."""
    rows = [(name, site["dp"]) for name, site in sites if site.get("dp")]
    if not rows:
        return []
    lines = ["## Differential privacy (record level)", "",
             "Epsilon each site spent on its patients in this run (at the delta shown), as its "
             "own accountant counted it; the per-round column lists it after each round.", "",
             "| site | epsilon | delta | epsilon by round | stopped |", "|---|---|---|---|---|"]
    for name, dp in rows[:MAX_MARKDOWN_SITES]:
        eps = _DASH if dp.get("epsilon") is None else f"{dp['epsilon']:.3f}"
        delta = _DASH if dp.get("delta") is None else f"{dp['delta']:g}"
        by_round = ", ".join(f"{r['round']}: {r['epsilon']:.2f}" for r in dp.get("per_round", []))
        stop = dp.get("stopped")
        stopped = _DASH if not stop else f"round {stop['round']}: {stop['reason']}"
        lines.append(f"| {_md(name)} | {eps} | {delta} | {_md(by_round) or _DASH} | "
                     f"{_md(stopped)} |")
    if len(rows) > MAX_MARKDOWN_SITES:
        lines.append(f"\n… and {len(rows) - MAX_MARKDOWN_SITES} more (see report.json).")
    return [*lines, ""]


def _secagg_section(report: Mapping[str, Any]) -> list[str]:
    """Return secure aggregation's settings, its error and its rounds (secagg = true)."""
    sa = report.get("secagg")
    if not isinstance(sa, Mapping):
        return []
    lines = [
        "## Secure aggregation", "",
        "The coordinator received every stats and training reply masked (SecAgg+) and read "
        "only the federation's totals, never one site's sums. "
        f"Threshold {_fmt(sa.get('threshold'))} of each neighbourhood, neighbours "
        f"{sa.get('neighbours') or 'every other site'}, values in [-{sa.get('clip'):g}, "
        f"{sa.get('clip'):g}]. Each total is within {sa.get('error_bound', 0.0):.2g} of the "
        f"exact sum, per value; the largest summed value was {sa.get('largest_total', 0.0):.3g}; "
        "no value was clipped (a site whose value would not fit refuses the round instead).", ""]
    rows = [(r["round"], r["secagg"]) for r in report.get("rounds", []) if r.get("secagg")]
    lost = [(rnd, sa_round) for rnd, sa_round in rows if sa_round.get("lost_after_keys")]
    if lost:
        lines += ["| round | sites in the total | lost after sharing their keys |",
                  "|---:|---:|---|"]
        lines += [f"| {rnd} | {x['sites']} | {_md(', '.join(x['lost_after_keys']))} |"
                  for rnd, x in lost]
        lines.append("")
    return lines


def _client_dp_section(report: Mapping[str, Any]) -> list[str]:
    """Return the run's client-level DP (dp = "client"): epsilon per site, by round."""
    dp = report.get("dp")
    if not isinstance(dp, Mapping) or dp.get("mode") != "client":
        return []
    rounds = dp.get("per_round") or []
    lines = [
        "## Differential privacy (client level)", "",
        f"Epsilon **{_fmt(dp.get('epsilon'))}** at delta {dp.get('delta'):g} per site (adding "
        "or removing one whole site's data) for the models this run released, against anyone "
        "who sees them; not against the coordinator, which saw each site's clipped update "
        f"before the noise. Each site's update was clipped to L2 norm {dp.get('clipping_norm'):g}"
        f"; noise multiplier {_fmt(dp.get('noise_multiplier'))}, so noise of standard deviation "
        "noise multiplier x clip / sites on the average (Opacus' RDP accountant, every site "
        "in every round).", "",
        "| repeat | round | sites | noise sd | epsilon |", "|---:|---:|---:|---:|---:|",
    ]
    for r in rounds:
        sd = r.get("noise_std")
        lines.append(f"| {r.get('repeat')} | {r.get('round')} | {r.get('sites')} | "
                     f"{_DASH if sd is None else f'{sd:.4f}'} | {_fmt(r.get('epsilon'))} |")
    return [*lines, ""]


def _timing_section(report: Mapping[str, Any]) -> list[str]:
    """Return the time spent per stage."""
    timing = report.get("timing_s") or {}
    if not timing:
        return []
    total = _num(timing.get("total"))
    keys = [k for k in _TIMING_ORDER if k in timing] + [k for k in timing if k not in _TIMING_ORDER]
    rows = []
    for key in keys:
        seconds = _num(timing[key])
        share = _DASH
        if key != "total" and seconds is not None and total:
            share = _fmt_pct(seconds / total, 0)
        rows.append([_md(key), _fmt(seconds, digits=1), share])
    return ["## Timing", "", *_md_table(["stage", "seconds", "share"], rows, "lrr"), ""]


def _config_value(value: Any) -> str:
    """Format one config value compactly for a table cell."""
    if isinstance(value, str):
        text = value
    else:
        text = json.dumps(to_jsonable(value), ensure_ascii=False, separators=(", ", ": "))
    if len(text) > 120:
        text = text[:119] + "…"
    safe = _md(text).replace("`", "'")
    return f"`{safe}`"


def _config_section(report: Mapping[str, Any]) -> list[str]:
    """Return the run's settings as a two-column table."""
    config = report.get("config") or {}
    if not config:
        return []
    rows = [[_md(key), _config_value(value)] for key, value in config.items()]
    return ["## Configuration", "", *_md_table(["setting", "value"], rows), ""]


def render_markdown(report: dict[str, Any], plots: dict[str, Path] | None = None) -> str:
    """Render a report as a Markdown document.

    Parameters
    ----------
    report : dict
        A run's report (see the module's contract). NaN values are shown as null.
    plots : dict of str to Path, optional
        Images to link, by name (``"metrics"``, ``"loss"``, or others), as paths relative to the
        folder the Markdown is written to. Without it, no images are linked.

    Returns
    -------
    str
        The document: an explanation, one table per metric (sites as rows, methods as columns,
        a mean row), the figures, the corrections, the summary against the majority-label
        baseline, failed sites, timing and configuration.
    """
    config = report.get("config") or {}
    methods = methods_in(report)
    sites = _sites(report)
    shown = sites[:MAX_MARKDOWN_SITES]
    repeats = _repeats(report)
    version = config.get("fedadapt_version")

    lines = ["# fedadapt run report", ""]
    about = (
        "This report compares, for every participating site, models evaluated on the site's "
        "own held-out test split. **source** is the shared model trained by federated learning "
        "across all sites; **adapted** is the model each site chose on its own training rows "
        "(the source model, recalibrated or corrected with the site's private correction, its "
        "local-only model or a blend), which never leaves the site; **local** is a model "
        "trained by the site alone on its own data."
    )
    if "pooled" in methods:
        about += (
            " **pooled** is a central model trained on all sites' data put together: a "
            "non-federated reference, available only in simulation."
        )
    if repeats and repeats > 1:
        about += (
            f" Values are means over {repeats} repeats with a different split, "
            "shown as mean ± standard deviation."
        )
    about += " Only aggregate results appear here, never patient data."
    lines += [about, ""]
    facts = [
        f"{key}: `{_md(config[key])}`"
        for key in ("data", "schema", "protocol", "strategy", "model", "num-server-rounds", "seed")
        if key in config
    ]
    if version is not None:
        facts.insert(0, f"fedadapt `{_md(version)}`")
    if facts:
        lines += ["Run: " + "; ".join(facts) + ".", ""]

    lines += _glossary(methods)
    lines += ["## Results per site", ""]
    if len(sites) > len(shown):
        lines += [
            f"Showing the first {len(shown)} of {len(sites)} sites; "
            "the mean rows cover all of them, and report.json lists every site.",
            "",
        ]
    if not sites:
        lines += ["No sites in this report.", ""]
    else:
        for metric in METRICS:
            lines += _metric_section(report, metric, methods, shown)

    if plots:
        captions = {"metrics": "Per-site metrics by method", "loss": "Training loss by round",
                    "calibration": "Reliability curves per site"}
        lines += ["## Figures", ""]
        for name, path in plots.items():
            lines += [f"![{captions.get(name, name)}]({Path(path).as_posix()})", ""]

    if sites:
        lines += _models_section(shown, repeats)
        lines += _groups_section(report)
        lines += _calibration_section(shown)
    lines += _summary_section(report, methods)
    lines += _failed_section(sites)
    lines += _refused_section(sites)
    if report.get("notes"):
        lines += ["## Notes", "", *[f"- {_md(n)}" for n in report["notes"]], ""]
    lines += _privacy_section(sites)
    lines += _client_dp_section(report)
    lines += _secagg_section(report)
    lines += _timing_section(report)
    lines += _config_section(report)
    return "\n".join(lines).rstrip() + "\n"
