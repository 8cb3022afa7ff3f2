"""Recipes: typed YAML configurations of a fine-tuning run.

``load_recipe("tiny-flux-demo", ["train.max_steps=10"])`` merges the schema defaults, the YAML file
and ``key=value`` overrides into a validated, typed OmegaConf config; every user mistake raises a
one-line :class:`RecipeError`.  The schema (and its documentation) lives in
:mod:`flowtune.recipe.schema`.
"""

from flowtune.recipe.load import (
    BundledRecipe,
    RecipeError,
    all_keys,
    bundled_recipes,
    load_recipe,
    recipe_to_yaml,
    recipes_dir,
    resolve_recipe_path,
)
from flowtune.recipe.schema import Recipe

__all__ = [
    "BundledRecipe",
    "Recipe",
    "RecipeError",
    "all_keys",
    "bundled_recipes",
    "load_recipe",
    "recipe_to_yaml",
    "recipes_dir",
    "resolve_recipe_path",
]
