"""hf: tiny defaults keep grouped-query attention consistent: num_key_value_heads
divides the tiny head count unless the user set it (issue 19: hf:mistral crashed)."""

import pytest

from memprop.cli import main
from memprop.models import model_config

pytest.importorskip("transformers")


@pytest.mark.parametrize("model_type,kv", [("mistral", 2), ("mixtral", 2), ("llama", 4),
                                           ("gpt2", None)])
def test_key_value_heads_follow_the_tiny_head_count(model_type, kv):
    config = model_config(f"hf:{model_type}").hf_config()
    assert config.num_attention_heads == 4
    assert getattr(config, "num_key_value_heads", None) == kv


def test_the_users_key_value_heads_are_kept():
    config = model_config("hf:mistral", num_key_value_heads=4).hf_config()
    assert config.num_key_value_heads == 4
    config = model_config("hf:mistral", num_attention_heads=8).hf_config()
    assert config.num_key_value_heads == 8       # mistral's own 8 divides 8 heads


def test_profile_runs_on_a_grouped_query_default(capsys):
    assert main(["profile", "--model", "hf:mistral", "--batch", "4"]) == 0
    assert "peak" in capsys.readouterr().out
