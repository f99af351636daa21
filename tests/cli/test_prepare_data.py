"""`lpq prepare-data` follows lpq.outputs' rules for its cache_dir, checked before the model loads: a folder
lpq did not write is never written into, another recipe's cache is replaced only with --force, the same
recipe continues its cache, and a second run into a folder in use is refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lpq.outputs import MARKER, claim_output, read_marker
from tests.cli.helpers import error_line, lpq, lpq_process, snapshot, user_folder
from tests.train.helpers import write_clips

VIDEO = {"num_frames": 5, "height": 32, "width": 32, "max_sequence_length": 16}


def _recipe(tmp_path, model="tiny-wan21", **video):
    captions = tmp_path / "videos" / "captions.jsonl"
    if not captions.is_file():
        write_clips(tmp_path / "videos", n=2)
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({
        "model": {"id": model},
        "data": {"kind": "wan_latents", "cache_dir": str(tmp_path / "cache"),
                 "video": {"captions": str(captions), "video_root": str(tmp_path / "videos"), **VIDEO, **video}}}))
    return path


@pytest.fixture
def no_model_load(monkeypatch):
    """Refusals come before any model is loaded."""
    monkeypatch.setattr("lpq.models.hub.load_model", lambda cfg: pytest.fail("the model was loaded"))


def test_a_folder_lpq_did_not_write_is_never_written(tmp_path, no_model_load):
    recipe = _recipe(tmp_path)
    user_folder(tmp_path / "cache")
    before = snapshot(tmp_path)
    code, out = lpq("prepare-data", "--config", recipe, "--force")
    assert code == 2 and "cache is not empty and was not written by lpq (no lpq_output.json)" in error_line(out)
    assert snapshot(tmp_path) == before


def test_a_text_model_is_refused_before_it_loads(tmp_path, no_model_load):
    recipe = _recipe(tmp_path, model="tiny-llama")
    code, out = lpq("prepare-data", "--config", recipe)
    assert code == 2 and "prepare-data encodes videos for Wan pipelines; 'tiny-llama' is a causal_lm" in \
        error_line(out)
    assert not (tmp_path / "cache").exists()


def test_the_shipped_text_recipe_is_told_it_needs_no_preparation(no_model_load):
    # A text recipe has no cache_dir: the first thing said is what prepare-data is for, with the file.
    recipe = Path(__file__).resolve().parents[2] / "configs" / "smollm2_hif8.yaml"
    code, out = lpq("prepare-data", "--config", recipe)
    assert code == 2 and error_line(out).startswith(f"error: {recipe}: prepare-data encodes videos")


def test_a_wan_recipe_without_cache_dir_is_refused_before_it_loads(tmp_path, no_model_load):
    recipe = _recipe(tmp_path)
    code, out = lpq("prepare-data", "--config", recipe, "--set", "data.cache_dir=null", "--set", "data.kind=text",
                    "--set", "data.paths=[x.txt]")
    assert code == 2 and "data.cache_dir is not set" in error_line(out) and str(recipe) in out


@pytest.mark.parametrize("video, message", [
    ({"captions": "missing.jsonl"}, "error: data.video.captions: missing.jsonl does not exist (from "),
    ({"video_root": "{tmp}/elsewhere"},
     "error: none of the 3 clips in {tmp}/videos/captions.jsonl was found under {tmp}/elsewhere; set "
     "data.video.video_root"),
])
def test_captions_and_clips_are_found_before_the_folder_and_the_model(tmp_path, no_model_load, video, message):
    """A wrong captions path or clip root used to claim the cache folder and load the pipeline first."""
    recipe = _recipe(tmp_path, **{k: v.format(tmp=tmp_path) for k, v in video.items()})
    code, out = lpq("prepare-data", "--config", recipe)
    assert code == 2 and error_line(out).startswith(message.format(tmp=tmp_path)), out
    assert not (tmp_path / "cache").exists()


def test_same_recipe_continues_another_needs_force(tmp_path):
    recipe = _recipe(tmp_path)
    code, out = lpq("prepare-data", "--config", recipe)
    assert code == 0 and "2 samples" in out, out
    cache = tmp_path / "cache"
    marker = read_marker(cache)
    assert marker["command"] == "lpq prepare-data" and "manifest.json" in marker["files"]
    encoded = snapshot(cache / "samples")
    code, out = lpq("prepare-data", "--config", recipe)           # the same recipe: the cache is reused
    assert code == 0 and snapshot(cache / "samples") == encoded, out
    taller = _recipe(tmp_path, height=48)
    code, out = lpq("prepare-data", "--config", taller)
    assert code == 2 and "holds the output of another recipe" in error_line(out) and "--force" in out
    assert snapshot(cache / "samples") == encoded
    code, out = lpq("prepare-data", "--config", taller, "--force")
    assert code == 0, out
    assert json.loads((cache / "manifest.json").read_text())["height"] == 48 and (cache / MARKER).is_file()


def test_a_cache_in_use_is_refused(tmp_path):
    recipe = _recipe(tmp_path)
    with claim_output(tmp_path / "cache", fingerprint="x", command="lpq prepare-data"):
        code, out = lpq_process("prepare-data", "--config", recipe)
    assert code == 2 and "in use by another lpq run" in error_line(out)
