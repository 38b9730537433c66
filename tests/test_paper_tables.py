"""benchmarks/paper_tables.py's page writer: each run replaces only its own generated section of docs/results.md."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("paper_tables", Path(__file__).parents[1] / "benchmarks" / "paper_tables.py")
paper_tables = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(paper_tables)


def page(tmp_path: Path) -> Path:
    path = tmp_path / "results.md"
    path.write_text("intro\n<!-- paper_tables:begin -->\nold main\n<!-- paper_tables:end -->\nreading\n"
                    "<!-- paper_tables:ablations:begin -->\nold ablations\n<!-- paper_tables:ablations:end -->\nend\n")
    return path


def test_a_named_section_is_replaced_and_the_rest_of_the_page_kept(tmp_path):
    path = page(tmp_path)
    paper_tables.write_doc(path, "new ablations", None, "ablations")
    assert path.read_text() == ("intro\n<!-- paper_tables:begin -->\nold main\n<!-- paper_tables:end -->\nreading\n"
                                "<!-- paper_tables:ablations:begin -->\nnew ablations\n<!-- paper_tables:ablations:end -->\nend\n")


def test_the_unnamed_section_is_the_default(tmp_path):
    path = page(tmp_path)
    paper_tables.write_doc(path, "new main", None)
    text = path.read_text()
    assert "<!-- paper_tables:begin -->\nnew main\n<!-- paper_tables:end -->" in text and "old ablations" in text


def test_a_page_without_the_section_is_refused_unchanged(tmp_path):
    path = page(tmp_path)
    before = path.read_text()
    with pytest.raises(SystemExit, match="paper_tables:rlp:begin"):
        paper_tables.write_doc(path, "x", None, "rlp")
    assert path.read_text() == before


def test_window_mean_reads_the_first_and_the_last_fifth():
    rows = [{"x": float(i)} for i in range(10)] + [{"y": 1.0}]  # 11 steps: a fifth is 2 steps; the last lacks x
    assert paper_tables.window_mean(rows, "x", "first") == 0.5
    assert paper_tables.window_mean(rows, "x", "last") == 9.0  # steps 10 and 11, only step 10 has x
    assert paper_tables.window_mean(rows, "z", "first") is None
