"""Which blocks to keep in high precision: rank blocks by sensitivity, choose within the budget.

The ranking quantizes one block at a time (weights by the format's own rule, inputs quantized:
W4A4 RTN, after the recipe's data-free transforms) and measures the loss of the network's output
on a few calibration batches; the model kind supplies which batches and which loss (causal LM:
next-token cross-entropy; Wan: relative error of the final hidden states).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from lpq.data.block_inputs import BlockInputs, advance
from lpq.models.offload import materialized
from lpq.quant.apply import set_quant_enabled_in

if TYPE_CHECKING:
    from lpq.algorithms.context import RunContext


def rank_blocks(run: RunContext, stage_inputs: list[BlockInputs]) -> dict[int, float]:
    """Per global block index: the loss increase when only that block is quantized."""
    protect, kind = run.cfg.protect, run.kind
    scores: dict[int, float] = {}
    for stage, inputs0 in zip(run.stages, stage_inputs):
        sub, target = kind.ranking_inputs(inputs0, run.calibration_data, protect.sequences, protect.seq_len,
                                          run.cfg.calibration)
        set_quant_enabled_in(stage.net, False)
        outputs = [sub]
        for blk in tqdm(stage.blocks, desc=f"sensitivity float pass {stage.name}".rstrip(), unit="block"):
            outputs.append(advance(blk, outputs[-1]))
        reference = outputs[-1]

        def loss(final: BlockInputs) -> float:
            return kind.ranking_loss(stage.net, run.adapter, final, reference, target)

        base = loss(reference)
        for i, blk in enumerate(tqdm(stage.blocks, desc=f"sensitivity {stage.name}".rstrip(), unit="block")):
            # Offloaded: the quantized weights exist only while this block is held; its stored weights stay float.
            with materialized(blk, None):
                set_quant_enabled_in(blk, True)
                cur = outputs[i]
                for later in stage.blocks[i:]:
                    cur = advance(later, cur)
                scores[stage.offset + i] = loss(cur) - base
                set_quant_enabled_in(blk, False)
                for m in blk.modules():      # drop the cached quantized weights
                    if hasattr(m, "refresh"):
                        m.refresh()
    return scores


def choose_protected(scores: dict[int, float], k: int) -> list[int]:
    """The k blocks whose quantization alone raises the loss most (ties: lower index first)."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    ranked = sorted(scores, key=lambda b: (-scores[b], b))
    return ranked[:k]


def plot_sensitivity(scores: dict[int, float], protected: list[int], path: str | Path, title: str = "") -> None:
    """Bar chart of the loss increase per block; protected blocks highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = sorted(scores)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(blocks)), 3.2))
    colors = ["tab:red" if b in protected else "tab:blue" for b in blocks]
    ax.bar([str(b) for b in blocks], [scores[b] for b in blocks], color=colors)
    ax.set_xlabel("block")
    ax.set_ylabel("loss increase")
    ax.set_title(title or "sensitivity: only this block quantized (red: protected)")
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
