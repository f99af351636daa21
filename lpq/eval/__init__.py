"""Evaluation: lm-eval tasks on in-memory models, paired statistics, distribution shift, video metrics."""
from lpq.eval.harness import PreparedTask, TaskRun, prepare_task, run_task
from lpq.eval.paired import run_paired
from lpq.eval.settings import EvalSettings, VideoSettings
from lpq.eval.shift import distribution_shift, perplexity
from lpq.eval.video import run_paired_video

__all__ = ["EvalSettings", "PreparedTask", "TaskRun", "VideoSettings", "distribution_shift", "perplexity",
           "prepare_task", "run_paired", "run_paired_video", "run_task"]
