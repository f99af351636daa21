"""Training data: text/JSONL corpora cut into fixed-length token blocks, and a deterministic batch plan.

The batch plan maps (step, micro-batch, rank) to sample indices with a seeded permutation per epoch, so
the data order is a pure function of the step: a resumed run sees exactly the batches it would have seen,
and ranks read disjoint slices of each global batch without a stateful sampler.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lpq.data.files import json_records, read_user_text
from lpq.train.recipe import PYDOC_TOPICS, DataConfig, DataKind


def read_texts(cfg: DataConfig) -> list[str]:
    """The documents named by `cfg.paths`, in order: .txt files whole, .jsonl / .json one record each."""
    texts: list[str] = []
    for entry in cfg.paths:
        if entry == PYDOC_TOPICS:
            from pydoc_data.topics import topics

            texts.extend(topics[k] for k in sorted(topics))
            continue
        if not Path(entry).expanduser().exists():
            raise FileNotFoundError(f"data.paths: {entry} does not exist (or use {PYDOC_TOPICS!r})")
        path, text = read_user_text(entry, "data.paths")
        if path.suffix in (".jsonl", ".json"):
            texts.extend(_json_texts(path, text, cfg.text_field))
        else:
            texts.append(text)
    if not any(t.strip() for t in texts):
        raise ValueError(f"data.paths {cfg.paths} hold no text")
    return texts


def _json_texts(path: Path, text: str, key: str) -> list[str]:
    out = []
    for i, rec in json_records(path, text):
        if not isinstance(rec, dict) or not isinstance(rec.get(key), str):
            raise ValueError(f"{path}:{i}: record has no string field {key!r} (set data.text_field)")
        out.append(rec[key])
    return out


def tokenize_blocks(texts: list[str], tokenizer, seq_len: int) -> Tensor:
    """Concatenate the documents (EOS between them) and cut into (N, seq_len) int64 blocks; the tail is dropped."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"the corpus has {len(ids)} tokens, fewer than one block of seq_len={seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


@dataclass
class TextSplits:
    train: Tensor    # (N_train, seq_len)
    eval: Tensor     # (N_eval, seq_len)


def text_splits(cfg: DataConfig, tokenizer) -> TextSplits:
    """Hold out the last `eval_blocks` blocks (a contiguous stretch of text never seen in training); a
    `mix` holds out the same way in every domain."""
    if cfg.mix is not None:
        return mix_splits(cfg, tokenizer)
    blocks = tokenize_blocks(read_texts(cfg), tokenizer, cfg.seq_len)
    if len(blocks) <= cfg.eval_blocks:
        raise ValueError(f"the corpus gives {len(blocks)} blocks of {cfg.seq_len} tokens; need more than "
                         f"data.eval_blocks={cfg.eval_blocks} to keep some for training")
    train, held_out = blocks[: -cfg.eval_blocks], blocks[-cfg.eval_blocks:]
    if cfg.train_blocks is not None:
        train = train[: cfg.train_blocks]
    return TextSplits(train, held_out)


def check_text_files(cfg: DataConfig) -> None:
    """Fail early (before the output folder and any model), naming the file and line, when a text
    corpus (`paths`) cannot be read or parsed: the files are read here once more than training needs."""
    if cfg.kind is DataKind.TEXT and cfg.mix is None:
        read_texts(cfg)


def check_mix_files(cfg: DataConfig) -> None:
    """Fail early (before any model is loaded), naming the file, when a mix domain's data is missing."""
    from lpq.train.domains import resolve_root, train_files

    root = resolve_root(cfg.data_dir, "data")
    for name in cfg.mix or {}:
        for path in train_files(name, root):
            if not path.is_file():
                raise FileNotFoundError(f"data.mix: domain {name!r} needs {path}, which does not exist "
                                        "(set data.data_dir or $LPQ_DATA_DIR)")


def mix_splits(cfg: DataConfig, tokenizer) -> TextSplits:
    """Per domain of `cfg.mix`, its share (by weight) of the training blocks and of the `eval_blocks`,
    cut from its training part (lpq.train.domains.train_documents) in a fixed order spread over the
    part: the training blocks first, the held-out ones from the text right after them. Training blocks
    are concatenated domain by domain (the batch plan shuffles them); so are the held-out ones."""
    from lpq.data.calibration import domain_shares
    from lpq.train.domains import resolve_root, train_documents

    check_mix_files(cfg)
    root = resolve_root(cfg.data_dir, "data")
    train_shares = domain_shares(cfg.mix, cfg.train_blocks)
    eval_shares = domain_shares(cfg.mix, cfg.eval_blocks)
    train, held_out = [], []
    for name in cfg.mix:
        n_train, n_eval = train_shares[name], eval_shares[name]
        blocks = _first_blocks(train_documents(name, root, tokenizer), tokenizer, cfg.seq_len, n_train + n_eval)
        if blocks is None:
            raise ValueError(f"data.mix: domain {name!r}'s training part holds fewer than {n_train + n_eval} blocks "
                             f"of {cfg.seq_len} tokens ({n_train} training + {n_eval} held out); lower "
                             f"data.seq_len, data.max_train_blocks or its weight")
        train.append(blocks[:n_train])
        held_out.append(blocks[n_train:])
    return TextSplits(torch.cat(train), torch.cat(held_out))


def _first_blocks(docs: list, tokenizer, seq_len: int, count: int) -> Tensor | None:
    """`count` blocks of documents taken in a fixed pseudo-random order (EOS after each, as
    tokenize_blocks), tokenizing only as many as needed; None when all of them hold fewer."""
    eos = tokenizer.eos_token_id
    need = count * seq_len
    ids: list[int] = []
    for i in torch.randperm(len(docs), generator=torch.Generator().manual_seed(0)).tolist():
        doc = docs[i]
        text = doc.read_text(encoding="utf-8", errors="replace") if isinstance(doc, Path) else doc
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if len(ids) >= need:
            return torch.tensor(ids[:need], dtype=torch.long).view(count, seq_len)
    return None


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator whose seed is a fixed function of integer keys (the same in every process)."""
    import numpy as np

    seed = np.random.SeedSequence([k % 2 ** 32 for k in keys]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(seed[0]) << 32 | int(seed[1]))


class BatchPlan:
    """Sample indices of every (step, micro-batch, rank); epoch e uses permutation randperm(seed + e)."""

    def __init__(self, num_samples: int, batch_size: int, grad_accum: int, world_size: int, seed: int):
        if num_samples < 1:
            raise ValueError("no training samples")
        self.n, self.batch, self.accum, self.world, self.seed = num_samples, batch_size, grad_accum, world_size, seed
        self._perms: dict[int, Tensor] = {}

    @property
    def samples_per_step(self) -> int:
        return self.batch * self.accum * self.world

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed + epoch)
            # A batch spans at most two epochs, so two cached permutations are enough.
            self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def indices(self, step: int, micro: int, rank: int) -> list[int]:
        start = step * self.samples_per_step + (micro * self.world + rank) * self.batch
        return [int(self._perm(p // self.n)[p % self.n]) for p in range(start, start + self.batch)]
