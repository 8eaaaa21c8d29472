"""Recipes shipped with modiff-quant (YAML files; `modiff_quant.shipped_recipes()` lists them)."""
