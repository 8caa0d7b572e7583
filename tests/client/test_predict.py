"""Scoring new patients at a site: source and adapted risks; foreign or tampered files refused."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from client.client_app import app as client_app
from client.data import DataError
from client.model_store import ModelStoreError, source_model_path
from client.predict import predict_file
from client.site import read_manifest
from client.store import CorrectionRefused
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
    (correction,) = (site / "corrections").iterdir()
    foreign = next((federation / "sites" / "hospital-b" / "corrections").iterdir())
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
    state = json.loads(source_model_path(site).read_text())
    state["arrays"]["net.bias"]["values"][0] += 0.5
    source_model_path(site).write_text(json.dumps(state))
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
