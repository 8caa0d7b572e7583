"""Tests of the seeded synthetic-hospital generator."""

import json
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# The project is not installed into the venv: make its packages importable from here.
from client.data import read_site_data
from shared.schema import load_schema
from simulations.generator import generate, hospital_specs, site_name

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "simulations" / "demo"


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _manifest(path: Path) -> dict[str, Any]:
    return tomllib.loads(path.read_text(encoding="utf-8"))


def _truth(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "truth.json").read_text(encoding="utf-8"))


def _sites(folder: Path) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in _truth(folder)["sites"]}


@pytest.fixture(scope="module")
def default_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The eight default sites, seed 42, generated once for the module."""
    out = tmp_path_factory.mktemp("default")
    generate(out, seed=42)
    return out


def test_same_seed_gives_identical_bytes(tmp_path: Path, default_dir: Path) -> None:
    """Generating twice with the same seed writes byte-identical files."""
    generate(tmp_path, seed=42)
    assert _files(tmp_path) == _files(default_dir)


def test_different_seed_gives_different_data(tmp_path: Path, default_dir: Path) -> None:
    """Another seed changes every site's rows."""
    generate(tmp_path, seed=43)
    ours, theirs = _files(tmp_path), _files(default_dir)
    assert ours.keys() == theirs.keys()
    for name in ours:
        if name.endswith(".csv"):
            assert ours[name] != theirs[name], name


def test_generate_returns_manifest_with_relative_paths(tmp_path: Path) -> None:
    """The returned path is sites.toml, naming the schema and each site's file and features."""
    manifest = generate(tmp_path / "new" / "folder", n_sites=4, seed=42)
    assert manifest == tmp_path / "new" / "folder" / "sites.toml"
    content = _manifest(manifest)
    assert content["schema"] == "synthetic"
    names = [s["name"] for s in content["sites"]]
    assert names == ["hospital-a", "hospital-b", "hospital-c", "hospital-d"]
    for site in content["sites"]:
        assert site["data-file"] == f"{site['name']}.csv"
        assert (manifest.parent / site["data-file"]).is_file()


def test_every_file_passes_the_reader(default_dir: Path) -> None:
    """Each site file reads cleanly with its manifest features; range errors are counted."""
    schema = load_schema("synthetic")
    content = _manifest(default_dir / "sites.toml")
    truth = _sites(default_dir)
    out_of_range = 0
    for site in content["sites"]:
        data = read_site_data(default_dir / site["data-file"], schema, site["site-features"])
        assert data.n_rows == truth[site["name"]]["n"]
        assert data.rows_without_label == 0
        assert data.site_columns == tuple(site["site-features"])
        assert data.summary["age"].out_of_range == 0
        assert data.summary["age"].missing == 0
        assert data.label.mean() == pytest.approx(truth[site["name"]]["prevalence"], abs=1e-6)
        counted = sum(s.out_of_range for s in data.summary.values())
        assert counted == truth[site["name"]]["out_of_range_cells"]
        out_of_range += counted
    assert out_of_range > 0


def test_missing_cells_are_within_three_to_ten_percent(default_dir: Path) -> None:
    """Missing-at-random cells make up 3-10% of each site's measurable cells."""
    schema = load_schema("synthetic")
    for site in _manifest(default_dir / "sites.toml")["sites"]:
        data = read_site_data(default_dir / site["data-file"], schema, site["site-features"])
        holes = [c for c in ("weight", "height", "systolic_bp", "glucose")
                 if data.summary[c].present and c in data.marked_missing]
        fraction = data.marked_missing[holes].to_numpy().mean()
        assert 0.02 <= fraction <= 0.11, (site["name"], fraction)


def test_roles_of_the_eight_default_sites(default_dir: Path) -> None:
    """Two large sites, four small ones, rare outcomes, glucose only where measured."""
    truth = _sites(default_dir)
    sizes = {name: s["n"] for name, s in truth.items()}
    assert sorted(sizes.values(), reverse=True)[:2] == [900, 700]
    assert sum(n < 150 for n in sizes.values()) == 4 and min(sizes.values()) < 50
    expected = {s["name"]: s["spec"]["role"] for s in truth.values()}
    prevalences = {name: s["prevalence"] for name, s in truth.items()}
    assert min(prevalences.values()) <= 0.10 and max(prevalences.values()) >= 0.40
    assert all(0.0 < p < 0.6 for p in prevalences.values()), prevalences
    assert "rare outcome" in expected["hospital-g"]

    header_d = (default_dir / "hospital-d.csv").read_text(encoding="utf-8").splitlines()[0]
    assert "systolic_bp" not in header_d.split(",")
    assert truth["hospital-d"]["spec"]["label_noise"] == pytest.approx(0.15)
    assert 0.08 <= truth["hospital-d"]["fraction_flipped"] <= 0.22
    assert truth["hospital-b"]["spec"]["extra_bp_effect"] < 0

    for site in _manifest(default_dir / "sites.toml")["sites"]:
        header = (default_dir / site["data-file"]).read_text(encoding="utf-8").splitlines()[0]
        measured = truth[site["name"]]["spec"]["glucose_measured"]
        assert ("glucose" in header.split(",")) == measured
        assert site["site-features"] == (["glucose"] if measured else [])
    assert sum(s["spec"]["glucose_measured"] for s in truth.values()) == 4


def test_truth_records_each_site_s_best_achievable_auc(default_dir: Path) -> None:
    """A population AUC per site, from the true model on what the site records."""
    truth = _sites(default_dir)
    for name, site in truth.items():
        assert 0.55 < site["best_auc"] < 0.95, name
    # Glucose (measured at a, not at b) is what most separates the large sites.
    assert truth["hospital-a"]["best_auc"] > truth["hospital-b"]["best_auc"] + 0.1


def test_site_files_do_not_depend_on_later_sites(tmp_path: Path, default_dir: Path) -> None:
    """Site k's file is the same whether 8 or 10 sites are generated."""
    generate(tmp_path, n_sites=10, seed=42)
    ten, eight = _files(tmp_path), _files(default_dir)
    for k in range(8):
        name = f"{site_name(k)}.csv"
        assert ten[name] == eight[name], name
    assert {"hospital-i.csv", "hospital-j.csv"} <= ten.keys()


def test_committed_demo_matches_a_fresh_generation(default_dir: Path) -> None:
    """simulations/demo/ is exactly what generate(..., 8, 42) writes."""
    assert _files(DEMO) == _files(default_dir)


def test_glucose_effect_is_real(default_dir: Path) -> None:
    """At glucose sites the true logit beats the glucose-free logit by more than 0.03 AUC."""
    sites = [s for s in _sites(default_dir).values() if s["spec"]["glucose_measured"]]
    assert sites
    for site in sites:
        assert site["auc_true_logit"] > site["auc_without_glucose"] + 0.03, site["name"]


def test_site_names_continue_after_z() -> None:
    """Names run hospital-a ... hospital-z, then hospital-27, hospital-28, ..."""
    assert site_name(0) == "hospital-a"
    assert site_name(25) == "hospital-z"
    assert site_name(26) == "hospital-27"
    assert site_name(27) == "hospital-28"


def test_fewer_sites_take_the_first_roles() -> None:
    """With fewer than eight sites, the first roles are kept in order."""
    two = hospital_specs(2, seed=42)
    four = hospital_specs(4, seed=42)
    assert two == four[:2]
    assert hospital_specs(1, seed=7) == four[:1]


def test_random_sites_are_seeded_and_in_range() -> None:
    """Sites beyond the roles draw sizes 30-900 (mostly small) from the seed, per seed."""
    specs = hospital_specs(48, seed=3)
    assert specs == hospital_specs(48, seed=3)
    assert specs[8:] != hospital_specs(48, seed=4)[8:]
    sizes = [spec.n for spec in specs[8:]]
    assert all(30 <= n <= 900 for n in sizes)
    assert float(np.median(sizes)) < 300  # log-uniform: most sites are small
    for spec in specs[8:]:
        assert spec.has_bp
        assert 0.03 <= spec.missing_rate <= 0.10
        assert all(0.85 <= f <= 1.15 for f in spec.slopes)
    assert len({spec.name for spec in specs}) == 48


def test_a_thousand_sites(tmp_path: Path) -> None:
    """A thousand sites generate, with names continuing past hospital-z."""
    manifest = generate(tmp_path, n_sites=1000, seed=42)
    content = _manifest(manifest)
    assert len(content["sites"]) == 1000
    assert content["sites"][-1]["name"] == "hospital-1000"
    assert (tmp_path / "hospital-1000.csv").is_file()
    glucose_sites = sum(1 for s in content["sites"][4:] if s["site-features"] == ["glucose"])
    assert 0.2 < glucose_sites / 996 < 0.4


def test_a_manifest_round_trips_any_name(tmp_path: Path) -> None:
    """Names and paths with quotes, backslashes and brackets survive write and read."""
    from client.site import read_manifest, write_manifest

    path = write_manifest(tmp_path / "sites.toml", 'schema "x" \\ [y].toml', [
        {"name": "site.a_1", "data-file": 'dir "q" \\ [x] ü/a.csv', "site-features": ["glucose"],
         "drill-fault": 'x"y'}], comment="line one\nline two")
    manifest = read_manifest(path)
    (site,) = manifest.sites
    assert manifest.schema == 'schema "x" \\ [y].toml'
    assert site.data_file == (tmp_path / 'dir "q" \\ [x] ü' / "a.csv").resolve()
    assert site.site_features == ("glucose",)


def test_generate_never_replaces_a_file_it_did_not_write(tmp_path: Path) -> None:
    """A patient file (or a foreign sites.toml) where generate would write: refused, kept."""
    (tmp_path / "hospital-a.csv").write_text("a hospital's own export")
    with pytest.raises(FileExistsError, match="was not written by fedadapt generate"):
        generate(tmp_path, n_sites=2, seed=1)
    assert (tmp_path / "hospital-a.csv").read_text() == "a hospital's own export"
    generate(tmp_path / "again", n_sites=2, seed=1)
    generate(tmp_path / "again", n_sites=3, seed=2)  # its own earlier output: replaced
    assert (tmp_path / "again" / "hospital-c.csv").exists()
    generate(tmp_path, n_sites=2, seed=1, force=True)
    assert (tmp_path / "hospital-a.csv").read_text().startswith("age,")


def test_generating_fewer_hospitals_into_the_same_folder_leaves_no_earlier_one(
        tmp_path: Path) -> None:
    """Eight, then four: the folder holds the four, and a file of the user's is kept."""
    generate(tmp_path, n_sites=8, seed=1)
    (tmp_path / "notes.txt").write_text("mine")
    generate(tmp_path, n_sites=4, seed=1)
    csvs = sorted(p.name for p in tmp_path.glob("*.csv"))
    assert csvs == [f"hospital-{c}.csv" for c in "abcd"]
    assert (tmp_path / "notes.txt").read_text() == "mine"
