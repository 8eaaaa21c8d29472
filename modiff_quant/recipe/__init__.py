"""YAML recipes mapping layers to bit-widths, schemes and base quantizers (schema version 1)."""

from ..settings import FirstStep, LayerSettings, StepSchedule, TimestepGroups
from .resolve import BlockPlan, LayerPlan, Plan
from .schema import Recipe, Rule, flat_recipe, load_recipe, shipped_recipes
from .source import Location, RecipeError

__all__ = [
    "BlockPlan",
    "FirstStep",
    "LayerPlan",
    "LayerSettings",
    "Location",
    "Plan",
    "Recipe",
    "RecipeError",
    "Rule",
    "StepSchedule",
    "TimestepGroups",
    "flat_recipe",
    "load_recipe",
    "shipped_recipes",
]
