"""falcon-align's own Falcon-H1: HF-checkpoint exact, packed-exact, cache-exact."""

from .cache import FalconH1HybridCache
from .config import ConfigError, FalconH1Config
from .modeling import FalconH1ForCausalLM, FalconH1Model, FalconH1PreTrainedModel
from .presets import PRESETS, preset_config

__all__ = [
    "ConfigError",
    "FalconH1Config",
    "FalconH1ForCausalLM",
    "FalconH1HybridCache",
    "FalconH1Model",
    "FalconH1PreTrainedModel",
    "PRESETS",
    "preset_config",
]
