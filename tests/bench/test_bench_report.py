"""docs/benchmarks.md's measured figures are generated from the bench.json kept beside it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.report import END, START, ReportError, markdown, render

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "benchmarks.md"
KEPT = REPO / "docs" / "bench.json"


def test_the_page_holds_exactly_the_figures_of_the_kept_bench_json() -> None:
    """Regenerating the section from docs/bench.json changes nothing: no figure typed."""
    text = DOC.read_text(encoding="utf-8")
    section = START + text.split(START, 1)[1].split(END, 1)[0] + END
    bench = json.loads(KEPT.read_text(encoding="utf-8"))
    assert section == markdown(bench, "bench.json")
    assert bench["machine"]["date"] in section  # dated


def test_render_replaces_only_the_section_and_refuses_a_page_without_one(tmp_path: Path) -> None:
    bench = {"parts": ["bytes"], "targets": {}, "wall_s": 60.0,
             "machine": {"date": "2026-12-06 10:00 UTC", "cpus": 2, "load_average": [1.0]},
             "bytes_per_round": {"site_bytes": 1800, "model_bytes": 64, "ratio": 28.1,
                                 "limit_bytes": 4166.0}}
    source = tmp_path / "bench.json"
    source.write_text(json.dumps(bench), encoding="utf-8")
    doc = tmp_path / "page.md"
    doc.write_text(f"# Title\n\n{START}\nold\n{END}\n\nAfter.\n", encoding="utf-8")
    render(source, doc)
    text = doc.read_text(encoding="utf-8")
    assert text.startswith("# Title\n\n") and text.endswith("\n\nAfter.\n")
    assert "old" not in text and "| bytes per site per round | 1800 B" in text
    assert "2026-12-06 10:00 UTC" in text
    doc.write_text("# no section\n", encoding="utf-8")
    with pytest.raises(ReportError, match="no measured section"):
        render(source, doc)


def test_the_secagg_section_holds_exactly_the_figures_of_its_kept_file() -> None:
    """A part measured on its own day has its own section and kept file."""
    from bench.report import markers

    start, end = markers("bench-secagg.json")
    assert start != START and end != END
    text = DOC.read_text(encoding="utf-8")
    section = start + text.split(start, 1)[1].split(end, 1)[0] + end
    bench = json.loads((REPO / "docs" / "bench-secagg.json").read_text(encoding="utf-8"))
    assert section == markdown(bench, "bench-secagg.json")
    assert "secure sum, 1000 sites" in section
