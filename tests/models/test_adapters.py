import pytest
import torch

from lpq.models.adapters import ADAPTERS, get_adapter
from lpq.models.tiny import tiny_causal_lm, tiny_wan_pipeline, tiny_wan_transformer


@pytest.mark.parametrize("name,family", [("tiny-llama", "llama"), ("tiny-qwen3", "qwen3"),
                                         ("tiny-qwen3-moe", "qwen3_moe")])
def test_detects_llm_families(name, family):
    model = tiny_causal_lm(name)
    adapter = get_adapter(model)
    assert adapter.family == family
    blocks = adapter.blocks(model)
    assert blocks == list(model.model.layers) and len(blocks) == 2
    members = adapter.block_members(blocks[0])
    assert "self_attn.q_proj" in members["linear"] and members["attention"] == ["self_attn"]
    assert members["experts"] == (["mlp.experts"] if family == "qwen3_moe" else [])
    if family == "qwen3_moe":
        assert "mlp.down_proj" not in members["linear"]


def test_pangu_is_chosen_by_model_type_or_by_name():
    assert get_adapter(None, "pangu").family == "pangu"
    stand_in = tiny_causal_lm("tiny-pangu")
    stand_in.config.model_type = "PanguEmbedded"     # what the remote-code checkpoints report
    adapter = get_adapter(stand_in)
    assert adapter.family == "pangu"
    assert all(adapter.block_members(b)["linear"] == list(adapter.linears) for b in adapter.blocks(stand_in))


def test_wan_transformer_and_pipeline():
    tr = tiny_wan_transformer()
    adapter = get_adapter(tr)
    assert adapter.family == "wan" and adapter.networks(tr) == [("", tr)]
    assert len(adapter.blocks(tr)) == 2
    members = adapter.block_members(adapter.blocks(tr)[0])
    assert members["attention"] == ["attn1", "attn2"] and "attn2.add_k_proj" not in members["linear"]
    pipe = tiny_wan_pipeline(two_experts=True)
    adapter = get_adapter(pipe)
    assert [n for n, _ in adapter.networks(pipe)] == ["transformer", "transformer_2"]
    with pytest.raises(TypeError, match="call blocks\\(\\) on each"):
        adapter.blocks(pipe)
    assert [n for n, _ in get_adapter(tiny_wan_pipeline(two_experts=False)).networks(tiny_wan_pipeline(False))] \
        == ["transformer"]


def test_unknown_architecture_names_the_supported_ones():
    with pytest.raises(ValueError, match=r"no lpq adapter for Sequential\. Supported families: llama, qwen3, "
                                         r"qwen3_moe, pangu, wan\. To add one.*lpq/models/adapters.py"):
        get_adapter(torch.nn.Sequential())
    with pytest.raises(ValueError, match="family 'gpt2'"):
        get_adapter(torch.nn.Sequential(), "gpt2")
    assert set(ADAPTERS) == {"llama", "qwen3", "qwen3_moe", "pangu", "wan"}
