import pytest
import yaml

from rmt.config import PRESET_DIR, ConfigError, RMTConfig, describe_fields, load_config, parse_override


def test_defaults_are_the_paper_values():
    cfg = RMTConfig()
    assert (cfg.budget.b0, cfg.budget.b_min, cfg.budget.gamma) == (800, 1, 0.2)
    assert (cfg.curriculum.t1, cfg.curriculum.t2) == (0.3, 0.7)
    assert cfg.rollout.group_size == 8 and cfg.ntp.weight == 0.1 and cfg.train.lr == 1e-6
    assert cfg.scoring.thresholds == (0.5, 1.0, 1.5)
    assert cfg.grpo.clip_eps == 0.2 and cfg.grpo.kl_beta == 0.0 and cfg.grpo.loss_agg == "token-mean"


def test_overrides_are_parsed_as_yaml():
    cfg = load_config("rmt", ["budget.gamma=0.3", "curriculum.p_early=[0.5, 0.25, 0.25]", "model.path=null"])
    assert cfg.budget.gamma == 0.3
    assert cfg.curriculum.p_early == (0.5, 0.25, 0.25)
    assert cfg.model.path is None
    assert parse_override("a.b=1e-3") == (["a", "b"], 1e-3)


def test_budget_numbers_or_auto():
    assert load_config("rmt", ["budget.b_min=auto"]).budget.b_min == "auto"
    both = load_config("rmt", ["budget.b0=auto", "budget.b_min=auto"]).budget
    assert (both.b0, both.b_min) == ("auto", "auto")
    assert load_config("rmt", ["budget.b0=auto", "budget.b_min=50"]).budget.b_min == 50  # a measured B_0 is raised to the floor (schedules.auto_b0)


@pytest.mark.parametrize(
    "override, field",
    [
        ("budget.gamma=1.0", "budget.gamma"),
        ("budget.gamma=0", "budget.gamma"),
        ("budget.b_min=0", "budget.b_min"),
        ("budget.b_min=900", "budget.b_min"),
        ("budget.b_min=half", "budget.b_min"),
        ("budget.b_min=-2", "budget.b_min"),
        ("curriculum.t1=0.8", "curriculum.t1"),
        ("curriculum.p_late=[0.5, 0.6, -0.1]", "curriculum.p_late"),
        ("curriculum.p_early=[0.5, 0.5, 0.5]", "curriculum.p_early"),
        ("rollout.group_size=1", "rollout.group_size"),
        ("ntp.weight=-0.1", "ntp.weight"),
        ("embedded.recheck=1.5", "embedded.recheck"),
        ("embedded.recheck_passes=0", "embedded.recheck_passes"),
        ("budget.gamam=0.3", "budget.gamam"),
        ("trian.lr=1", "trian"),
    ],
)
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config("rmt", [override])
    assert field in str(err.value)


def test_bad_override_syntax_and_unknown_preset():
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(None, ["budget.gamma"])
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("no-such-preset")


def test_a_folder_named_like_a_preset_does_not_shadow_it(tmp_path, monkeypatch):
    # `rmt demo` writes run folders named after the methods; running it again from there must still find the presets.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rpt").mkdir()
    assert load_config("rpt").reward.match == "prefix"
    (tmp_path / "mine").write_text("budget: {gamma: 0.5}\n")
    assert load_config("mine").budget.gamma == 0.5  # a file of that name is still a config file


@pytest.mark.parametrize("path", sorted(PRESET_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_preset_loads_and_differs_from_rmt_only_where_the_method_does(path):
    cfg = load_config(str(path))
    assert cfg.preset == path.stem
    raw = yaml.safe_load(path.read_text())
    assert set(raw) - {"base", "preset"} <= set(RMTConfig.model_fields)


def test_presets_encode_the_baselines():
    assert load_config("ntp").train.rl is False
    rpt = load_config("rpt")
    assert rpt.budget.enabled is False and rpt.reward.match == "prefix" and rpt.ntp.weight == 0
    assert load_config("rmt-no-ntp").ntp.weight == 0
    assert load_config("rmt-no-cas").curriculum.mode == "uniform"
    nodtb = load_config("rmt-no-dtb")
    assert nodtb.budget.dynamic is False and nodtb.reward.length_weight == 0


def test_yaml_file_with_base_and_override(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("base: rpt\nbudget: {b0: 64}\n")
    cfg = load_config(str(f), ["budget.b_min=2"])
    assert cfg.reward.match == "prefix" and cfg.budget.b0 == 64 and cfg.budget.b_min == 2


@pytest.mark.parametrize("base", ["5", "[rmt]", "{name: rmt}"])
def test_a_base_that_is_not_a_string_is_an_error_naming_the_file(tmp_path, base):
    f = tmp_path / "mine.yaml"
    f.write_text(f"base: {base}\nbudget: {{b0: 64}}\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml: `base` must be a preset name or a path"):
        load_config(str(f))


def test_every_field_is_documented():
    rows = describe_fields()
    assert len(rows) > 60
    assert all(desc for _, _, desc in rows), [name for name, _, desc in rows if not desc]


def test_docs_config_reference_is_up_to_date():
    from pathlib import Path

    from rmt.config import fields_markdown

    doc = Path(__file__).parents[1] / "docs" / "config.md"
    assert doc.read_text() == fields_markdown(), "regenerate with: rmt config --markdown > docs/config.md"


def test_a_budget_statement_without_a_slot_is_an_error_naming_both_fields():
    with pytest.raises(ConfigError) as err:
        load_config("rmt", ["prompt.raw_budget_text=think {budget} tokens"])
    assert "prompt.raw_budget_text" in str(err.value) and "prompt.raw_template" in str(err.value)
    with pytest.raises(ConfigError, match="prompt.raw_template has no"):  # {{budget_text}} is literal text, not a slot
        load_config("rmt", ["prompt.raw_budget_text=think {budget} tokens", 'prompt.raw_template="{prefix}{{budget_text}}<think>"'])
    cfg = load_config("rmt", ["prompt.raw_budget_text=think {budget} tokens", 'prompt.raw_template="{prefix} ({budget_text})<think>"'])
    assert cfg.prompt.raw_budget_text == "think {budget} tokens"
    # chat: the paper's sentence is on by default, so a user message without the slot must say where it goes
    with pytest.raises(ConfigError, match="prompt.chat_budget_text is set but prompt.chat_user"):
        load_config("rmt", ['prompt.chat_user="Next token of: {prefix}"'])
    assert load_config("rmt", ['prompt.chat_user="Next token of: {prefix}"', 'prompt.chat_budget_text=""']).prompt.chat_budget_text == ""


def test_the_default_raw_prompt_does_not_state_the_budget(tiny_model_dir):
    """How a base model learns its budget: not from the prompt (the default), only through the cap and the length
    reward; with a slot and a statement, the prompt says it."""
    from transformers import AutoTokenizer

    from rmt.prompts import build_prompt_ids

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    prefix = tok.encode("The cat sat", add_special_tokens=False)
    default = load_config("rmt").prompt
    assert build_prompt_ids(prefix, tok, default, 17) == build_prompt_ids(prefix, tok, default, None)
    stated = load_config("rmt", ["prompt.raw_budget_text=think {budget} tokens", 'prompt.raw_template="{prefix} ({budget_text})<think>"']).prompt
    assert tok.decode(build_prompt_ids(prefix, tok, stated, 17)) == "The cat sat (think 17 tokens)<think>"


def test_min_prefix_is_folded_into_scoring_min_context():
    assert RMTConfig().scoring.min_context == 8
    with pytest.raises(ConfigError, match="curriculum.min_prefix"):
        load_config("rmt", ["curriculum.min_prefix=4"])
    with pytest.raises(ConfigError, match="scoring.min_context"):
        load_config("rmt", ["scoring.min_context=0"])


def test_vllm_engine_without_vllm_says_how_to_install_it():
    from rmt.rollout.vllm import vllm_available

    if vllm_available():
        pytest.skip("vLLM is installed here")
    with pytest.raises(ConfigError, match="install-vllm-cpu.sh"):
        load_config("rmt", ["rollout.engine=vllm"])
    assert load_config("rmt", ["rollout.vllm.kv_cache_gb=2"]).rollout.vllm.kv_cache_gb == 2  # options alone are fine
