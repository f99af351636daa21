"""lpq.models.offload: offloaded tensors are read with plain reads, to the same bits as accelerate's loader."""
from __future__ import annotations

import pytest
import torch

from lpq.models.offload import _offload_hooks, _tensors, materialized, read_offloaded


def _disk_offloaded(tmp_path, dtype: str):
    """tiny-llama saved in `dtype`, reloaded with embeddings, head and blocks 1.. on disk."""
    from lpq.models.hub import ModelConfig, load_model

    lm = load_model(ModelConfig(id="tiny-llama", dtype=dtype))
    folder = tmp_path / "tiny"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    n = lm.model.config.num_hidden_layers
    device_map = {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "disk",
                  **{f"model.layers.{i}": "cpu" if i == 0 else "disk" for i in range(n)}}
    return load_model(ModelConfig(id=str(folder), dtype=dtype, device_map=device_map,
                                  offload_dir=str(tmp_path / "off"))).model


def _assert_reads_match(model) -> int:
    count = 0
    for _, mod, hook in _offload_hooks(model):
        for t in _tensors(mod, hook, set()):
            mine, theirs = read_offloaded(hook.weights_map, t), hook.weights_map[t]
            assert mine.dtype == theirs.dtype and mine.shape == theirs.shape, t
            assert torch.equal(mine.view(torch.uint8), theirs.view(torch.uint8)), t
            count += 1
    return count


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_reads_from_the_checkpoint_shards_equal_accelerates(tmp_path, dtype):
    model = _disk_offloaded(tmp_path, dtype)
    assert _assert_reads_match(model) > 0


def test_reads_from_offload_files_equal_accelerates(tmp_path):
    """After materialized() wrote a block to its own store (.dat files, bf16 as int16)."""
    model = _disk_offloaded(tmp_path, "bfloat16")
    block = model.model.layers[1]
    with materialized(block, tmp_path / "store"):
        with torch.no_grad():
            block.mlp.up_proj.weight.mul_(2)
    hooks = _offload_hooks(block)
    assert hooks and all("store" in str(h.weights_map.dataset.save_folder) for _, _, h in hooks)
    assert _assert_reads_match(block) > 0


def test_scalar_offload_file(tmp_path):
    from accelerate.utils import OffloadedWeightsLoader, offload_state_dict

    offload_state_dict(str(tmp_path), {"s": torch.tensor(1.5, dtype=torch.bfloat16), "v": torch.arange(3.0)})
    loader = OffloadedWeightsLoader(save_folder=str(tmp_path))
    for key in ("s", "v"):
        mine, theirs = read_offloaded(loader, key), loader[key]
        assert mine.shape == theirs.shape and mine.dtype == theirs.dtype and torch.equal(mine, theirs)


def test_other_maps_are_read_as_they_are():
    value = torch.ones(2)
    assert read_offloaded({"w": value}, "w") is value
