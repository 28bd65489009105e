"""Config layering, coercion and errors."""

import pytest

from llmkit.core.config import ModelConfig, OptimConfig, parse_duration, resolve_run_config
from llmkit.core.errors import ConfigError


def test_precedence_defaults_preset_file_set_flags(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model:\n  n_layer: 3\noptim:\n  lr: 5e-4\ntrain:\n  batch_size: 8\n")
    cfg = resolve_run_config(
        preset="tiny",
        config_file=cfg_file,
        sets=["train.batch_size=6"],
        flags={"train": {"batch_size": 5, "steps": None}},
    )
    assert cfg.model.d_model == 128  # preset
    assert cfg.model.n_layer == 3  # file over preset
    assert cfg.train.batch_size == 5  # flag over --set over file
    assert cfg.train.steps == 1500  # None flags do not override
    assert cfg.model.n_kv_head == 2  # preset over dataclass default


def test_yaml_scientific_notation_is_coerced_by_field_type(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 3e-4\ntrain:\n  tokens: 1e5\n  steps: 2_000\n")
    cfg = resolve_run_config(config_file=f)
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 3e-4
    assert cfg.train.tokens == 100_000 and isinstance(cfg.train.tokens, int)
    assert cfg.train.steps == 2000
    assert resolve_run_config(sets=["train.tokens=5M"]).train.tokens == 5_000_000


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError, match=r"unknown config key 'model.n_layers'.*did you mean 'n_layer'"):
        resolve_run_config(sets=["model.n_layers=3"])
    with pytest.raises(ConfigError, match=r"unknown config section 'modle'.*'model'"):
        resolve_run_config(sets=["modle.n_layer=3"])


def test_invalid_yaml_names_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  n_layer: [1, 2\n")
    with pytest.raises(ConfigError, match=r"invalid YAML in .*bad.yaml at line"):
        resolve_run_config(config_file=f)


@pytest.mark.parametrize(
    "item, message",
    [
        ("train.batch_size=0", "train.batch_size: must be positive"),
        ("optim.lr=-1", "optim.lr: must be positive"),
        ("train.steps=-5", "train.steps: must not be negative"),
        ("model.n_layer=abc", "model.n_layer: expected an integer"),
        ("train.time=soon", "train.time: cannot read 'soon'"),
    ],
)
def test_invalid_values_name_the_key(item, message):
    with pytest.raises(ConfigError, match=message):
        resolve_run_config(sets=[item])


def test_derived_values_are_properties():
    cfg = ModelConfig(d_model=96, n_head=4, n_kv_head=0)
    # 8/3 * 96 = 256, already a multiple of 64; 8/3 * 104 = 277 rounds up to 320.
    assert (cfg.head_dim, cfg.kv_heads, cfg.ff_dim) == (24, 4, 256)
    assert ModelConfig(d_model=104, n_head=4).ff_dim == 320
    assert ModelConfig(d_model=96, n_head=4, n_kv_head=2, d_ff=100).ff_dim == 100  # given, not derived
    assert ModelConfig(d_model=96, n_head=4, n_kv_head=2).kv_heads == 2
    # Derived values are never stored: the saved config holds only what was chosen.
    names = set(ModelConfig.__dataclass_fields__)
    assert not names & {"head_dim", "kv_heads", "ff_dim"}


def test_user_choices_win_over_derived_defaults():
    lora_lr = {"optim": {"lr": 1e-3}}

    def defaults(cfg):
        return lora_lr if cfg.lora.enabled else {}

    assert resolve_run_config(sets=["lora.enabled=true"], defaults=defaults).optim.lr == 1e-3
    assert resolve_run_config(defaults=defaults).optim.lr == OptimConfig().lr
    given = resolve_run_config(sets=["lora.enabled=true", "optim.lr=5e-5"], defaults=defaults)
    assert given.optim.lr == 5e-5
    base = {"optim": {"lr": 3e-4}}  # a layer below the user's (fine-tuning's defaults)
    assert resolve_run_config(base=base, flags={"lora": {"enabled": True}}, defaults=defaults).optim.lr == 1e-3


def test_durations():
    assert parse_duration("90s") == 90
    assert parse_duration("10m") == 600
    assert parse_duration("1h30m") == 5400
    assert parse_duration("45") == 45
    with pytest.raises(ConfigError):
        parse_duration("0s")
