"""SmolLM2-135M on 50 real MMLU questions from ../shared/data (slow: a real 135M model)."""
import random
from pathlib import Path

import pytest

from lpq.eval.harness import prepare_task, run_task
from lpq.eval.settings import EvalSettings, resolve_data_dir

pytestmark = pytest.mark.slow


def test_smollm2_on_50_mmlu_questions():
    settings = EvalSettings(tasks=["mmlu"], limit=50, seed=0, kl=False)
    data = resolve_data_dir(settings.data_dir)
    if data is None or not (Path(data) / "mmlu" / "test.jsonl").is_file():
        pytest.skip("MMLU not found: set $LPQ_DATA_DIR to a folder with mmlu/test.jsonl (../shared/data layout)")
    from lpq.models.hub import ModelConfig, load_model

    lm = load_model(ModelConfig(id="smollm2-135m"))
    prepared = prepare_task("mmlu", settings)
    assert prepared.indices == sorted(random.Random(0).sample(range(14042), 50))
    run = run_task(lm.model, lm.tokenizer, prepared, settings)
    assert [r["doc_id"] for r in run.records] == prepared.indices
    assert len({r["prompt_hash"] for r in run.records}) == 50
    assert run.score == pytest.approx(run.info["lm_eval_score"])
    # A 135M model on letter-format MMLU sits near chance (0.25); far outside means broken scoring.
    assert 0.1 <= run.score <= 0.6
    # Its preferences are not uniform: the answer letters get different log-likelihoods.
    assert all(len(set(r["loglikelihoods"])) == 4 for r in run.records)
