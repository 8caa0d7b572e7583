"""Scoring new patients at a site: source and adapted risks; foreign or tampered files refused."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from client.client_app import app as client_app
from client.correction_store import CorrectionRefused
from client.data import DataError
from client.predict import PredictError, predict_file
from client.site import read_manifest
from client.source_model_store import ModelStoreError, list_models
from fedadapt.cli import app as cli
from server.federation import run_federation
from server.progress import Progress
from shared.settings import RunSettings
from simulations.generator import generate
from simulations.inprocess import InProcessGrid, manifest_contexts


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four in-process sites after one complete run (their private folders are filled)."""
    root = tmp_path_factory.mktemp("fed")
    manifest = read_manifest(generate(root / "data", n_sites=4, seed=42))
    grid = InProcessGrid(manifest_contexts(manifest, root, {}), client_app)
    run_federation(grid, RunSettings(num_server_rounds=5, node_wait_timeout=1.0),
                   Progress(root / "out"), {})
    return root


def _new_patients(federation: Path, tmp_path: Path, site: str = "hospital-a") -> Path:
    """The site's file without its label column: patients to score."""
    rows = list(csv.reader((federation / "data" / f"{site}.csv").read_text().splitlines()))
    label = rows[0].index("diabetes")
    path = tmp_path / "new.csv"
    path.write_text("\n".join(",".join(r[:label] + r[label + 1:]) for r in rows[:41]) + "\n")
    return path


def test_scores_every_row_with_source_and_adapted_risks(federation: Path, tmp_path: Path) -> None:
    """One output row per input row; the correction (glucose) changes the risks."""
    out = tmp_path / "risks.csv"
    summary = predict_file(federation / "sites" / "hospital-a", _new_patients(federation, tmp_path),
                           out)
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert summary.rows == len(rows) == 40
    assert [int(r["line"]) for r in rows] == list(range(2, 42))
    assert summary.correction_applied
    for r in rows:
        assert 0.0 < float(r["risk"]) < 1.0 and r["risk"] == r["adapted_risk"]
    assert any(r["source_risk"] != r["adapted_risk"] for r in rows)
    assert out.stat().st_mode & 0o077 == 0  # risks are patient-level: private to the site


def test_a_foreign_or_tampered_correction_is_refused(federation: Path, tmp_path: Path) -> None:
    """Another site's correction, a flipped byte, a tampered source model: nothing is scored."""
    site = tmp_path / "site-a"
    shutil.copytree(federation / "sites" / "hospital-a", site)
    patients = _new_patients(federation, tmp_path)
    (correction,) = (site / "corrections").glob("*.enc")
    foreign = next((federation / "sites" / "hospital-b" / "corrections").glob("*.enc"))
    original = correction.read_bytes()
    correction.write_bytes(foreign.read_bytes())
    with pytest.raises(CorrectionRefused) as refused:
        predict_file(site, patients, tmp_path / "out.csv")
    assert refused.value.reason == "foreign-site"
    flipped = bytearray(original)
    flipped[-5] ^= 0x01
    correction.write_bytes(bytes(flipped))
    with pytest.raises(CorrectionRefused) as refused:
        predict_file(site, patients, tmp_path / "out.csv")
    assert refused.value.reason == "tampered"
    correction.write_bytes(original)
    (model,) = list_models(site)
    state = json.loads(model.read_text())
    state["arrays"]["net.bias"]["values"][0] += 0.5
    model.write_text(json.dumps(state))
    with pytest.raises(ModelStoreError, match="modified"):
        predict_file(site, patients, tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()


def test_new_patients_are_validated_like_training_data(federation: Path, tmp_path: Path) -> None:
    """A bad cell in the input is reported by line and column; nothing is written."""
    path = _new_patients(federation, tmp_path)
    lines = path.read_text().splitlines()
    lines[3] = "abc" + lines[3][lines[3].index(","):]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"new.csv:4:1 \(column 'age'\): not a number"):
        predict_file(federation / "sites" / "hospital-a", path, tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()


def test_predict_command(federation: Path, tmp_path: Path) -> None:
    """`fedadapt predict` writes the risks, and refuses clearly (exit 1) without a model."""
    runner = CliRunner()
    patients = _new_patients(federation, tmp_path)
    ok = runner.invoke(cli, ["predict", "--site-dir", str(federation / "sites" / "hospital-b"),
                             "--input", str(patients), "--output", str(tmp_path / "r.csv")])
    assert ok.exit_code == 0, ok.output
    assert "scored 40 rows" in ok.output
    empty = tmp_path / "empty-site"
    empty.mkdir()
    bad = runner.invoke(cli, ["predict", "--site-dir", str(empty), "--input", str(patients),
                              "--output", str(tmp_path / "r2.csv")])
    assert bad.exit_code == 1
    assert "has not taken part in a completed run" in bad.output


@pytest.mark.parametrize("key, change", [
    ("preprocessing", lambda p: p["mean"].__setitem__(0, p["mean"][0] + 5.0)),
    ("preprocessing", lambda p: p["scale"].__setitem__(1, p["scale"][1] * 2)),
    ("schema-digest", None), ("run-id", None), ("hidden-units", None),
])
def test_an_edited_source_model_is_refused(
    federation: Path, tmp_path: Path, key: str, change: object
) -> None:
    """Every part of the model file is bound to its digest: an edit of any part is refused."""
    site = tmp_path / "site-a"
    shutil.copytree(federation / "sites" / "hospital-a", site)
    (model,) = list_models(site)
    state = json.loads(model.read_text())
    if callable(change):
        change(state[key])
    else:
        state[key] = {"schema-digest": "0" * 64, "run-id": 999, "hidden-units": 3}[key]
    model.write_text(json.dumps(state))
    with pytest.raises(ModelStoreError, match="modified"):
        predict_file(site, _new_patients(federation, tmp_path), tmp_path / "out.csv")
    # Recomputing the digest does not help: the sealed correction is bound to the original.
    from client.source_model_store import model_digest
    state["digest"] = model_digest(state)
    model.write_text(json.dumps(state))
    with pytest.raises((CorrectionRefused, ModelStoreError, PredictError)):
        predict_file(site, _new_patients(federation, tmp_path), tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()


def test_each_run_keeps_its_model_and_predict_says_which(
    federation: Path, tmp_path: Path
) -> None:
    """A later run adds a model beside the first; predict uses the newest unless told."""
    site = federation / "sites" / "hospital-a"
    first = list_models(site)
    assert len(first) == 1
    patients = _new_patients(federation, tmp_path)
    summary = predict_file(site, patients, tmp_path / "a.csv")
    assert summary.model.startswith("run ")
    assert summary.source_model in first[0].read_text()
    run_id = json.loads(first[0].read_text())["run-id"]
    again = predict_file(site, patients, tmp_path / "b.csv", run=str(run_id))
    assert again.source_model == summary.source_model
    with pytest.raises(ModelStoreError, match="no source model of run '424242'"):
        predict_file(site, patients, tmp_path / "c.csv", run="424242")


def test_a_missing_site_feature_falls_back_to_the_source_model(
    federation: Path, tmp_path: Path
) -> None:
    """Without the site's glucose column, every risk is the source model's, and it says so."""
    rows = list(csv.reader(_new_patients(federation, tmp_path).read_text().splitlines()))
    glucose = rows[0].index("glucose")
    path = tmp_path / "no-glucose.csv"
    path.write_text("\n".join(",".join(r[:glucose] + r[glucose + 1:]) for r in rows) + "\n")
    out = tmp_path / "risks.csv"
    summary = predict_file(federation / "sites" / "hospital-a", path, out)
    result = list(csv.DictReader(out.read_text().splitlines()))
    assert summary.correction_applied and summary.corrected_rows == 0
    assert summary.fallback_rows == {"glucose absent": 40}
    for r in result:
        assert r["risk"] == r["source_risk"] and r["correction_applied"] == "0"
        assert r["note"] == "glucose absent"
    assert any("glucose" in w and "absent" in w for w in summary.warnings)


def test_out_of_range_inputs_are_counted(federation: Path, tmp_path: Path) -> None:
    """An impossible age is scored as missing and counted in a warning (no value shown)."""
    path = _new_patients(federation, tmp_path)
    lines = path.read_text().splitlines()
    lines[2] = "500" + lines[2][lines[2].index(","):]
    path.write_text("\n".join(lines) + "\n")
    summary = predict_file(federation / "sites" / "hospital-a", path, tmp_path / "r.csv")
    (warning,) = [w for w in summary.warnings if "'age'" in w]
    assert "1 value(s) outside the valid range" in warning and "500" not in warning


def test_output_paths_that_would_do_harm_are_refused(federation: Path, tmp_path: Path) -> None:
    """The input itself, a folder, or a path under a file: refused, nothing written."""
    patients = _new_patients(federation, tmp_path)
    before = patients.read_bytes()
    site = federation / "sites" / "hospital-a"
    with pytest.raises(PredictError, match="is the input file"):
        predict_file(site, patients, patients)
    with pytest.raises(PredictError, match="is the input file"):
        predict_file(site, patients, tmp_path / "." / patients.name)
    with pytest.raises(PredictError, match="is a folder"):
        predict_file(site, patients, tmp_path)
    with pytest.raises(PredictError, match="is a file, not a folder"):
        predict_file(site, patients, patients / "risks.csv")
    assert patients.read_bytes() == before
    for inside in (site / "site.key", site / "corrections" / "risks.csv", site / "r.csv"):
        kept = inside.read_bytes() if inside.exists() else None
        with pytest.raises(PredictError, match="inside the site folder"):
            predict_file(site, patients, inside, overwrite=True)
        assert (inside.read_bytes() if inside.exists() else None) == kept
    other = tmp_path / "other-patients.csv"
    other.write_text("keep")
    with pytest.raises(PredictError, match="exists: name a new file, or pass --overwrite"):
        predict_file(site, patients, other)
    assert other.read_text() == "keep"
    predict_file(site, patients, other, overwrite=True)
    assert other.read_text().startswith("line,risk")


def test_predict_command_errors_are_one_line(federation: Path, tmp_path: Path) -> None:
    """Bad paths and a key readable by others end with one line, exit 1, no traceback."""
    runner = CliRunner()
    patients = _new_patients(federation, tmp_path)
    site = tmp_path / "site"
    shutil.copytree(federation / "sites" / "hospital-a", site)
    cases = {
        "is a file, not a site folder": ["--site-dir", str(patients), "--input", str(patients),
                                         "--output", str(tmp_path / "x.csv")],
        "is the input file": ["--site-dir", str(site), "--input", str(patients),
                              "--output", str(patients)],
        "is a folder": ["--site-dir", str(site), "--input", str(patients),
                        "--output", str(tmp_path)],
    }
    for expected, args in cases.items():
        result = runner.invoke(cli, ["predict", *args])
        assert result.exit_code == 1, (expected, result.output)
        assert expected in result.output and "Traceback" not in result.output
    (site / "site.key").chmod(0o644)
    result = runner.invoke(cli, ["predict", "--site-dir", str(site), "--input", str(patients),
                                 "--output", str(tmp_path / "y.csv")])
    assert result.exit_code == 1 and "chmod 600" in result.output, result.output
    assert not (tmp_path / "y.csv").exists()


def test_an_empty_site_feature_cell_is_noted_on_its_row(federation: Path, tmp_path: Path) -> None:
    """A row without glucose says so; the correction applies only if it learned missing glucose."""
    from client.correction_store import load_correction
    from client.source_model_store import load_source_model

    site = federation / "sites" / "hospital-a"
    rows = list(csv.reader(_new_patients(federation, tmp_path).read_text().splitlines()))
    glucose = rows[0].index("glucose")
    rows[3][glucose] = ""
    path = tmp_path / "one-missing.csv"
    path.write_text("\n".join(",".join(r) for r in rows) + "\n")
    predict_file(site, path, tmp_path / "r.csv")
    result = list(csv.DictReader((tmp_path / "r.csv").read_text().splitlines()))
    state = load_correction(site, "hospital-a", load_source_model(site).digest)
    learned = "glucose" in (state["site_preprocessing"] or {}).get("indicator_features", [])
    row = result[2]
    assert row["note"] == ("glucose missing, as in training" if learned else "glucose missing")
    assert row["correction_applied"] == ("1" if learned else "0")
    present = [i for i, r in enumerate(rows[1:]) if r[glucose] not in ("", "NA")]
    assert present and all(result[i]["note"] == "" for i in present)
