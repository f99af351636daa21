"""Video metrics with known answers, and a paired run of a tiny Wan2.2 pipeline on 2 prompts."""
import copy
import json

import numpy as np
import pytest
import torch

from lpq.eval.settings import EvalSettings, VideoSettings
from lpq.eval.video import PSNR_CAP_DB, flicker_score, load_prompts, psnr, run_paired_video, ssim


def test_flicker_score_is_vbench_formula():
    still = np.full((5, 8, 8, 3), 100, np.uint8)
    assert flicker_score(still) == 1.0
    steps = np.stack([np.full((8, 8, 3), 51 * (i % 2), np.uint8) for i in range(4)])
    assert flicker_score(steps) == pytest.approx((255 - 51) / 255)
    with pytest.raises(ValueError):
        flicker_score(still[:1])


def test_psnr_and_ssim_known_values():
    a = np.full((2, 16, 16, 3), 0.5, np.float32)
    assert psnr(a, a + 0.1) == pytest.approx(20.0, abs=1e-4)
    assert psnr(a, a) == PSNR_CAP_DB
    noise = np.random.default_rng(0).random((2, 16, 16, 3)).astype(np.float32)
    assert ssim(noise, noise) == pytest.approx(1.0)
    # Flat images: SSIM reduces to the luminance term (2*0.2*0.4 + C1) / (0.2^2 + 0.4^2 + C1).
    c1 = 0.01 ** 2
    assert ssim(np.full_like(a, 0.2), np.full_like(a, 0.4)) == pytest.approx((0.16 + c1) / (0.2 + c1), rel=1e-6)
    assert ssim(noise, np.clip(noise + 0.2 * np.random.default_rng(1).standard_normal(noise.shape), 0, 1)) < 0.9


def test_prompts_filter_by_dimension(data_dir):
    s = EvalSettings(data_dir=str(data_dir), video=VideoSettings(num_prompts=2))
    assert load_prompts(s) == ["w4 w5 w6", "w9 w10"]
    with pytest.raises(ValueError, match="fewer than num_prompts"):
        load_prompts(EvalSettings(data_dir=str(data_dir), video=VideoSettings(num_prompts=3)))


def test_tiny_wan22_paired_video(data_dir, tmp_path):
    from lpq.models.tiny import tiny_wan_pipeline

    base = tiny_wan_pipeline(two_experts=True)
    cand = copy.deepcopy(base)
    with torch.no_grad():
        for p in list(cand.transformer.parameters()) + list(cand.transformer_2.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    s = EvalSettings(data_dir=str(data_dir), tasks=["video"], bootstrap=200)
    res = run_paired_video(base, cand, s, tmp_path / "v", model_name="tiny-wan22")
    on_disk = json.loads((tmp_path / "v" / "results.json").read_text())
    t = on_disk["tasks"]["video_flicker"]
    assert {"baseline", "quantized", "rel_loss_pct", "ci95_low", "ci95_high", "agreement", "n"} <= t.keys()
    assert t["n"] == 2 and on_disk["mean_abs_pct_loss"] is not None
    v = res["video"]
    assert v["n"] == 2 and 0 < v["psnr_db"] < PSNR_CAP_DB and 0 < v["ssim"] < 1 and v["latent_mse"] > 0
    frames = sorted((tmp_path / "v" / "videos" / "quantized" / "v001_seed0").glob("frame_*.png"))
    assert len(frames) == 9 and (tmp_path / "v" / "videos" / "baseline" / "v000_seed0" / "video.gif").is_file()
    # Same seed, same pipeline: the comparison is exact.
    same = run_paired_video(base, base, s, tmp_path / "same")
    assert same["video"]["psnr_db"] == PSNR_CAP_DB and same["video"]["latent_mse"] == 0.0
    assert same["tasks"]["video_flicker"]["rel_loss_pct"] == 0.0
