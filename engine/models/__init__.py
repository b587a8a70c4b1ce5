"""Model code: config.json -> ModelConfig (config.py, layer_kinds.py, rope_config.py), the decoder
(decoder.py over layers.py and blocks.py), and the safetensors loader (loader.py)."""
from rast_engine.models.config import ModelConfig
from rast_engine.models.decoder import CausalLM
from rast_engine.models.loader import load_model

__all__ = ["ModelConfig", "CausalLM", "load_model"]
