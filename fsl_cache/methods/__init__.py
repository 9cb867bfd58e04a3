"""Stage-two methods: a registry of small classes that fit heads on cached tensors."""

from ..training import FitTask, Head, TaskInfo, TrainSettings, seeded_init
from .base import FitResult, Method
from .options import ConfigError, MethodConfig, OptionInfo, TrainOptions
from .registry import MethodInfo, check_option_names, get_method, list_methods, register_method

__all__ = [
    "ConfigError",
    "FitResult",
    "FitTask",
    "Head",
    "Method",
    "MethodConfig",
    "MethodInfo",
    "OptionInfo",
    "TaskInfo",
    "TrainOptions",
    "TrainSettings",
    "check_option_names",
    "get_method",
    "list_methods",
    "register_method",
    "seeded_init",
]
