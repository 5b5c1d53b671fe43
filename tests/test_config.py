"""config.json as SO8T reads it: a misspelt so8t_* key is refused, naming the file and the key."""

import json

import pytest
from click.testing import CliRunner

from so8t_export.cli import main
from so8t_export.config import ConfigError, SO8TConfig
from so8t_export.model import SO8TTransformerForCausalLM


@pytest.fixture()
def misspelt_dir(qwen3_dir, tmp_path):
    """The tiny Qwen3 whose config.json tries to turn cross-head mixing off with a typo."""
    folder = tmp_path / "misspelt"
    folder.mkdir()
    for file in qwen3_dir.iterdir():
        (folder / file.name).symlink_to(file)
    config = json.loads((qwen3_dir / "config.json").read_text())
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps({**config, "so8t_cross_head_interation": False}))
    return folder


def test_a_misspelt_flag_is_refused_by_loading(misspelt_dir):
    with pytest.raises(ConfigError) as error:
        SO8TTransformerForCausalLM.from_pretrained(misspelt_dir)
    message = str(error.value)
    assert message.startswith(f"{misspelt_dir / 'config.json'}: unknown key so8t_cross_head_interation; "
                              "did you mean so8t_cross_head_interaction?")


def test_a_misspelt_flag_is_refused_by_the_export_command(misspelt_dir, tmp_path):
    result = CliRunner().invoke(main, ["gguf", str(misspelt_dir), "-o", str(tmp_path / "out.gguf"),
                                       "--quant", "f32"])
    assert result.exit_code != 0
    assert "unknown key so8t_cross_head_interation; did you mean so8t_cross_head_interaction?" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out.gguf").exists()


def test_a_misspelt_override_is_refused_too(qwen3_dir):
    with pytest.raises(ConfigError, match="unknown key so8t_rotation_sed; did you mean so8t_rotation_seed?"):
        SO8TTransformerForCausalLM.from_pretrained(qwen3_dir, so8t_rotation_sed=3)


def test_every_so8t_key_the_config_writes_reads_back():
    config = SO8TConfig(so8t_cross_head_interaction=False, so8t_rotation_seed=5)
    assert SO8TConfig.from_dict(config.to_dict()) == config
