"""Two CPU processes (gloo) launched with `accelerate launch` through `lpq train --num-processes 2`."""
import json
import os
import subprocess
import sys

import pytest

from tests.train.helpers import quant_section, write_clips

pytestmark = pytest.mark.slow


def launch(recipe: dict, tmp_path, timeout=600):
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "lpq.cli", "train", "--config", str(path), "--num-processes", "2"],
                       capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((tmp_path / "out" / "train_report.json").read_text())


def assert_ranks_agree(run_dir):
    r0 = json.loads((run_dir / "rank0_fingerprint.json").read_text())
    r1 = json.loads((run_dir / "rank1_fingerprint.json").read_text())
    assert r0["scales"] and r0["scales"] == r1["scales"]     # every delayed/current scale, in full
    assert r0["sha256"] == r1["sha256"]                       # all weights and scaling buffers, bit for bit


def test_two_process_llm_qat_has_identical_scales_and_weights(corpus, tmp_path):
    recipe = {"model": {"id": "tiny-llama"}, "quant": quant_section(),
              "train": {"output_dir": str(tmp_path / "out"), "steps": 4, "batch_size": 2, "lr": 1e-3,
                        "bf16_warmup_steps": 1, "reference_run": False, "stats_every": 2},
              "data": {"paths": [str(corpus)], "seq_len": 32, "eval_blocks": 4}}
    report = launch(recipe, tmp_path)
    assert report["world_size"] == 2 and report["batch_size_global"] == 4
    assert report["ranks_identical_hif8"] is True
    assert_ranks_agree(tmp_path / "out" / "hif8")


def test_two_process_tiny_wan21_qat(tmp_path):
    from typer.testing import CliRunner

    from lpq.cli import app

    captions = write_clips(tmp_path / "videos")
    data = {"kind": "wan_latents", "cache_dir": str(tmp_path / "cache"), "eval_blocks": 2,
            "video": {"captions": str(captions), "video_root": str(tmp_path / "videos"), "num_frames": 5,
                      "height": 32, "width": 32, "max_sequence_length": 16}}
    prep = tmp_path / "prep.yaml"
    prep.write_text(json.dumps({"model": {"id": "tiny-wan21"}, "data": data}))
    assert CliRunner().invoke(app, ["prepare-data", "--config", str(prep)]).exit_code == 0
    role = {"format": "hif8", "scaling": "delayed", "history_len": 4}
    recipe = {"model": {"id": "tiny-wan21"},
              "quant": {"weight": {"format": "hif8", "scaling": "current"}, "input": role, "grad": role,
                        "attention": {"q": role, "k": role, "v": dict(role, axis=-2), "p": role}},
              "train": {"output_dir": str(tmp_path / "out"), "steps": 3, "batch_size": 1, "lr": 1e-3,
                        "bf16_warmup_steps": 1, "reference_run": False},
              "data": data}
    report = launch(recipe, tmp_path)
    assert report["ranks_identical_hif8"] is True
    assert_ranks_agree(tmp_path / "out" / "hif8")
