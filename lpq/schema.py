"""Conventions every recipe dataclass follows (torch-free; lpq.config reads them from YAML).

* `Choice`: a value from a fixed set of names is a str-valued enum. lpq.config builds it from the YAML
  string and, for any other string, reports the file, line, key and the allowed values; `to_dict`
  writes the string back. It compares equal to, hashes as and prints as its string, so code and
  report text that used the plain string keep working.
* `KeyedError`: a check in a recipe dataclass's `__post_init__` that concerns one of its keys raises it
  with that key (relative to the dataclass), so lpq.config reports the key's line, or the command-line
  option that set it, instead of the section's first line.
* `RecipeVersion`: the `version:` key at the root of every recipe (ptq, train, eval, export; the
  `quant:` section carries it too, as exports store that section alone). A file without it is
  version 1; an unknown version is refused with the allowed ones.
"""
from __future__ import annotations

import enum
from typing import Any, TypeVar

C = TypeVar("C", bound="Choice")


class Choice(str, enum.Enum):
    """A recipe value from a fixed set of names (str() and format() give the name itself, as
    Python 3.11's StrEnum, which 3.10 lacks)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    def __repr__(self) -> str:
        # Error messages quote recipe values with !r: show the name as the recipe spells it.
        return repr(str(self.value))

    @classmethod
    def allowed(cls) -> str:
        return ", ".join(repr(m.value) for m in cls)

    @classmethod
    def parse(cls: type[C], value: Any, key: str) -> C:
        """`value` as a member (what a dataclass built in Python, not from YAML, gets checked with)."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"{key} {value!r} is not allowed; use one of {cls.allowed()}") from None


class KeyedError(ValueError):
    """A recipe value refused by a check about one key (`key`: dotted, relative to the dataclass whose
    check raised it)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class RecipeVersion(int, enum.Enum):
    """The recipe format; bump it (and keep reading the old one) when a key changes meaning."""

    V1 = 1


def recipe_version(value: Any) -> RecipeVersion:
    """`version` of a recipe built in Python (lpq.config has already checked a file's)."""
    try:
        return RecipeVersion(value)
    except ValueError:
        allowed = ", ".join(str(v.value) for v in RecipeVersion)
        raise ValueError(f"recipe version {value!r} is not supported; this lpq reads version {allowed} "
                         f"(a recipe without `version` is version 1)") from None
