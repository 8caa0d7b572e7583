"""Tests of ``fedadapt check-data``: exit code, summary, located errors, no cell values."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedadapt.cli import app

ROOT = Path(__file__).resolve().parents[2]
DEMO_FILE = Path("simulations") / "demo" / "hospital-a.csv"
HEADER = "age,weight,height,systolic_bp,glucose,diabetes\n"
CANARY = "CANARY7781"


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["check-data", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return result.exit_code, result.output


def test_demo_file_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The committed demo hospital fits the synthetic schema: exit 0 and its row count."""
    monkeypatch.chdir(ROOT)
    rows = len(DEMO_FILE.read_text(encoding="utf-8").splitlines()) - 1
    code, out = _run("--schema", "synthetic", "--site-features", "glucose", str(DEMO_FILE))
    assert code == 0, out
    assert "fits schema 'synthetic'" in out
    assert f": {rows} rows, " in out
    for feature in ("age", "weight", "height", "systolic_bp", "glucose"):
        assert feature in out


def test_bad_file_exits_non_zero_with_locations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broken file exits non-zero and prints file:line:column for each defect."""
    monkeypatch.chdir(tmp_path)
    Path("bad.csv").write_text(
        HEADER + "50,94.5,182,134,87,0\n" + f"65,{CANARY},153,131,98,1\n"
        + f"41,70.2,168,118,90,{CANARY}\n",
        encoding="utf-8",
    )
    code, out = _run("--schema", "synthetic", "bad.csv")
    assert code != 0
    assert "does not fit schema 'synthetic'" in out
    assert "bad.csv:3:2 (column 'weight')" in out
    assert "bad.csv:4:6 (column 'diabetes')" in out
    assert CANARY not in out


def test_headerless_file_does_not_print_patient_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file without its header fails with a location and without the first row's values."""
    monkeypatch.chdir(tmp_path)
    Path("noheader.csv").write_text("50,777.123,182,134,87,0\n65,79.4,153,131,98,1\n",
                                    encoding="utf-8")
    code, out = _run("--schema", "synthetic", "noheader.csv")
    assert code != 0
    assert "noheader.csv:1:1" in out
    assert "777.123" not in out


def test_unknown_schema_exits_non_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown schema name fails and says which built-ins exist."""
    monkeypatch.chdir(tmp_path)
    Path("site.csv").write_text(HEADER + "50,94.5,182,134,87,0\n", encoding="utf-8")
    code, out = _run("--schema", "cardio", "site.csv")
    assert code != 0
    assert "synthetic" in out
    assert "heart" in out
