import math
from pathlib import Path

import pytest
import torch

from lpq.config import ConfigError
from lpq.train.data import BatchPlan, read_texts, seeded_generator, tokenize_blocks
from lpq.train.loop import lr_factor
from lpq.train.recipe import DataConfig, LrSchedule, TrainConfig, load_recipe

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", ["smollm2_hif8", "wan21_hif8", "pangu1b_hif8"])
def test_shipped_recipes_load(name):
    r = load_recipe(CONFIGS / f"{name}.yaml")
    assert r.quant.input.format == "hif8" and r.quant.input.scaling.value == "delayed"
    assert r.quant.grad is not None and r.quant.attention.p.target.value == "amax"
    assert r.train.compare == ["current", "delayed"] and len(r.quant.protected_blocks) <= 5


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_unknown_key_is_named_with_file_and_line(tmp_path):
    p = write(tmp_path, "model:\n  id: tiny-llama\ntrain:\n  steps: 10\n  warmup: 3\n")
    msg = r"r\.yaml:5: unknown key 'train\.warmup'; allowed in 'train': .*bf16_warmup_steps"
    with pytest.raises(ConfigError, match=msg):
        load_recipe(p)
    # Inside the runtime's quant section too.
    p = write(tmp_path, "quant:\n  input:\n    format: hif8\n    scalng: delayed\n")
    with pytest.raises(ConfigError, match=r"r\.yaml:4: unknown key 'quant\.input\.scalng'"):
        load_recipe(p)


def test_bad_values_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"r\.yaml:3: 'train': bf16_warmup_steps \(10\) must be < steps \(5\)"):
        load_recipe(write(tmp_path, "train:\n  steps: 5\n  bf16_warmup_steps: 10\n"))
    with pytest.raises(ConfigError, match=r"r\.yaml:3: 'train\.lr_schedule': 'cosin' is not allowed"):
        load_recipe(write(tmp_path, "train:\n  steps: 5\n  lr_schedule: cosin\n"))
    with pytest.raises(ConfigError, match=r"r\.yaml:3: 'quant': 6 protected blocks exceed the challenge budget of 5"):
        load_recipe(write(tmp_path, "quant:\n  format: hif8\n  protected_blocks: [0, 1, 2, 3, 4, 5]\n"))
    # A value given on the command line (`lpq train --set`) is named by that option, not by the file's line.
    with pytest.raises(ConfigError, match=r"^--set train\.lr: 'train\.lr' must be float, got 'abc'$"):
        load_recipe(write(tmp_path, "train:\n  steps: 5\n"), {"train.lr": "abc"})
    with pytest.raises(ConfigError, match=r"^--set quant\.protected_blocks: 'quant': 6 protected blocks exceed"):
        load_recipe(write(tmp_path, "quant:\n  format: hif8\n"), {"quant.protected_blocks": [0, 1, 2, 3, 4, 5]})
    with pytest.raises(ConfigError, match=r"r\.yaml:3: 'data\.video': num_frames must be 4k \+ 1"):
        load_recipe(write(tmp_path, "data:\n  video:\n    num_frames: 80\n"))


def test_overrides(tmp_path):
    r = load_recipe(CONFIGS / "smollm2_hif8.yaml", {"train.steps": 30, "train.output_dir": str(tmp_path)})
    assert r.train.steps == 30 and r.train.output_dir == tmp_path


def test_lr_schedule():
    cfg = TrainConfig(steps=10, lr_warmup_steps=2, lr_schedule=LrSchedule.COSINE, min_lr_ratio=0.1)
    f = [lr_factor(s, cfg) for s in range(10)]
    assert f[:3] == [0.5, 1.0, 1.0]
    assert f[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(7 / 8 * math.pi)))
    assert all(a >= b for a, b in zip(f[1:], f[2:]))


def test_batch_plan_shards_each_global_batch_and_covers_the_epoch():
    plan = BatchPlan(num_samples=12, batch_size=2, grad_accum=3, world_size=2, seed=0)
    step0 = [i for m in range(3) for r in range(2) for i in plan.indices(0, m, r)]
    assert sorted(step0) == list(range(12))                      # one global batch = one epoch here
    step1 = [i for m in range(3) for r in range(2) for i in plan.indices(1, m, r)]
    assert sorted(step1) == list(range(12)) and step1 != step0   # next epoch, new permutation
    assert BatchPlan(12, 2, 3, 2, seed=0).indices(1, 2, 1) == plan.indices(1, 2, 1)   # pure function


def test_text_blocks_and_errors(tmp_path, corpus):
    from lpq.models.tiny import _word_tokenizer

    tok = _word_tokenizer(1000)
    texts = read_texts(DataConfig(paths=[str(corpus)]))
    blocks = tokenize_blocks(texts, tok, 32)
    # 24 documents x (120 words + EOS) = 2904 tokens -> 90 blocks; the dropped tail holds the last EOS.
    assert blocks.shape == (90, 32) and blocks.dtype == torch.long
    assert int((blocks == tok.eos_token_id).sum()) == 23
    assert len(read_texts(DataConfig(paths=["pydoc-topics"]))) > 50
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: .*'text'"):
        read_texts(DataConfig(paths=[str(bad)]))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_texts(DataConfig(paths=[str(tmp_path / "missing.txt")]))
    bad.write_text('{"text": "a"}\n{"text": "b",\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        read_texts(DataConfig(paths=[str(bad)]))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"data.paths: .*latin1.txt is not UTF-8 text \(byte 3\)"):
        read_texts(DataConfig(paths=[str(tmp_path / "latin1.txt")]))


def test_seeded_generator_is_reproducible():
    a = torch.rand(3, generator=seeded_generator(1, 2, 3))
    assert torch.equal(a, torch.rand(3, generator=seeded_generator(1, 2, 3)))
    assert not torch.equal(a, torch.rand(3, generator=seeded_generator(1, 2, 4)))
