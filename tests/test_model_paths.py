"""A model path typed wrong fails at once with "no such folder" (and a close folder name when there is one), never
after a minute of hub retries."""

import time

import pytest
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
from typer.testing import CliRunner

import rmt.modeling as modeling
from rmt.cli import app
from rmt.errors import ModelError


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    modeling._bare_name_problem.cache_clear()
    yield
    modeling._bare_name_problem.cache_clear()


def _hub_says(monkeypatch, error):
    import huggingface_hub

    def model_info(self, name, timeout=None):
        if error is not None:
            raise error

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def test_a_bare_name_that_is_no_folder_and_no_hub_model_fails(monkeypatch, tmp_path):
    (tmp_path / "my_base").mkdir()
    _hub_says(monkeypatch, OSError("Name or service not known"))
    with pytest.raises(ModelError, match=r"model: no such folder: mybase \(did you mean my_base\?\), and the hub "
                                         r"\(huggingface.co\) cannot be reached"):
        modeling.check_local_path("mybase", "model")
    modeling._bare_name_problem.cache_clear()
    _hub_says(monkeypatch, RepositoryNotFoundError.__new__(RepositoryNotFoundError))
    with pytest.raises(ModelError, match="the hub has no model 'mybase' that you can access"):
        modeling.check_local_path("mybase", "model")


def test_hub_names_that_exist_may_be_gated_or_cached_pass(monkeypatch):
    _hub_says(monkeypatch, None)
    modeling.check_local_path("gpt2", "model")
    modeling._bare_name_problem.cache_clear()
    _hub_says(monkeypatch, GatedRepoError.__new__(GatedRepoError))
    modeling.check_local_path("gated", "model")
    modeling._bare_name_problem.cache_clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE is set and no hub model of that name is cached"):
        modeling.check_local_path("gpt2", "model")
    modeling._bare_name_problem.cache_clear()
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda name, f: "/cache/config.json")
    modeling.check_local_path("gpt2", "model")
    # owner/name ids are left to the hub as before (no request here)
    modeling.check_local_path("Qwen/Qwen2.5-0.5B", "model")


def test_local_paths_name_a_close_folder(tmp_path):
    (tmp_path / "runs" / "base_model").mkdir(parents=True)
    with pytest.raises(ModelError, match=r"no such folder: runs/base_modle \(did you mean runs/base_model\?\)"):
        modeling.check_local_path("runs/base_modle", "model")
    with pytest.raises(ModelError, match=r"no such folder: ./nothing_like_it$"):
        modeling.check_local_path("./nothing_like_it", "model")


@pytest.mark.parametrize("command", ["train", "score"])
def test_train_and_score_check_the_model_path_first(monkeypatch, tmp_path, command):
    (tmp_path / "my_base").mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    result = CliRunner().invoke(app, [command, "model.path=mybase", f"data.prepared_dir={tmp_path / 'none'}"])
    assert result.exit_code == 1, result.output
    assert "model.path: no such folder: mybase (did you mean my_base?)" in result.output
    assert time.perf_counter() - t0 < 30
