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


def test_posttrain_data_trains_on_the_regular_questions_left_when_the_corpus_has_long_ones(tmp_path):
    """With embedded.long_terms a quarter of the post-training split is long: the held-out regular questions come
    first, the training mix takes what is left (it used to stop with an error), and no question is in two sets."""
    import argparse
    import json

    from rmt.config import EmbeddedConfig
    from rmt.embedded.corpus import write_corpus

    cfg = EmbeddedConfig(long_terms=5, long_fraction=0.25, base_problems=40, midtrain_problems=40, eval_problems=40,
                         posttrain_problems=40)
    write_corpus(cfg, tmp_path / "corpus")
    base = {s: str(tmp_path / "corpus" / f"{s}.jsonl") for s in ("midtrain", "eval", "posttrain")}
    args = argparse.Namespace(out=tmp_path / "out", base=base, qa_train=32, qa_eval=8)
    files = paper_tables.posttrain_data(args)
    rows = {k: [json.loads(line) for line in f.read_text().splitlines()] for k, f in files.items()}
    regular = [r for r in rows["train"] if r["task"] == "regular"]
    assert len(rows["eval_indist"]) == 8 and len(regular) == 30 - 8  # 40 problems, 10 of them long
    assert paper_tables.questions_per_task(files["train"]) == 22  # what results.json reports, not the 32 asked
    assert len(rows["eval_transfer"]) == 8 and all(r["task"] == "transfer" for r in rows["eval_transfer"])
    questions = [[r["question"] for r in rows[k]] for k in ("train", "eval_indist", "eval_transfer")]
    assert sum(map(len, questions)) == len(set().union(*map(set, questions)))
    assert rows["eval_curve"] == rows["eval_indist"] + rows["eval_transfer"]  # the runs' own curves: both sets, in order


def test_a_named_sections_figure_gets_its_own_name(tmp_path):
    """Two sections with post-training curves on one page: each keeps its own figure."""
    path = page(tmp_path)
    main_fig, other_fig = tmp_path / "a" / "posttrain_curves.png", tmp_path / "b" / "posttrain_curves.png"
    for fig, data in ((main_fig, b"main"), (other_fig, b"other")):
        fig.parent.mkdir()
        fig.write_bytes(data)
    paper_tables.write_doc(path, "main\n![curves](posttrain_curves.png)", str(main_fig))
    paper_tables.write_doc(path, "other\n![curves](posttrain_curves.png)", str(other_fig), "ablations")
    text = path.read_text()
    assert "main\n![curves](posttrain_curves.png)" in text and "other\n![curves](posttrain_curves-ablations.png)" in text
    assert (tmp_path / "posttrain_curves.png").read_bytes() == b"main"
    assert (tmp_path / "posttrain_curves-ablations.png").read_bytes() == b"other"


def test_seeds_run_side_by_side_write_the_same_post_training_files_whole(tmp_path, monkeypatch):
    """Each seed's process writes the shared post-training files. One writer is held just before it renames its
    first file into place while another writes them all: with a shared temporary name the held one's rename failed
    (the other had moved the file away) or published a file the other was still writing; each write is now atomic
    under a name of its own, so both finish, the files are whole, and nothing is left behind."""
    import argparse
    import os
    import threading

    from rmt.config import EmbeddedConfig
    from rmt.embedded.corpus import write_corpus

    write_corpus(EmbeddedConfig(base_problems=40, midtrain_problems=40, eval_problems=40, posttrain_problems=40),
                 tmp_path / "corpus")
    base = {s: str(tmp_path / "corpus" / f"{s}.jsonl") for s in ("midtrain", "eval", "posttrain")}
    reference = argparse.Namespace(out=tmp_path / "reference", base=base, qa_train=16, qa_eval=8)
    expected = {Path(p).name: p.read_text() for p in paper_tables.posttrain_data(reference).values()}
    args = argparse.Namespace(**{**vars(reference), "out": tmp_path / "out"})  # the same files, not yet written
    folder = args.out / "posttrain_data"

    real_replace, held, other_done = os.replace, threading.Event(), threading.Event()

    def replace(src, dst):
        if threading.current_thread().name == "held" and not held.is_set():
            held.set()
            assert other_done.wait(60)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    errors = []

    def write():
        try:
            paper_tables.posttrain_data(args)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    first = threading.Thread(target=write, name="held")
    first.start()
    assert held.wait(60)
    write()
    other_done.set()
    first.join()
    assert not errors
    assert {p.name: p.read_text() for p in folder.iterdir()} == expected


@pytest.mark.parametrize("content", [b'{"calls": 2, "wall_s_tot', b"\xff\xfe not text", b"[1, 2]",
                                     b'{"calls": 2, "wall_s_total": "ten minutes"}'])
def test_an_unreadable_results_file_is_a_warning_and_the_count_starts_again(tmp_path, caplog, content):
    path = tmp_path / "results.json"
    path.write_bytes(content)
    assert paper_tables.earlier_calls(path) == {}
    assert "is not readable JSON" in caplog.text
    assert path.read_bytes() == content  # left as it was: the run's own save replaces it atomically


def test_an_earlier_calls_record_is_read_back(tmp_path):
    path = tmp_path / "results.json"
    assert paper_tables.earlier_calls(path) == {}
    path.write_text('{"calls": 2, "wall_s_total": 12.5}')
    assert paper_tables.earlier_calls(path) == {"calls": 2, "wall_s_total": 12.5}


def curve_run(rng, steps, n, p_indist, p_transfer) -> dict:
    """A post-training run's eval.json "curve" on eval_curve (n in-distribution questions, then n transfer ones)."""
    curve = {}
    for k in steps:
        a = [int(x) for x in rng.random(n) < p_indist(k)]
        b = [int(x) for x in rng.random(n) < p_transfer(k)]
        curve[str(k)] = {"accuracy": (sum(a) + sum(b)) / (2 * n), "correct": a + b,
                         "by_task": {"regular": {"n": n, "accuracy": sum(a) / n}, "transfer": {"n": n, "accuracy": sum(b) / n}}}
    return curve


def test_a_runs_own_curve_is_split_by_task_and_an_older_one_is_read_as_the_transfer_curve():
    import numpy as np

    run = curve_run(np.random.default_rng(0), (0, 20), 5, lambda k: 0.5, lambda k: 0.2)
    got = paper_tables.run_curves(run)
    assert got["curve"] == {k: run[str(k)]["by_task"]["transfer"]["accuracy"] for k in (0, 20)}
    assert got["curve_indist"] == {k: run[str(k)]["by_task"]["regular"]["accuracy"] for k in (0, 20)}
    assert got["curve_correct"]["eval_indist"][20] == run["20"]["correct"][:5]
    assert got["curve_correct"]["eval_transfer"][20] == run["20"]["correct"][5:]
    older = {"0": {"accuracy": 0.1}, "60": {"accuracy": 0.3}}  # evaluated on the transfer set alone
    assert paper_tables.run_curves(older) == {"curve": {0: 0.1, 60: 0.3}}


def test_starts_are_compared_at_each_step_between_the_first_and_the_last(tmp_path):
    """Synthetic runs: the RMT start is ahead on the in-distribution set at step 20 and level by step 60, the same on
    the transfer set throughout. Only (rmt vs the others, 3-4 terms, step 20 and 40) may exclude 0; the tables and
    the two-panel figure are written."""
    import argparse

    import numpy as np

    rng = np.random.default_rng(1)
    ahead = {"rmt": lambda k: 0.9, "ntp": lambda k: min(0.9, 0.015 * k), "base": lambda k: min(0.9, 0.015 * k)}
    post = {s: {start: paper_tables.run_curves(curve_run(rng, (0, 20, 40, 60), 200, ahead[start], lambda k: 0.3))
                for start in ("base", "ntp", "rmt")} for s in (0, 1, 2)}
    args = argparse.Namespace(bootstrap=500, out=tmp_path)
    rows = paper_tables.curve_comparisons(args, post)
    assert {r["step"] for r in rows} == {20, 40}
    assert len(rows) == 2 * 3 * 2  # steps x pairs (rmt-ntp, rmt-base, ntp-base) x tasks
    at = {(r["comparison"], r["task"], r["step"]): r for r in rows}
    big = at[("rmt start vs base start", "eval_indist", 20)]
    assert big["diff"] > 0.5 and big["ci"][0] > 0 and big["n"] == 3 * 200
    assert abs(at[("ntp start vs base start", "eval_indist", 20)]["diff"]) < 0.1
    assert all(r["ci"][0] < 0 < r["ci"][1] for r in rows if r["task"] == "eval_transfer")
    table = paper_tables.curve_table(post)
    assert table.splitlines()[0] == "| Start | Task | step 0 | step 20 | step 40 | step 60 |"
    assert len(table.splitlines()) == 2 + 2 * 3
    assert "| Step |" in paper_tables.posttrain_comparison_table(rows).splitlines()[0]
    assert paper_tables.plot_curves(args, post).is_file()
    post[0]["rmt"] = paper_tables.run_curves({"0": {"accuracy": 0.1}, "60": {"accuracy": 0.3}})  # an older run
    assert paper_tables.curve_comparisons(args, post) == [] and paper_tables.plot_curves(args, post).is_file()
