import json

from typer.testing import CliRunner

from rmt.cli import app

runner = CliRunner()


def test_config_validates_and_names_the_field():
    result = runner.invoke(app, ["config", "-c", "rmt", "budget.gamma=1.5"])
    assert result.exit_code == 2
    assert "budget.gamma" in result.output
    ok = runner.invoke(app, ["config", "-c", "rpt", "budget.b0=64"])
    assert ok.exit_code == 0 and "b0: 64" in ok.output and "match: prefix" in ok.output


def test_config_fields_lists_every_field_with_its_doc():
    result = runner.invoke(app, ["config", "--fields"])
    assert result.exit_code == 0
    assert "budget.gamma = 0.2" in result.output and "paper" in result.output


def test_prepare_and_score_from_the_command_line(tmp_path, tiny_model_dir):
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": f"doc {i}: the cat sat on the mat {i}."}) + "\n" for i in range(30)))
    common = [f"model.path={tiny_model_dir}", f"data.path={src}", f"data.prepared_dir={tmp_path / 'prep'}", "data.seq_len=16"]
    assert runner.invoke(app, ["prepare", *common]).exit_code == 0
    result = runner.invoke(app, ["score", *common])
    assert result.exit_code == 0, result.output
    assert "tier boundaries" in result.output and (tmp_path / "prep" / "scores" / "summary.json").is_file()


def test_bad_input_is_one_clear_line_not_a_traceback(tmp_path, tiny_model_dir):
    result = runner.invoke(app, ["prepare", f"model.path={tiny_model_dir}", f"data.path={tmp_path / 'nope.jsonl'}"])
    assert result.exit_code == 1
    assert "corpus not found" in result.output and "Traceback" not in result.output
