import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lpq.config import from_dict
from lpq.train.compare import run_training
from lpq.train.latents import LatentCache, locate, read_caption_records
from lpq.train.recipe import FlowMatchConfig, TrainRecipe, VideoPrepConfig
from lpq.train.video_io import clip_to_vae_input, read_frames
from lpq.train.wan_objective import shift_sigma, sigma_range, unshift_sigma
from tests.train.helpers import write_clips

VIDEO = {"num_frames": 5, "height": 32, "width": 32, "max_sequence_length": 16}


@pytest.fixture(scope="module")
def wan_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    captions = write_clips(root / "videos")
    recipe_path = root / "recipe.yaml"
    recipe_path.write_text(json.dumps({
        "model": {"id": "tiny-wan21"},
        "data": {"kind": "wan_latents", "cache_dir": str(root / "cache"), "eval_blocks": 2,
                 "video": {"captions": str(captions), "video_root": str(root / "videos"), **VIDEO}},
    }))
    from lpq.cli import app

    result = CliRunner().invoke(app, ["prepare-data", "--config", str(recipe_path)])
    assert result.exit_code == 0, result.output
    assert "6 samples" in result.output and "1 clips not found" in result.output
    return root


def test_prepare_data_cache(wan_data):
    cache = LatentCache(wan_data / "cache")
    assert len(cache) == 6
    x0, emb = cache.batch([0, 3])
    assert x0.shape == (2, 16, 2, 4, 4)          # z_dim 16; (5 - 1) / 4 + 1 frames; 32 / 8 pixels
    assert emb.shape == (2, 16, 32)
    assert torch.isfinite(x0).all() and x0.std() > 0
    assert not torch.equal(x0[0], x0[1])
    assert cache.manifest["samples"][1]["caption"] == "w1 w2 w3"


def test_video_reading_and_shaping(wan_data):
    clip = read_frames(wan_data / "videos" / "part_1" / "clip1.gif")
    assert clip.shape == (7, 24, 40, 3) and clip.dtype == torch.uint8
    x = clip_to_vae_input(clip, 5, 32, 32)
    assert x.shape == (1, 3, 5, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert locate("/elsewhere/part_1/clip0.npy", wan_data / "videos") == wan_data / "videos" / "part_1" / "clip0.npy"
    assert locate("/elsewhere/part_1/none.npy", wan_data / "videos") is None


def test_caption_records_need_path_and_caption(tmp_path):
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"path": "a.npy", "cap": "x"}\n{"path": "b.npy"}\n')
    with pytest.raises(ValueError, match=r"c.jsonl:2: .*cap/caption"):
        read_caption_records(VideoPrepConfig(captions=bad, **VIDEO))
    bad.write_text('{"path": "a.npy", "cap": "x"}\n\n{oops\n')
    with pytest.raises(ValueError, match=r"c.jsonl:3: not valid JSON"):
        read_caption_records(VideoPrepConfig(captions=bad, **VIDEO))


def test_flow_matching_levels():
    u = torch.linspace(0.01, 0.99, 9)
    s = shift_sigma(u, 5.0)
    assert torch.all(s >= u)                                           # the shift moves levels to more noise
    assert [unshift_sigma(float(v), 5.0) for v in s] == pytest.approx(u.tolist(), abs=1e-6)
    assert sigma_range("transformer", None) == (0.0, 1.0)
    assert sigma_range("transformer", 0.875) == (0.875, 1.0)            # Wan2.2 high-noise expert
    assert sigma_range("transformer_2", 0.875) == (0.0, 0.875)
    with pytest.raises(ValueError, match="two-expert"):
        sigma_range("transformer_2", None)


def test_flow_batch_is_a_velocity_target(wan_data):
    from lpq.models.tiny import tiny_wan_pipeline
    from lpq.train.wan_objective import WanFlowObjective

    pipe = tiny_wan_pipeline(two_experts=True)
    cache = LatentCache(wan_data / "cache")
    obj = WanFlowObjective(pipe, cache, [0, 1, 2, 3], [4, 5], FlowMatchConfig(expert="transformer_2"), seed=0)
    batch = obj.train_batch([0, 1], step=3, micro=0, rank=0)
    x0, _ = cache.batch([0, 1])
    sigma = (batch["timestep"] / 1000).view(-1, 1, 1, 1, 1)
    assert torch.all(sigma < 0.875)                                     # low-noise expert's range only
    assert torch.allclose(batch["noisy"] - sigma * batch["target"], x0, atol=1e-5)
    again = obj.train_batch([0, 1], step=3, micro=0, rank=0)
    assert torch.equal(again["noisy"], batch["noisy"])                  # a pure function of the step
    assert not torch.equal(obj.train_batch([0, 1], step=4, micro=0, rank=0)["noisy"], batch["noisy"])


def wan_recipe(wan_data, out, **train) -> TrainRecipe:
    role = {"format": "hif8", "scaling": "delayed", "history_len": 4}
    cfg = {"output_dir": str(out), "steps": 4, "batch_size": 2, "lr": 1e-3, "bf16_warmup_steps": 1,
           "stats_every": 1}
    cfg.update(train)
    return from_dict({
        "model": {"id": "tiny-wan21"},
        "quant": {"weight": {"format": "hif8", "scaling": "current"}, "input": role, "grad": role,
                  "attention": {"q": role, "k": role, "v": dict(role, axis=-2), "p": role}},
        "train": cfg,
        "data": {"kind": "wan_latents", "cache_dir": str(wan_data / "cache"), "eval_blocks": 2},
    }, TrainRecipe)


def test_tiny_wan21_qat_single_process(wan_data, tmp_path):
    report = run_training(wan_recipe(wan_data, tmp_path))
    assert report["first_step_losses_differ"] == 2
    for key in ("eval_loss_bf16", "eval_loss_hif8", "rel_diff_pct", "step_time_ratio"):
        assert np.isfinite(report[key]), key
    stats = [json.loads(line) for line in (tmp_path / "hif8" / "quant_stats.jsonl").read_text().splitlines()]
    names = stats[-1]["quantizers"]
    assert any("attn1.lpq_attention.p_quantizer" in n for n in names)   # Wan attention is quantized
    assert any("ffn.net.2.grad_quantizer" in n for n in names)
    assert (tmp_path / "hif8" / "final" / "diffusion_pytorch_model.safetensors").is_file()


def test_tiny_wan21_qat_then_paired_video_eval(wan_data, tmp_path):
    from lpq.config import from_dict, to_dict

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["a red ball", "a blue car"]))
    data = to_dict(wan_recipe(wan_data, tmp_path, steps=2))
    data["eval"] = {"bootstrap": 100, "video": {"prompts_file": str(prompts), "dimension": None}}
    report = run_training(from_dict(data, TrainRecipe))
    video = report["eval"]["video"]
    assert report["eval"]["tasks"]["video_flicker"]["n"] == 2
    assert video["latent_mse"] > 0 and np.isfinite(video["psnr_db"])
    assert len(list((tmp_path / "eval" / "videos" / "quantized").iterdir())) == 2
