"""The modes the decode suite (bench/decode.py) runs, in this order per pairing, and each engine mode's flags.

``base`` the large model alone in our engine; ``rast-seq`` the forks' design (models one after another,
eager, outputs processed between steps); ``rast`` streams + CUDA graphs + async outputs, the small pair
as one batched forward, each step launched before the previous step's ids are read; ``rast-unstacked``
the same with the pair as two forwards (what stacking buys); ``rast-no-ahead`` the same without async
scheduling (what launching ahead buys); ``rast-spec`` speculative rounds of 4 drafts (a step is a round;
its rows also project tokens/s at trained acceptance rates, see decode_runs.spec_round); ``base-fp8`` and
``rast-fp8`` ``base`` and ``rast`` with the large model's projections in FP8; ``hf-rast`` the peer
(three HF transformers models, each with its own DynamicCache, run one after another, logits combined
and sampled in torch).
"""
from __future__ import annotations

MODES = ("base", "rast-seq", "rast", "rast-unstacked", "rast-no-ahead", "rast-spec", "base-fp8", "rast-fp8", "hf-rast")
_FAST = dict(enforce_eager=False, model_streams=True, async_output=True, async_scheduling=True)
# pair: the mode has the small pair; stack: the pair runs as one batched forward (models.stacked)
ENGINE_MODES = {"base": dict(_FAST, pair=False, stack=True),
                "rast-seq": dict(enforce_eager=True, model_streams=False, async_output=False, async_scheduling=False,
                                 pair=True, stack=False),
                "rast": dict(_FAST, pair=True, stack=True),
                "rast-unstacked": dict(_FAST, pair=True, stack=False),
                "rast-no-ahead": dict(_FAST, async_scheduling=False, pair=True, stack=True),
                # speculative rounds (engine/speculative): graphs up to batch 64, no async scheduling, γ = SPEC_GAMMA drafts
                "rast-spec": dict(_FAST, async_scheduling=False, pair=True, stack=True, spec=True),
                # the large model's projections in FP8 (quantization="fp8"): half their bytes
                "base-fp8": dict(_FAST, pair=False, stack=True, fp8=True),
                "rast-fp8": dict(_FAST, pair=True, stack=True, fp8=True)}
