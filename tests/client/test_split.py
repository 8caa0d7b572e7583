"""Tests of a site's train/held-out split and of the rows each protocol keeps."""

import csv
from pathlib import Path

import numpy as np
import pytest

from client.data import SiteData, read_site_data
from client.split import protocol_rows, split_site
from shared.schema import load_schema
from simulations.generator import generate

CENTRES = {"cleveland": 104, "hungarian": 89, "switzerland": 16, "va": 45}
SHARED_COLUMNS = 10  # age .. oldpeak: the first ten columns of processed.*.data


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> SiteData:
    """Generate hospital-a (600 rows, about 22 % positive, some missing cells)."""
    out = tmp_path_factory.mktemp("sites")
    generate(out, n_sites=4, seed=42)
    return read_site_data(out / "hospital-a.csv", load_schema("synthetic"), ["glucose"])


def test_split_is_deterministic_for_a_seed(site: SiteData) -> None:
    """The same seed gives the same split; other seeds give other splits."""
    a, b = split_site(site, seed=7), split_site(site, seed=7)
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.test, b.test)
    others = [split_site(site, seed=s).test for s in (8, 9, 10)]
    assert all(not np.array_equal(a.test, o) for o in others)


def test_split_is_disjoint_covering_and_sized(site: SiteData) -> None:
    """Train and held-out rows are disjoint, sorted and together cover every row."""
    split = split_site(site, seed=1, test_fraction=0.3)
    assert not set(split.train) & set(split.test)
    n = site.n_rows
    np.testing.assert_array_equal(np.sort(np.r_[split.train, split.test]), np.arange(n))
    assert len(split.test) == round(0.3 * n)
    assert np.all(np.diff(split.train) > 0) and np.all(np.diff(split.test) > 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_is_stratified(site: SiteData, seed: int) -> None:
    """Class proportions in train and held-out rows match the site's within one row."""
    split = split_site(site, seed=seed)
    overall = site.label.mean()
    for part in (split.train, split.test):
        assert abs(site.label[part].mean() - overall) <= 1.0 / len(part) + 1e-12


def test_bad_protocol_or_fraction_raises(site: SiteData) -> None:
    """An unknown protocol or a test fraction outside (0, 1) raises a ValueError."""
    with pytest.raises(ValueError, match="unknown protocol"):
        split_site(site, protocol="random")
    with pytest.raises(ValueError, match="test-fraction"):
        split_site(site, test_fraction=1.0)


def test_flamby_rows_on_a_small_heart_file(tmp_path: Path) -> None:
    """FLamby drops rows with '?' in a shared feature; chol 0 or '?' in site features stay."""
    rows = [
        "63,1,1,145,233,1,2,150,0,2.3,3,0,6,0",  # complete: kept
        "67,1,4,160,0,0,2,108,1,1.5,2,3,3,2",  # chol 0 is a missing code: kept
        "54,1,4,?,0,0,0,120,0,0.0,?,?,?,1",  # '?' in trestbps: dropped
        "50,0,3,130,250,0,0,160,0,?,2,0,3,0",  # '?' in oldpeak: dropped
        "45,1,2,120,240,0,0,170,0,0.5,?,?,?,0",  # '?' only in site features: kept
        "60,1,4,140,0,?,1,130,1,2.0,2,1,7,1",  # '?' in fbs: dropped
    ]
    path = tmp_path / "processed.tiny.data"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    schema = load_schema("heart")
    for site_features in ([], ["slope", "ca", "thal"]):
        data = read_site_data(path, schema, site_features)
        np.testing.assert_array_equal(protocol_rows(data, "flamby"), [0, 1, 4])
        np.testing.assert_array_equal(protocol_rows(data, "default"), np.arange(6))
        assert np.isnan(data.features["chol"].iloc[1])


def test_flamby_protocol_on_uci_files(heart_dir: Path) -> None:
    """FLamby's split of the UCI files: test sizes 104/89/16/45, majority-label accuracy 0.721."""
    schema = load_schema("heart")
    accuracies = []
    kept_with_chol_code = 0
    for centre, n_test in CENTRES.items():
        path = heart_dir / f"processed.{centre}.data"
        data = read_site_data(path, schema)
        split = split_site(data, protocol="flamby", seed=43)
        assert len(split.test) == n_test, centre
        assert len(split.train) + len(split.test) == len(protocol_rows(data, "flamby"))
        # The majority label of the training rows, predicted for every held-out row.
        majority = int(data.label[split.train].mean() >= 0.5)
        accuracies.append(float(np.mean(data.label[split.test] == majority)))

        # Kept rows are exactly the file lines without '?' in a shared column.
        with path.open(encoding="utf-8", newline="") as fh:
            marked = {
                i for i, rec in enumerate(csv.reader(fh), start=1)
                if any(cell.strip() == "?" for cell in rec[:SHARED_COLUMNS])
            }
        kept = set(data.line_numbers[protocol_rows(data, "flamby")].tolist())
        assert kept == set(data.line_numbers.tolist()) - marked, centre
        # Cholesterol written as 0 is missing but does not drop the row.
        chol = data.features["chol"].to_numpy()[protocol_rows(data, "flamby")]
        kept_with_chol_code += int(np.isnan(chol).sum())
    assert np.mean(accuracies) == pytest.approx(0.721, abs=0.001)
    assert kept_with_chol_code > 16  # every kept Switzerland row and more elsewhere


def test_flamby_ignores_missing_site_features_on_uci_files(heart_dir: Path) -> None:
    """Cleveland read with its site features (ca, thal hold '?') keeps all 303 rows."""
    data = read_site_data(heart_dir / "processed.cleveland.data", load_schema("heart"),
                          ["slope", "ca", "thal"])
    assert data.marked_missing[["ca", "thal"]].to_numpy().any()
    assert len(protocol_rows(data, "flamby")) == 303
    assert len(split_site(data, protocol="flamby", seed=43).test) == 104
