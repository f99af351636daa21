"""`lpq eval`: a baseline and a candidate (quantized on the fly, or a second checkpoint), paired report."""
from __future__ import annotations

from pathlib import Path

import typer


# Command option -> the recipe key it sets.
OPTION_KEYS = {"--model": "model.id", "--limit": "eval.limit", "--data-dir": "eval.data_dir",
               "--tasks": "eval.tasks", "--kl/--no-kl": "eval.kl", "--cache/--no-cache": "eval.use_cache",
               "--vbench": "eval.video.vbench_python"}


def _load_recipe(config: Path | None, overrides: dict):
    from lpq.config import from_options, load_config
    from lpq.eval.recipe import EvalRecipe

    options = {key: option for option, key in OPTION_KEYS.items() if key in overrides}
    if config is not None:
        return load_config(config, EvalRecipe, overrides, options)
    data: dict = {}
    for dotted, value in overrides.items():
        *parents, last = dotted.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return from_options(data, EvalRecipe, options, "lpq eval (no --config)")


def check_models(recipe, candidate_id: str | None) -> None:
    """Before any folder is made or weight read: exactly one candidate, and the baseline's and a
    candidate checkpoint's sources resolve (lpq.models.hub.resolve: local folders complete, built-ins
    known). A packed lpq export is checked by its own loader."""
    from lpq.eval.settings import check_paths
    from lpq.export.settings import export_kind
    from lpq.models.hub import ModelConfig, model_kind, resolve

    if candidate_id is not None and not candidate_id.strip():
        raise ValueError("--candidate is empty: give a checkpoint folder (e.g. an lpq export)")
    if (recipe.quant is None) == (candidate_id is None):
        raise ValueError("give exactly one candidate: a `quant:` section in the recipe (quantize the model on "
                         "the fly) or --candidate DIR (a second checkpoint, e.g. an lpq export)")
    kind = model_kind(recipe.model)       # resolves model.id: a baseline that cannot load fails here
    check_paths(recipe.eval)
    if "video" in recipe.eval.tasks and kind != "wan":
        raise ValueError(f"task 'video' needs a Wan pipeline; {recipe.model.id} is a causal LM")
    if candidate_id is not None and export_kind(candidate_id) in (None, "fake"):
        resolve(ModelConfig(id=candidate_id, dtype=recipe.model.dtype, trust_remote_code=recipe.model.trust_remote_code),
                key="--candidate")


def run(recipe, out: Path, candidate_id: str | None = None) -> dict:
    """Load the baseline, make or load the candidate, and run the paired evaluation (after check_models)."""
    import copy

    from lpq.config import to_dict
    from lpq.models.hub import load_model

    base = load_model(recipe.model)
    if recipe.quant is not None:
        from lpq.quant import quantize_model

        candidate = quantize_model(copy.deepcopy(base.model), recipe.quant)
    else:
        candidate = _load_candidate(candidate_id, recipe.model)
    provenance = {**to_dict(recipe), "candidate": candidate_id or "quant section"}
    if base.kind == "wan":
        from lpq.eval.video import run_paired_video

        return run_paired_video(base.model, candidate, recipe.eval, out, model_name=base.name, recipe=provenance)
    if candidate_id is not None:
        _check_same_model(base, candidate, candidate_id)
    from lpq.eval.paired import run_paired

    return run_paired(base.model, candidate, base.tokenizer, recipe.eval, out, model_name=base.name,
                      recipe=provenance)


# What a quantized version of the baseline shares with it (checked before any item is scored).
SAME_MODEL_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")


def _check_same_model(base, candidate, candidate_id: str) -> None:
    """A second checkpoint must be the baseline quantized: both are fed the baseline's tokenizer and
    compared position by position, which means nothing for another vocabulary or model."""
    for key in SAME_MODEL_KEYS:
        theirs, ours = getattr(candidate.config, key, None), getattr(base.model.config, key, None)
        if theirs != ours:
            raise ValueError(f"--candidate {candidate_id} is not {base.name} quantized: its {key} is {theirs!r}, "
                             f"the baseline's {ours!r}; give the checkpoint lpq made from this model")


def _load_candidate(candidate_id: str, base_cfg):
    """A packed lpq export (lpq_export.json) through lpq.export, anything else like the baseline."""
    from lpq.export.settings import export_kind
    from lpq.models.hub import ModelConfig, load_model

    kind = export_kind(candidate_id)
    if kind is not None and kind != "fake":
        from lpq.export import load_quantized

        return load_quantized(candidate_id)
    # Fake-quantized exports are plain transformers/diffusers folders.
    return load_model(ModelConfig(id=candidate_id, dtype=base_cfg.dtype,
                                  trust_remote_code=base_cfg.trust_remote_code)).model


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_command(
        out: Path = typer.Option(..., "--out", help="output folder: results.json, report.md, deltas.png, items/"),
        config: Path | None = typer.Option(None, "--config", help="recipe YAML with model:, quant:, eval: sections"),
        model: str | None = typer.Option(None, "--model", help="override model.id (built-in, local dir, hub id)"),
        candidate: str | None = typer.Option(None, "--candidate",
                                             help="compare against this checkpoint instead of quantizing on the fly"),
        tasks: str | None = typer.Option(None, "--tasks", help="comma list: mmlu,gsm8k,gpqa,math500,wikitext2,video"),
        limit: int | None = typer.Option(None, "--limit", help="items per task (seeded subset, same for both)"),
        data_dir: Path | None = typer.Option(None, "--data-dir", help="folder in the ../shared/data layout"),
        kl: bool | None = typer.Option(None, "--kl/--no-kl", help="distribution shift (KL, top-1) on eval.kl_text"),
        cache: bool | None = typer.Option(None, "--cache/--no-cache", help="reuse the cached baseline run"),
        vbench_python: str | None = typer.Option(None, "--vbench", help="python of a venv with vbench: also run VBench"),
        force: bool = typer.Option(False, "--force", help="start over in an --out folder that another lpq recipe wrote"),
    ) -> None:
        """Evaluate a model against its quantized version: paired per-item comparison, CIs, report."""
        from lpq.config import ConfigError
        from lpq.export import CheckpointError
        from lpq.export.settings import refuse_runtime_export

        given = {"--model": model, "--limit": limit, "--data-dir": str(data_dir) if data_dir else None,
                 "--tasks": [t.strip() for t in tasks.split(",") if t.strip()] if tasks is not None else None,
                 "--kl/--no-kl": kl, "--cache/--no-cache": cache, "--vbench": vbench_python}
        overrides = {OPTION_KEYS[option]: v for option, v in given.items() if v is not None}
        from lpq.outputs import claim_output, recipe_fingerprint, refuse_input_folders

        try:
            recipe = _load_recipe(config, overrides)
            # Exports for another runtime are refused before any folder or model (load_quantized would too).
            for folder in (recipe.model.id, candidate):
                if folder is not None:
                    refuse_runtime_export(folder)
            check_models(recipe, candidate)
            refuse_input_folders(out, {"model.id": recipe.model.id, "--candidate": candidate})
            # lpq.outputs' rules: never a folder lpq did not write; another recipe's only with --force.
            # The recipe format's version is not part of what a run computes (lpq.schema).
            fingerprint = recipe_fingerprint({"recipe": recipe, "candidate": candidate}, ignore=["recipe.version"])
            with claim_output(out, fingerprint=fingerprint, force=force, command="lpq eval"):
                run(recipe, out, candidate)
        except (ConfigError, FileNotFoundError, ValueError, CheckpointError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
