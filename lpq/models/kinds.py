"""What differs between kinds of model in post-training quantization, behind one interface.

A causal LM is calibrated on token windows, its blocks are ranked by the next-token loss, and it is
evaluated by perplexity/KL against its float model. A Wan pipeline is calibrated by running the
denoising loop on prompts (each of its transformers records its own block inputs), its blocks are
ranked by the relative error of the final hidden states, and it has no text to evaluate. Each
family's adapter (lpq/models/adapters.py) names its kind; the PTQ pipeline only calls these methods.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lpq.data.block_inputs import BlockInputs, capture, feed_causal_lm

if TYPE_CHECKING:
    from lpq.data.calibration import CalibrationConfig
    from lpq.models.adapters import Adapter
    from lpq.models.hub import LoadedModel


class ModelKind:
    name: str
    next_token_logits: bool = False    # the model maps token ids to next-token logits

    def networks(self, model: object) -> list[tuple[str, nn.Module]]:
        """The quantizable networks by name ("" for a plain model)."""
        return [("", model)]

    def calibration_data(self, loaded: LoadedModel, calib: CalibrationConfig) -> Any:
        """What calibration feeds the model (token windows, prompts), read once per run."""
        raise NotImplementedError

    def capture(self, loaded: LoadedModel, first_blocks: list[nn.Module], data: Any,
                calib: CalibrationConfig) -> list[BlockInputs]:
        """The inputs of each network's first block over the calibration data (one BlockInputs per network)."""
        raise NotImplementedError

    def ranking_inputs(self, inputs: BlockInputs, data: Any, sequences: int, seq_len: int,
                       calib: CalibrationConfig) -> tuple[BlockInputs, Any]:
        """The part of a network's block-0 inputs that ranks block sensitivity, and its loss target."""
        return inputs, None

    def ranking_loss(self, net: nn.Module, adapter: Adapter, final: BlockInputs, reference: BlockInputs,
                     target: Any) -> float:
        """The loss of the network's last-block outputs `final` (reference: the float model's)."""
        raise NotImplementedError

    def text_windows(self, loaded: LoadedModel, calib: CalibrationConfig, num: int, seq_len: int) -> Tensor:
        raise ValueError(f"a {self.name} model has no next-token text to train or score on")

    def check_evaluation(self, loaded: LoadedModel, evaluation: Any) -> None:
        """Raise ValueError when the data `evaluate` reads cannot be had (called before the first block)."""

    def evaluate(self, loaded: LoadedModel, float_model: Any, evaluation: Any, out_dir: Path) -> dict:
        """Quality of the quantized model against its float model: {"baseline": {...}, "quantized": {...}}."""
        return {"baseline": {}, "quantized": {}}


class CausalLM(ModelKind):
    name = "causal_lm"
    next_token_logits = True

    def calibration_data(self, loaded: LoadedModel, calib: CalibrationConfig) -> Tensor:
        from lpq.data.calibration import calibration_tokens

        return calibration_tokens(calib, loaded.tokenizer)

    def capture(self, loaded: LoadedModel, first_blocks: list[nn.Module], data: Tensor,
                calib: CalibrationConfig) -> list[BlockInputs]:
        return [capture(first_blocks[0], feed_causal_lm(loaded.model, data, calib.batch_size), stop=True)]

    def ranking_inputs(self, inputs: BlockInputs, data: Tensor, sequences: int, seq_len: int,
                       calib: CalibrationConfig) -> tuple[BlockInputs, Tensor]:
        # Whole calibration batches, cut to seq_len positions (causal: the first positions do not
        # depend on the rest).
        n = max(1, min(len(inputs), math.ceil(sequences / calib.batch_size)))
        sub = BlockInputs([h[:, :seq_len] for h in inputs.hidden[:n]], inputs.args[:n],
                          [_truncate_kwargs(k, seq_len) for k in inputs.kwargs[:n]])
        return sub, data[: n * calib.batch_size, :seq_len]

    def ranking_loss(self, net: nn.Module, adapter: Adapter, final: BlockInputs, reference: BlockInputs,
                     target: Tensor) -> float:
        norm, head = net.get_submodule(adapter.final_norm), net.get_output_embeddings()
        total, count, start = 0.0, 0, 0
        with torch.no_grad():
            for h in final.hidden:
                t = target[start:start + h.shape[0]]
                start += h.shape[0]
                logits = head(norm(h))[:, :-1].float()
                total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                                 t[:, 1:].reshape(-1), reduction="sum"))
                count += t[:, 1:].numel()
        return total / count

    def text_windows(self, loaded: LoadedModel, calib: CalibrationConfig, num: int, seq_len: int) -> Tensor:
        from lpq.data.calibration import calibration_tokens

        return calibration_tokens(dataclasses.replace(calib, num_sequences=num, seq_len=seq_len), loaded.tokenizer)

    def check_evaluation(self, loaded: LoadedModel, evaluation: Any) -> None:
        from lpq.eval.ptq_quality import evaluation_windows

        evaluation_windows(loaded.tokenizer, evaluation)      # a domain too short for its windows fails now

    def evaluate(self, loaded: LoadedModel, float_model: Any, evaluation: Any, out_dir: Path) -> dict:
        from lpq.eval.ptq_quality import evaluate_causal_lm

        return evaluate_causal_lm(loaded, float_model, evaluation, out_dir)


def _truncate_kwargs(kwargs: dict, seq_len: int) -> dict:
    """Cut sequence-length dims of the captured block kwargs (rotary tables, masks) to seq_len."""
    out = {}
    for k, v in kwargs.items():
        if k == "position_embeddings" and isinstance(v, tuple):
            out[k] = tuple(t[:, :seq_len] for t in v)
        elif k == "attention_mask" and torch.is_tensor(v) and v.dim() == 4:
            out[k] = v[..., :seq_len, :seq_len]
        elif k in ("position_ids", "cache_position") and torch.is_tensor(v):
            out[k] = v[..., :seq_len]
        else:
            out[k] = v
    return out


class WanPipelineKind(ModelKind):
    name = "wan"

    def networks(self, model: object) -> list[tuple[str, nn.Module]]:
        if isinstance(model, nn.Module):
            return [("", model)]
        nets = [(n, getattr(model, n, None)) for n in ("transformer", "transformer_2")]
        return [(n, m) for n, m in nets if m is not None]

    def calibration_data(self, loaded: LoadedModel, calib: CalibrationConfig) -> list[str]:
        from lpq.data.calibration import read_prompts

        return read_prompts(calib)

    def capture(self, loaded: LoadedModel, first_blocks: list[nn.Module], data: list[str],
                calib: CalibrationConfig) -> list[BlockInputs]:
        """Every transformer's block-0 inputs over the denoising loop (Wan2.2: each expert sees its own
        part of the schedule)."""
        recs = [BlockInputs() for _ in first_blocks]
        handles = []
        for first, rec in zip(first_blocks, recs):
            def hook(module, args, kwargs, rec=rec):
                hidden = args[0] if args else kwargs["hidden_states"]
                rest = tuple(args[1:]) if args else ()
                kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                rec.hidden.append(hidden.detach().cpu())
                rec.args.append(tuple(a.detach().cpu() if torch.is_tensor(a) else a for a in rest))
                rec.kwargs.append({k: (v.detach().cpu() if torch.is_tensor(v) else
                                       tuple(t.detach().cpu() for t in v) if isinstance(v, tuple) else v)
                                   for k, v in kw.items()})
            handles.append(first.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            with torch.no_grad():
                for prompt in data:
                    loaded.model(prompt=prompt, height=calib.height, width=calib.width, num_frames=calib.num_frames,
                                 num_inference_steps=calib.timesteps, output_type="latent",
                                 generator=torch.Generator().manual_seed(0))
        finally:
            for h in handles:
                h.remove()
        for i, rec in enumerate(recs):
            if not rec.hidden:
                raise RuntimeError(f"no calibration inputs reached transformer {i + 1}; raise calibration.timesteps")
        return recs

    def ranking_loss(self, net: nn.Module, adapter: Adapter, final: BlockInputs, reference: BlockInputs,
                     target: Any) -> float:
        num = sum(float(((a - b) ** 2).sum()) for a, b in zip(final.hidden, reference.hidden))
        return num / max(sum(float((b ** 2).sum()) for b in reference.hidden), 1e-30)


KINDS: dict[str, ModelKind] = {k.name: k for k in (CausalLM(), WanPipelineKind())}
