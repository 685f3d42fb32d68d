"""Config loading: composition, overrides, and one-line errors that name the key."""
from __future__ import annotations

import pytest

from elas_megatron.config import ConfigError, load_config
from elas_megatron.config.loader import dump_config, load_yaml_tree, config_from_dict, config_to_dict


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_compose_in_order_and_file_overrides_them(tmp_path):
    write(tmp_path, "base.yaml", "model: {hidden_size: 256, num_heads: 4}\ntrain: {steps: 10}\n")
    write(tmp_path, "variant.yaml", "model: {variant: cola, rank: 32}\n")
    top = write(tmp_path, "run.yaml", "defaults: [base.yaml, variant.yaml]\ntrain: {steps: 20}\n")
    cfg = load_config(top, ["optim.lr=3e-3", "model.rank=16"])
    assert (cfg.model.hidden_size, cfg.model.num_heads, cfg.model.variant) == (256, 4, "cola")
    assert cfg.model.rank == 16 and cfg.train.steps == 20 and cfg.optim.lr == pytest.approx(3e-3)


def test_round_trip_through_dict_and_yaml(tmp_path):
    cfg = load_config(None, ["model.variant=dense", "data.train_prefixes=[a, b]", "data.train_weights=[1, 3]"])
    assert config_from_dict(config_to_dict(cfg)) == cfg
    dump_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("override, fragment", [
    ("model.varient=elas", "unknown key model.varient"),
    ("modle.variant=elas", "unknown key modle"),
    ("model.variant=sparse", "model.variant='sparse' is invalid: choose one of 'dense', 'cola', 'elas'"),
    ("train.steps=ten", "train.steps='ten' is invalid: expected an integer"),
    ("train.steps=0", "train.steps=0 is invalid"),
    ("optim.lr=-1", "optim.lr=-1.0 is invalid"),
    ("model.sparse24=maybe", "model.sparse24='maybe' is invalid: expected true or false"),
    ("model.ffn_hidden_size=5461", "model.ffn_hidden_size=5461 is invalid for elas"),
    ("train.global_batch=10", "train.global_batch=10 is invalid: expected a multiple of train.micro_batch=8"),
    ("model.num_heads=7", "model.hidden_size=512 is invalid: expected a multiple of model.num_heads=7"),
    ("steps=3", "write section.key=value"),
    ("train.steps", "override 'train.steps' is malformed"),
])
def test_bad_values_give_one_line_errors_naming_the_key(override, fragment):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    message = str(exc.value)
    assert fragment in message and "\n" not in message


def test_elas_dff_rounding_message_proposes_valid_values():
    with pytest.raises(ConfigError, match="use 5460 or 5464"):
        load_config(None, ["model.ffn_hidden_size=5461"])
    with pytest.raises(ConfigError, match="use 5456 or 5464"):
        load_config(None, ["model.ffn_hidden_size=5461", "parallel.tp=2", "model.num_heads=8"])
    load_config(None, ["model.ffn_hidden_size=5461", "model.variant=cola"])  # only elas needs groups of 4


def test_layout_checked_against_world_size():
    with pytest.raises(ConfigError, match="world size 3 is not divisible by parallel.tp \\* parallel.pp = 2"):
        load_config(None, ["parallel.tp=2"], world_size=3)
    with pytest.raises(ConfigError, match="not divisible by train.micro_batch \\* data-parallel size = 8 \\* 3"):
        load_config(None, ["train.global_batch=16"], world_size=3)
    with pytest.raises(ConfigError, match="parallel.zero_stage=2 is invalid"):
        load_config(None, ["parallel.optimizer=deepspeed", "parallel.zero_stage=2", "parallel.pp=2"])
    with pytest.raises(ConfigError, match="model.num_layers=8 is invalid: expected divisible by parallel.pp"):
        load_config(None, ["parallel.pp=3"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "bad.yaml", "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write(tmp_path, "list.yaml", "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="includes itself"):
        load_yaml_tree(write(tmp_path, "loop.yaml", "defaults: [loop.yaml]\n"))
