"""modiff-quant: MoDiff (modulated quantization of temporal differences) for diffusion models.

Quantize the change of each layer's input between denoising steps instead of the input itself,
with error compensation, on top of any base quantizer, driven by YAML recipes.
"""

from .api import branch, calibrate, convert, plan_of, prepare, reset, sampling, set_execution
from .base_quantizer import ActivationQuantizer, BaseQuantizer, UnsupportedSetting
from .observers import Observer
from .oneshot import oneshot
from .pipelines import attach
from .quant import Granularity, QuantSpec
from .recipe import Recipe, RecipeError, load_recipe, shipped_recipes
from .registry import register_base_quantizer, register_observer, register_scheme
from .schemes import Scheme
from .serialization import LoadError, load_quantized, save_quantized
from .version import __version__ as __version__

__all__ = [
    "ActivationQuantizer",
    "BaseQuantizer",
    "Granularity",
    "LoadError",
    "Observer",
    "QuantSpec",
    "Recipe",
    "RecipeError",
    "Scheme",
    "UnsupportedSetting",
    "attach",
    "branch",
    "calibrate",
    "convert",
    "load_quantized",
    "load_recipe",
    "oneshot",
    "plan_of",
    "prepare",
    "register_base_quantizer",
    "register_observer",
    "register_scheme",
    "reset",
    "sampling",
    "save_quantized",
    "set_execution",
    "shipped_recipes",
]
