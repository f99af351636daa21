"""The recipe `lpq eval --config` reads: `model:`, optional `quant:`, `eval:`."""
from __future__ import annotations

from dataclasses import dataclass, field

from lpq.eval.settings import EvalSettings
from lpq.models.hub import ModelConfig
from lpq.quant.recipe import QuantRecipe
from lpq.schema import RecipeVersion, recipe_version


@dataclass
class EvalRecipe:
    version: RecipeVersion = RecipeVersion.V1
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantRecipe | None = None      # quantize a copy of the model on the fly; None: use --candidate
    eval: EvalSettings = field(default_factory=EvalSettings)

    def __post_init__(self) -> None:
        self.version = recipe_version(self.version)
