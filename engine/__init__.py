"""rast_engine: a paged-KV decoding engine running a large base model and small (RL, base) pairs in
lockstep over one block table, sampling softmax((z_M + sum_k λ_k (z_Rk - z_Sk)) / T)."""
from __future__ import annotations

from rast_engine.config import EngineConfig
from rast_engine.llm import LLM
from rast_engine.llm_engine import LLMEngine
from rast_engine.outputs import CompletionOutput, EngineStats, RequestOutput, ScoreOutput
from rast_engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "LLMEngine", "EngineConfig",
           "EngineStats", "ScoreOutput"]
