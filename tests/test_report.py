"""`rmt report` shows only what a method has (no thinking budget for rpt or ntp) and keeps legends off the data."""

import json

import pytest

from rmt import report
from rmt.config import config_to_yaml, load_config


def _run(root, preset, rl_keys: bool):
    """A run folder as an older trainer wrote it: every run logged a budget and a tier mix, RL or not."""
    d = root / preset
    d.mkdir()
    (d / "config.yaml").write_text(config_to_yaml(load_config(preset, [])))
    rows = []
    for step in (1, 2, 3):
        row = {"preflight_wellformed_frac": 0.75} if rl_keys and step == 1 else {}
        row |= {"step": step, "loss": 1.0 / step, "ntp_loss": 0.5, "budget": 800 - step, "p_easy": 0.6, "p_medium": 0.3, "p_hard": 0.1}
        if rl_keys:
            row.update(reward=0.1 * step, rollout_accuracy=0.2, think_len_mean=5.0 + step, think_len_p90=9.0,
                       frac_easy=0.5, frac_medium=0.25, frac_hard=0.25)
        rows.append(row)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


@pytest.fixture
def runs(tmp_path):
    return [_run(tmp_path, "rmt", True), _run(tmp_path, "rpt", True), _run(tmp_path, "ntp", False)]


def _legend_clear_of_axes(fig, legend):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = legend.get_window_extent(renderer)
    return all(not box.overlaps(ax.get_window_extent(renderer)) for ax in fig.axes)


def _labels(fig):
    return [t.get_text() for leg in [*fig.legends, *(ax.get_legend() for ax in fig.axes)] if leg for t in leg.get_texts()]


def test_no_budget_for_rpt_and_ntp(runs, tmp_path):
    read = report.read_runs(runs)
    assert all("budget" in r for r in read["rmt"]) and not any("budget" in r for r in read["rpt"] + read["ntp"])
    assert not any("p_easy" in r for r in read["ntp"]) and all("p_easy" in r for r in read["rpt"])
    fig = report.line_figure("budget", read, report.PLOTS[0][2], "tokens")
    labels = _labels(fig)
    assert "rmt: budget B_t" in labels and not any(lb.startswith(("rpt: budget", "ntp:")) for lb in labels), labels
    path = report.write_report(runs, tmp_path / "out")
    table = [ln for ln in path.read_text().splitlines() if ln.startswith("| rpt |") or ln.startswith("| ntp |")]
    assert len(table) == 2 and all(ln.split("|")[-3].strip() == "–" for ln in table), table  # the budget column


def test_curriculum_has_a_panel_per_rl_run_and_one_short_legend(runs):
    fig = report.curriculum_figure(report.read_runs(runs))
    assert [ax.get_title() for ax in fig.axes] == ["rmt", "rpt"]
    assert len(fig.legends) == 1 and len(_labels(fig)) == 6
    assert _legend_clear_of_axes(fig, fig.legends[0])


def test_legends_do_not_cover_the_data(runs):
    read = report.read_runs(runs)
    for _, title, keys, ylabel in report.PLOTS:
        fig = report.line_figure(title, read, keys, ylabel)
        assert _legend_clear_of_axes(fig, fig.axes[0].get_legend()), title
    tier = lambda a: {"accuracy": a, "ci95": [a - 0.05, a + 0.05], "n": 100}  # noqa: E731
    evaluation = {"results": {name: {"tiers": {"easy": tier(0.9), "medium": tier(0.6), "hard": tier(0.2)}, "average": 0.57}
                              for name in ("base/ntp", "ntr", "rmt/ntp", "rmt/reasoning", "rpt/ntp", "rpt/reasoning")}}
    fig = report.accuracy_figure(evaluation)
    assert _legend_clear_of_axes(fig, fig.axes[0].get_legend())


def test_the_final_table_shows_the_pre_flight_rate(runs, tmp_path):
    text = report.write_report(runs, tmp_path / "out").read_text()
    assert "| pre-flight well-formed |" in text
    rows = {ln.split("|")[1].strip(): ln.split("|")[-2].strip() for ln in text.splitlines() if ln.startswith("| r") or ln.startswith("| n")}
    assert rows["rmt"] == "75%" and rows["ntp"] == "–"


def _evaluation(tmp_path, **change):
    """An evaluation JSON of `rmt eval` with the hard tier's stats or the average of its one row changed."""
    hard = {"n": 4, "correct": 2, "accuracy": 0.5, "ci95": [0.15, 0.85]}
    row = {"tiers": {"easy": {"n": 0, "accuracy": None, "ci95": None}, "medium": {"n": 0, "accuracy": None, "ci95": None},
                     "hard": hard}, "average": 0.5}
    row["average"] = change.pop("average", row["average"])
    hard.update(change)
    path = tmp_path / "e.json"
    path.write_text(json.dumps({"results": {"m": row}, "table_markdown": "| m |"}))
    return path


@pytest.mark.parametrize(
    ("change", "field"),
    [({"accuracy": "0.5"}, "results.m.tiers.hard.accuracy"), ({"average": "n/a"}, "results.m.average"),
     ({"ci95": [0.1]}, "results.m.tiers.hard.ci95"), ({"ci95": ["0.1", 0.9]}, "results.m.tiers.hard.ci95")],
    ids=["accuracy_text", "average_text", "ci95_one_value", "ci95_text"],
)
def test_an_evaluation_with_values_of_the_wrong_type_is_an_error_and_writes_nothing(runs, tmp_path, change, field):
    from rmt.errors import RMTError

    with pytest.raises(RMTError, match=rf"e\.json: `{field}` is "):
        report.write_report(runs, tmp_path / "out", evaluation=_evaluation(tmp_path, **change))
    assert not (tmp_path / "out").exists()
    assert report.write_report(runs, tmp_path / "out", evaluation=_evaluation(tmp_path)).is_file()  # the valid one


def test_a_failed_write_keeps_the_earlier_report(runs, tmp_path, monkeypatch):
    import errno
    import io
    import os

    path = report.write_report(runs, tmp_path / "out")
    before = path.read_text()
    real_open = io.open

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write(2) does: no file named

    def full_text_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        return Full(f) if "w" in mode and "b" not in mode else f

    monkeypatch.setattr(io, "open", full_text_open)
    with pytest.raises(OSError, match="No space left") as e:
        report.write_report(runs, tmp_path / "out")
    monkeypatch.undo()
    assert e.value.filename == str(path)
    assert path.read_text() == before
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(".")) == []  # no temporary file left


def test_a_report_md_of_the_users_is_never_written_over(runs, tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "report.md").write_text("# my own report\n")
    from rmt.errors import RMTError

    with pytest.raises(RMTError, match="report .*report.md exists and is not a file rmt wrote"):
        report.write_report(runs, out)
    assert (out / "report.md").read_text() == "# my own report\n" and sorted(p.name for p in out.iterdir()) == ["report.md"]
    (out / "report.md").unlink()
    first = report.write_report(runs, out).read_text()
    assert report.write_report(runs, out).read_text() == first  # its own report is replaced by a rerun
