"""Drills on bad site data: malformed files that must fail safely, and one site's noisy labels."""

from __future__ import annotations

import csv
import io
import re
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from client.site import read_manifest, write_manifest
from drills.base import RUN_LOGS, DrillResult, Engine, drill, simulate_with_faults
from shared.schema import BUILTIN_DIR
from shared.settings import RunSettings
from simulations.generator import LABEL, generate

MALFORMED = ("each of 9 broken site files (bad row, wrong type, missing column, extra column, "
             "unknown category, empty, Latin-1, header merged with the first row, header "
             "shifted by one) fails its site with <data-file>:line:column (no path of the "
             "site); the 2 healthy sites complete; no planted canary appears in any report or "
             "log")
PARTNER_SPLITS = 20
NOISE = ("with 20% of hospital-a's labels flipped, each other site's adapted AUC drops by at "
         "most 0.01 against a clean run, except that a site sharing a feature group with "
         "hospital-a may lose the group's benefit, never more (over 20 splits, at most 0.01 "
         "below the same noisy data without groups); hospital-a's adapted AUC is not below its "
         "source AUC")
HEALTHY = ("hospital-a", "hospital-b")
SMOKER = (
    '\n[[features]]\nname = "smoker"\nkind = "categorical"\n'
    'categories = ["never", "former", "current"]\nscope = "shared"\nrequired = false\n'
)
# Everything a run writes that someone may read (and its logs, drills.base.RUN_LOGS); a planted
# value must appear in none of them.
OUTPUTS = ("report.json", "report.md", "events.jsonl", "replies.jsonl")

Breaker = Callable[[list[list[str]]], tuple[bytes, list[str]]]


def _csv(rows: list[list[str]]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue().encode("utf-8")


def _rows(path: Path) -> list[list[str]]:
    return list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))


def _bad_row(rows: list[list[str]]) -> tuple[bytes, list[str]]:
    rows[5] = ["913.37", *rows[5][1:], "CANARY-5101"]  # one field too many
    return _csv(rows), ["913.37", "CANARY-5101"]


def _wrong_type(rows: list[list[str]]) -> tuple[bytes, list[str]]:
    rows[7][0], rows[7][1] = "914.37", "CANARY-5102"  # text in the numeric weight cell
    return _csv(rows), ["914.37", "CANARY-5102"]


def _missing_column(rows: list[list[str]]) -> tuple[bytes, list[str]]:
    rows = [r[1:] for r in rows]  # drop age (the first column)
    rows[3][0], rows[3][2] = "915.37", "CANARY-5103"
    return _csv(rows), ["915.37", "CANARY-5103"]


def _extra_column(rows: list[list[str]]) -> tuple[bytes, list[str]]:
    rows = [[*r, "ward_note" if i == 0 else "x"] for i, r in enumerate(rows)]
    rows[3][0], rows[3][-1] = "916.37", "CANARY-5104"
    return _csv(rows), ["916.37", "CANARY-5104"]


def _with_smoker(rows: list[list[str]]) -> list[list[str]]:
    """The rows with a valid ``smoker`` column added."""
    return [[*r, "smoker" if i == 0 else ("never", "former", "current")[i % 3]]
            for i, r in enumerate(rows)]


def _unknown_category(rows: list[list[str]]) -> tuple[bytes, list[str]]:
    rows = _with_smoker(rows)
    rows[4][0], rows[4][-1] = "917.37", "CANARY-5105"
    return _csv(rows), ["917.37", "CANARY-5105"]


def _empty(rows: list[list[str]]) -> tuple[bytes, list[str]]:
    return b"", []  # nothing to plant in an empty file


def _latin1(rows: list[list[str]]) -> tuple[bytes, list[str]]:
    rows[2][0], rows[2][1] = "918.37", "CANARY-5107\u00e9"
    return _csv(rows).decode("utf-8").encode("latin-1"), ["918.37", "CANARY-5107"]


def _merged_header(rows: list[list[str]]) -> tuple[bytes, list[str]]:
    rows[1][1], rows[1][2] = "919.37", "CANARY-5108"  # then the line break after the header
    text = _csv(rows).decode("utf-8").replace("\n", "", 1)  # is lost: the row joins it
    return text.encode("utf-8"), ["919.37", "CANARY-5108"]


def _shifted_header(rows: list[list[str]]) -> tuple[bytes, list[str]]:
    rows[0] = ["CANARY-5109", *rows[0]]  # one cell too many before the names
    rows[1][1] = "920.37"
    return _csv(rows), ["920.37", "CANARY-5109"]


BREAKERS: dict[str, Breaker] = {
    "bad row (wrong field count)": _bad_row,
    "wrong type (text in a numeric cell)": _wrong_type,
    "missing required column (age)": _missing_column,
    "extra column (unknown header)": _extra_column,
    "unknown category": _unknown_category,
    "empty file": _empty,
    "wrong encoding (Latin-1)": _latin1,
    "header merged with the first row": _merged_header,
    "header shifted by one": _shifted_header,
}


def _clear(*folders: Path) -> None:
    """Remove what an earlier run of the drill left (replies.jsonl is appended to)."""
    for folder in folders:
        if folder.exists():
            shutil.rmtree(folder)
    folders[0].parent.mkdir(parents=True, exist_ok=True)


def _schema_with_smoker(out: Path) -> Path:
    """The synthetic schema plus an optional shared categorical feature, ``smoker``."""
    text = (BUILTIN_DIR / "synthetic.toml").read_text(encoding="utf-8")
    text = text.replace('name = "synthetic"', 'name = "drill-smoker"', 1) + SMOKER
    path = out / "drill-schema.toml"
    path.write_text(text, encoding="utf-8")
    return path


def canary_hits(out: Path, canaries: list[str], outputs: tuple[str, ...]
                ) -> tuple[int, list[str]]:
    """Occurrences of the canaries in a run's outputs (read as bytes), and files not found.

    Parameters
    ----------
    out : Path
        The run's output folder.
    canaries : list of str
        Planted values.
    outputs : tuple of str
        The files to read, relative to ``out``.

    Returns
    -------
    tuple
        Total occurrences, and the names of expected output files that were absent.
    """
    hits, absent = 0, []
    for name in outputs:
        path = out / name
        if not path.is_file():
            absent.append(name)
            continue
        blob = path.read_bytes()
        hits += sum(blob.count(c.encode("utf-8")) for c in canaries)
    return hits, absent


@drill("malformed-data", MALFORMED, "simulation")
def malformed_data(out: Path, engine: Engine = "simulation") -> DrillResult:
    """Seven sites with one kind of broken file each, two healthy sites, one simulated run.

    Parameters
    ----------
    out : Path
        The drill's folder (data, schema, run outputs).
    engine : {"simulation", "in-process"}
        Where the runs happen (``drills.base.simulate_with_faults``).

    Returns
    -------
    DrillResult
        Figure: broken_sites, reported_with_location, healthy_ok, canary_occurrences.
    """
    data, run = out / "data", out / "run"
    _clear(data, run)
    sites = read_manifest(generate(data, n_sites=len(HEALTHY) + len(BREAKERS), seed=42)).sites
    schema = _schema_with_smoker(out)
    canaries: list[str] = []
    broken: dict[str, str] = {}  # data file name -> kind of damage
    for site, (kind, breaker) in zip(sites[len(HEALTHY):], BREAKERS.items(), strict=True):
        blob, planted = breaker(_rows(site.data_file))
        site.data_file.write_bytes(blob)
        canaries += planted
        broken[site.data_file.name] = kind
    # One healthy site records the optional categorical feature, the other does not.
    sites[0].data_file.write_bytes(_csv(_with_smoker(_rows(sites[0].data_file))))
    files = b"".join(s.data_file.read_bytes() for s in sites[len(HEALTHY):])
    n_planted = sum(c.encode("utf-8") in files for c in canaries)
    manifest = write_manifest(data / "sites.toml", str(schema), [
        {"name": s.name, "data-file": s.data_file.name, "site-features": list(s.site_features)}
        for s in sites], comment="malformed-data drill")
    report = simulate_with_faults(run, manifest, RunSettings(num_server_rounds=2, min_sites=2),
                                  faulty=False, engine=engine)
    entries = report["sites"]
    failed = [n for n, e in entries.items() if e["status"] == "failed"]
    errors = [str(entries[n].get("error") or "") for n in failed]
    by_name = sorted(failed) == sorted(s.name for s in sites[len(HEALTHY):])
    # file:line:column, or file:line for a column missing from the header (it has no column);
    # the site names its file <data-file> in what it sends (its own log has the path).
    owner = {s.data_file.name: s.name for s in sites}
    located = {kind: bool(re.search(r"<data-file>:\d+(:\d+| \(column )",
                                    str(entries.get(owner[file], {}).get("error") or "")))
               for file, kind in broken.items()}
    paths_sent = sum(str(data) in e for e in errors)
    healthy_ok = sum(entries.get(n, {}).get("status") == "ok" for n in HEALTHY)
    outputs = OUTPUTS + RUN_LOGS[engine]
    hits, absent = canary_hits(run, canaries, outputs)
    figure = {"broken_sites": len(broken), "reported_with_location": sum(located.values()),
              "reported_by_site_name": len(failed) if by_name else 0,
              "healthy_ok": healthy_ok, "canary_occurrences": hits,
              "site_paths_in_errors": paths_sent}
    passed = (figure["reported_with_location"] == len(broken) and len(errors) == len(broken)
              and paths_sent == 0
              and by_name and healthy_ok == len(HEALTHY) and hits == 0 and not absent
              and n_planted == len(canaries))
    observed = (f"{figure['reported_with_location']}/{len(broken)} broken sites failed with "
                f"file:line:column ({len(errors)} failed in all), {healthy_ok}/{len(HEALTHY)} "
                f"healthy sites ok, {hits} canary occurrence(s) in {len(outputs) - len(absent)} "
                f"output files" + (f" (absent: {', '.join(absent)})" if absent else ""))
    return DrillResult("malformed-data", MALFORMED, observed, passed, figure, {
        "located": located, "errors": errors, "canaries": canaries,
        "canaries_planted": n_planted, "absent_outputs": absent})


def _flip_labels(path: Path, fraction: float, seed: int) -> int:
    """Flip ``fraction`` of the label column of a site's CSV in place; return how many."""
    rows = _rows(path)
    col = rows[0].index(LABEL)
    n = len(rows) - 1
    picked = np.random.default_rng(seed).choice(n, size=round(fraction * n), replace=False)
    for i in picked:
        row = rows[int(i) + 1]
        row[col] = {"0": "1", "1": "0"}[row[col]]
    path.write_bytes(_csv(rows))
    return len(picked)


def _auc(entry: dict[str, Any], method: str) -> float:
    value = entry.get("metrics", {}).get(method, {}).get("auc")
    return float("nan") if value is None else float(value)


@drill("label-noise", NOISE, "simulation")
def label_noise(out: Path, engine: Engine = "simulation") -> DrillResult:
    """Runs on the same four hospitals (10 rounds): clean, then noisy labels (3 repeats each).

    The noisy site's feature-group partners are compared over ``PARTNER_SPLITS`` repeats of
    the noisy data with groups and without (two more runs).

    Parameters
    ----------
    out : Path
        The drill's folder.
    engine : {"simulation", "in-process"}
        Where the runs happen (``drills.base.simulate_with_faults``).

    Returns
    -------
    DrillResult
        Figure: others_mean_auc_drop, others_max_auc_drop, noisy_adapted_minus_source_auc.
    """
    noisy_site, settings = "hospital-a", RunSettings(num_server_rounds=10, repeats=3)
    clean_data, noisy_data = out / "data-clean", out / "data-noisy"
    _clear(clean_data, noisy_data, out / "clean", out / "noisy", out / "noisy-groups",
           out / "noisy-alone")
    manifest = generate(clean_data, n_sites=4, seed=42)
    shutil.copytree(clean_data, noisy_data)
    flipped = _flip_labels(noisy_data / f"{noisy_site}.csv", 0.2, seed=2024)
    clean = simulate_with_faults(out / "clean", manifest, settings, faulty=False,
                                 engine=engine)["sites"]
    noisy_report = simulate_with_faults(out / "noisy", noisy_data / manifest.name, settings,
                                        faulty=False, engine=engine)
    noisy = noisy_report["sites"]
    # A member of the noisy site's feature groups shares its extension: it is compared with
    # the same noisy run without groups (what it would have had alone).
    partners = sorted({m for g in noisy_report.get("groups", {}).values()
                       if noisy_site in g["members"] for m in g["members"]} - {noisy_site})
    together: dict[str, Any] = {}
    alone: dict[str, Any] = {}
    if partners:
        # A partner's few held-out rows make three splits' AUC too noisy to tell 0.01 apart:
        # with and without groups are compared over PARTNER_SPLITS splits each.
        many = replace(settings, repeats=PARTNER_SPLITS)
        together = simulate_with_faults(out / "noisy-groups", noisy_data / manifest.name, many,
                                        faulty=False, engine=engine)["sites"]
        alone = simulate_with_faults(out / "noisy-alone", noisy_data / manifest.name,
                                     replace(many, min_group_sites=0), faulty=False,
                                     engine=engine)["sites"]
    others = sorted(n for n in clean if n != noisy_site)
    drops = {n: _auc(clean[n], "adapted") - _auc(noisy.get(n, {}), "adapted") for n in others}
    harm = {n: _auc(alone[n], "adapted") - _auc(together.get(n, {}), "adapted")
            for n in partners}
    mean_drop = float(np.mean([_auc(clean[n], "adapted") for n in others])
                      - np.mean([_auc(noisy.get(n, {}), "adapted") for n in others]))
    site = noisy.get(noisy_site, {})
    gain = _auc(site, "adapted") - _auc(site, "source")
    outside = [drops[n] for n in others if n not in partners]
    figure = {"others_mean_auc_drop": round(mean_drop, 4),
              "others_max_auc_drop": round(max(drops.values()), 4),
              "outside_max_auc_drop": round(max(outside), 4) if outside else None,
              "partners_max_harm": round(max(harm.values()), 4) if harm else None,
              "noisy_adapted_minus_source_auc": round(gain, 4)}
    # Each other site on its own (stricter than their mean); False if an AUC was undefined.
    passed = bool(all(d <= 0.01 for d in outside) and all(h <= 0.01 for h in harm.values())
                  and gain >= 0.0)
    observed = (f"{flipped} labels of {noisy_site} flipped: the other sites' mean adapted AUC "
                f"drop {mean_drop:+.4f} (max per site {max(drops.values()):+.4f}"
                + (f"; {', '.join(partners)} in its group: at most "
                   f"{max(harm.values()):+.4f} below the noisy run without groups"
                   if harm else "") + f"); {noisy_site} adapted - source AUC = {gain:+.4f}")
    return DrillResult("label-noise", NOISE, observed, passed, figure, {
        "per_site_drop": {n: round(d, 4) for n, d in drops.items()}, "flipped": flipped,
        "group_partners": {n: {"drop_vs_clean": round(drops[n], 4),
                               "below_no_groups": round(h, 4)} for n, h in harm.items()},
        "noisy_site": {m: _auc(site, m) for m in ("local", "source", "adapted")},
        "clean_site": {m: _auc(clean.get(noisy_site, {}), m)
                       for m in ("local", "source", "adapted")},
        "noisy_site_correction": site.get("correction", {}).get("status")})
