"""lm-eval through lpq's task YAMLs on local fixtures: one test per task type, with a tiny model."""
import random

import pytest

from lpq.eval.harness import prepare_task, run_task
from lpq.eval.settings import EvalSettings


def _settings(data_dir, **kw):
    return EvalSettings(data_dir=str(data_dir), kl=False, **kw)


def test_multiple_choice_subset_is_seeded_and_records_match_lm_eval(data_dir, tiny_lm):
    model, tok = tiny_lm
    s = _settings(data_dir, limit=6, seed=0)
    a, b = prepare_task("mmlu", s), prepare_task("mmlu", s)
    assert a.indices == b.indices == sorted(random.Random(0).sample(range(16), 6))
    assert a.fingerprint == b.fingerprint
    assert prepare_task("mmlu", _settings(data_dir, limit=6, seed=1)).indices != a.indices
    run = run_task(model, tok, a, s)
    assert [r["doc_id"] for r in run.records] == a.indices
    for r in run.records:
        assert len(r["loglikelihoods"]) == 4 and len(set(r["loglikelihoods"])) > 1   # letters are real tokens
        assert r["prediction"] == max(range(4), key=r["loglikelihoods"].__getitem__)
        assert r["correct"] == int(r["prediction"] == r["target"])
    assert run.score == pytest.approx(run.info["lm_eval_score"])


@pytest.mark.parametrize("source", ["csv", "jsonl"])
def test_gpqa_reads_a_local_file_and_shuffles_per_question(data_dir, tiny_lm, source):
    model, tok = tiny_lm
    kw = {} if source == "csv" else {"gpqa_file": str(data_dir / "gpqa_jsonl" / "gpqa.jsonl")}
    s = _settings(data_dir, **kw)
    prepared = prepare_task("gpqa", s)
    assert prepared.n_items == 6 and prepared.indices is None
    run = run_task(model, tok, prepared, s)
    assert len(run.records) == 6 and run.score == pytest.approx(run.info["lm_eval_score"])
    # The correct option sits where `answer` says, and the position varies across questions.
    from lm_eval.tasks import TaskManager

    docs = TaskManager(include_defaults=False).load([prepared.config])["tasks"]["lpq_gpqa"].eval_docs
    for d in docs:
        assert d[f"choice{'ABCD'.index(d['answer'][1]) + 1}"] == d["Correct Answer"].strip()
    assert len({d["answer"] for d in docs}) > 1


@pytest.mark.parametrize("task", ["gsm8k", "math500"])
def test_generative_tasks_decode_greedily_and_extract(data_dir, tiny_lm, task):
    model, tok = tiny_lm
    s = _settings(data_dir, max_gen_toks=6, num_fewshot=1 if task == "gsm8k" else 0)
    prepared = prepare_task(task, s)
    assert prepared.config["generation_kwargs"]["do_sample"] is False
    assert prepared.config["generation_kwargs"]["max_gen_toks"] == 6
    run = run_task(model, tok, prepared, s)
    again = run_task(model, tok, prepared, s)
    assert [r["response"] for r in run.records] == [r["response"] for r in again.records]   # greedy
    for r in run.records:
        assert set(r) >= {"prompt_hash", "response", "prediction", "correct", "target"}
        assert r["target"].isdigit()                            # "#### 7" -> "7"; MATH answers as they are
    assert run.score == pytest.approx(run.info["lm_eval_score"])


def test_perplexity_task_scores_chunks(data_dir, tiny_lm):
    model, tok = tiny_lm
    s = _settings(data_dir)
    prepared = prepare_task("wikitext2", s)
    assert prepared.n_items == 3                              # one chunk per (short) fixture article
    run = run_task(model, tok, prepared, s)
    assert all(r["loglikelihood"] < 0 and r["words"] > 0 for r in run.records)
    assert run.score == pytest.approx(run.info["lm_eval_score"], rel=1e-6)
    assert 1 < run.score < 5000


def test_missing_local_file_says_which_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"mmlu/test.jsonl.*--data-dir"):
        prepare_task("mmlu", _settings(tmp_path))
    with pytest.raises(FileNotFoundError, match="GPQA"):
        prepare_task("gpqa", _settings(tmp_path))
