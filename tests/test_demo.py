import json

import pytest

from rmt.config import ConfigError
from rmt.demo import demo_config, run_demo


def test_demo_configs_differ_only_by_method(tmp_path):
    a, b = demo_config("rmt", "default", tmp_path, []), demo_config("rpt", "default", tmp_path, [])
    assert a.train.total_steps == b.train.total_steps and a.train.sequences_per_step == b.train.sequences_per_step
    assert a.data.prepared_dir == b.data.prepared_dir, "every method trains on the same scored corpus"
    assert a.output.dir != b.output.dir
    assert b.budget.enabled is False and b.reward.match == "prefix"
    with pytest.raises(ConfigError, match="unknown demo size"):
        demo_config("rmt", "huge", tmp_path, [])


@pytest.mark.slow
def test_demo_runs_end_to_end_at_tiny_size(tmp_path, monkeypatch):
    monkeypatch.setenv("RMT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    evaluation = run_demo(size="tiny", out=out)
    assert {"base/ntp", "ntr", "rmt/reasoning", "ntp/ntp", "rpt/reasoning"} <= set(evaluation["results"])
    assert json.loads((out / "eval.json").read_text())["baseline"] == "base/ntp"
    report = (out / "report" / "report.md").read_text()
    assert "Next-token accuracy by tier" in report and (out / "report" / "budget.png").is_file()
    for m in ("rmt", "ntp", "rpt"):
        assert (out / m / "final" / "model.safetensors").is_file()
    # A second run reuses everything: no stage trains again.
    mtime = (out / "rmt" / "final" / "model.safetensors").stat().st_mtime_ns
    run_demo(size="tiny", out=out)
    assert (out / "rmt" / "final" / "model.safetensors").stat().st_mtime_ns == mtime
