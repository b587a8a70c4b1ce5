"""Model code: config.json -> ModelConfig, the Qwen2/Llama decoder, and the safetensors loader."""
from rast_engine.models.config import ModelConfig
from rast_engine.models.decoder import CausalLM
from rast_engine.models.loader import load_model

__all__ = ["ModelConfig", "CausalLM", "load_model"]
