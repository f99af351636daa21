"""`lpq train` (QAT runs vs a BF16 reference) and `lpq prepare-data` (Wan latent cache)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import typer

# Set by every launcher accelerate/torchrun use: when present we already are one of N processes.
_LAUNCHED_ENV = "WORLD_SIZE"


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("prepare-data")(prepare_data)


def parse_overrides(items: list[str]) -> dict:
    """`--set train.steps=20` -> {"train.steps": 20} (values parsed as YAML, as in recipe files)."""
    from lpq.config import parse_value

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r}: expected KEY=VALUE, e.g. train.steps=20", param_hint="--set")
        out[key.strip()] = parse_value(value)
    return out


def _load(config: Path, overrides: list[str]):
    from lpq.config import ConfigError
    from lpq.train.recipe import load_recipe

    try:
        return load_recipe(config, parse_overrides(overrides))
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


def _check_and_claim(config: Path, recipe, force: bool) -> None:
    """Before any work: protected blocks within the model's depth and sequence lengths within its context
    (from its config, no weights), then the output folder, locked until this process ends (lpq.outputs;
    launched ranks inherit the lock)."""
    from lpq.models.hub import check_blocks, check_context
    from lpq.outputs import claim_output, recipe_fingerprint, refuse_input_folders

    try:
        check_blocks(recipe.model, recipe.quant.protected_blocks if recipe.quant else [])
        lengths = {"data.seq_len": recipe.data.seq_len}
        if recipe.domain_eval is not None:
            lengths["domain_eval.seq_len"] = recipe.domain_eval.seq_len
        check_context(recipe.model, lengths)
        refuse_input_folders(recipe.train.output_dir, {"model.id": recipe.model.id})
        # The recipe format's version is not part of what a run computes (lpq.schema).
        claim_output(recipe.train.output_dir,
                     fingerprint=recipe_fingerprint(recipe, ignore=["train.output_dir", "version"]),
                     force=force, command="lpq train")
    except ValueError as e:
        typer.echo(f"error: {config}: {e}", err=True)
        raise typer.Exit(2) from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(num_processes: int, args: list[str]) -> list[str]:
    """`accelerate launch` of `lpq train` on N local processes (GPUs, or CPU processes with gloo)."""
    import torch

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
           "--num_processes", str(num_processes), "--main_process_port", str(_free_port())]
    if not torch.cuda.is_available():
        cmd += ["--num_cpu_threads_per_process", str(max(1, (os.cpu_count() or 1) // num_processes))]
    return cmd + ["-m", "lpq.cli", "train"] + args


def train(
    config: Path = typer.Option(..., "--config", "-c", help="training recipe (YAML)"),
    overrides: list[str] = typer.Option([], "--set", help="override a recipe key, e.g. --set train.steps=20"),
    num_processes: int | None = typer.Option(None, "--num-processes", "-n",
                                             help="processes to launch with accelerate (default: train.num_processes)"),
    only: str | None = typer.Option(None, "--only", help="train only the run with this label, e.g. 'bf16', "
                                    "'hif8' or 'hif8_delayed' (default: every run of the recipe)"),
    no_resume: bool = typer.Option(False, "--no-resume", help="start over even when checkpoints exist"),
    force: bool = typer.Option(False, "--force", help="start over in an output_dir that another lpq recipe wrote"),
) -> None:
    """Fine-tune with QAT (one run per compared scaling mode) and a BF16 reference run of the same seed;
    write train_report.json."""
    if num_processes is not None and num_processes < 1:
        typer.echo(f"error: --num-processes must be >= 1, got {num_processes}", err=True)
        raise typer.Exit(2)
    recipe = _load(config, overrides)
    from lpq.train.compare import select_runs
    from lpq.train.data import check_text_files

    try:
        select_runs(recipe, only)      # a wrong --only or a missing data file leaves no folder behind
        check_text_files(recipe.data)
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    _check_and_claim(config, recipe, force)
    n = num_processes or recipe.train.num_processes
    if n > 1 and _LAUNCHED_ENV not in os.environ:
        args = ["--config", str(config), "--num-processes", str(n)] + [a for o in overrides for a in ("--set", o)]
        args += (["--only", only] if only else []) + (["--no-resume"] if no_resume else [])
        raise typer.Exit(subprocess.call(launch_command(n, args)))
    from lpq.train.compare import describe, run_training
    from lpq.train.nonfinite import NonFiniteError

    try:
        report = run_training(recipe, resume=not no_resume, only=only)
    except NonFiniteError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(3) from None
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    from lpq.train.loop import process_state

    if process_state().is_main_process:
        typer.echo(describe(report))
        typer.echo(f"report: {recipe.train.output_dir / 'train_report.json'}")


def cache_fingerprint(recipe) -> str:
    """What a latent cache's files depend on: the model and how clips are read and shaped. `limit` is
    not part of it: samples are named by record, so a larger limit continues a smaller one's cache."""
    from lpq.outputs import recipe_fingerprint

    return recipe_fingerprint({"model": recipe.model, "video": recipe.data.video}, ignore=["video.limit"])


def prepare_data(
    config: Path = typer.Option(..., "--config", "-c", help="recipe (YAML) with data.video and data.cache_dir"),
    overrides: list[str] = typer.Option([], "--set", help="override a recipe key"),
    force: bool = typer.Option(False, "--force", help="start over in a cache_dir that another lpq recipe wrote"),
) -> None:
    """Encode captioned video clips into the Wan latent cache (VAE latents + text embeddings)."""
    recipe = _load(config, overrides)
    from lpq.models.hub import load_model, model_kind
    from lpq.outputs import claim_output
    from lpq.train.latents import find_clips, prepare_latent_cache

    # Before the model loads: a Wan pipeline (from its files), the clips (their messages name the captions
    # file), then the cache folder (lpq.outputs' rules: never a folder lpq did not write; another recipe's
    # cache only with --force; locked).
    try:
        kind = model_kind(recipe.model)
        if kind != "wan":
            raise ValueError(f"prepare-data encodes videos for Wan pipelines; {recipe.model.id!r} is a {kind} "
                             f"(text data needs no preparation)")
        if recipe.data.cache_dir is None:
            raise ValueError("data.cache_dir is not set: where should the latents go?")
    except ValueError as e:
        typer.echo(f"error: {config}: {e}", err=True)
        raise typer.Exit(2) from None
    try:
        clips = find_clips(recipe.data.video)
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    try:
        folder = claim_output(recipe.data.cache_dir, fingerprint=cache_fingerprint(recipe), force=force,
                              command="lpq prepare-data")
    except ValueError as e:
        typer.echo(f"error: {config}: {e}", err=True)
        raise typer.Exit(2) from None
    with folder:
        try:
            loaded = load_model(recipe.model)
            manifest = prepare_latent_cache(loaded.model, clips, recipe.data.video, recipe.data.cache_dir,
                                            recipe.model.id)
        except (ValueError, FileNotFoundError, ImportError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
    typer.echo(f"{len(manifest['samples'])} samples in {recipe.data.cache_dir} "
               f"({manifest['missing']} clips not found)")
