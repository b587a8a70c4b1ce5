"""vLLM's pause_generation / resume_generation / is_paused, the fence RL loops put around a weight update
(LLMEngine.load_weights) while requests are in flight.

Modes, as vLLM's:
- "abort": every unfinished request ends now; its last output (finish_reason "abort", with the tokens it
  had) is returned;
- "wait": the unfinished requests run to their end first (this engine: step() until none is left, their
  outputs returned; the server steps and streams them itself, holding new requests back meanwhile);
- "keep": the batch on the device finishes and its outputs are returned; the requests keep their KV and
  go on after resume_generation, under whatever weights are loaded then (vLLM's in-flight weight update:
  their later tokens attend to KV the old weights computed).
clear_cache (abort, wait; ignored by keep, as in vLLM) empties the prefix cache once no block is held.

Invariants while paused:
- nothing runs on the device: step() raises, add_request queues (the requests run after resume);
- load_weights is allowed with requests kept; each load starts a new prefix-cache root
  (WeightUpdates.weights_root), so no block computed before it is offered to a request added after it.
"""
from __future__ import annotations

from typing import Any, Optional

from rast_engine.errors import RastError
from rast_engine.outputs import RequestOutput

PAUSE_MODES = ("abort", "wait", "keep")


class Pausing:
    """Mixed into LLMEngine."""
    _paused: bool = False
    groups: dict[str, Any]
    _in_flight: Any
    _undelivered: list[RequestOutput]

    def pause_generation(self, *, mode: str = "abort", clear_cache: bool = True) -> list[RequestOutput]:
        """Stop running requests (module docstring); the outputs this produced, to hand to their callers.
        Pausing a paused engine changes nothing and returns nothing, as in vLLM."""
        if mode not in PAUSE_MODES:
            raise RastError(f"mode must be one of {PAUSE_MODES}, got {mode!r}", param="mode")
        if self._paused:
            return []
        outputs: list[RequestOutput] = []
        try:
            if mode == "wait":
                while self.has_unfinished_requests():
                    outputs += self.step()
            self._paused = True
            outputs += self._land_no_launch()
        except BaseException:  # the failed step was undone (LLMEngine.step): nothing is paused, and the
            self._paused = False  # outputs of the steps before it are delivered by the next step
            self._undelivered = outputs + self._undelivered
            raise
        if mode == "abort":
            outputs += self._abort_all()
        if mode != "keep" and clear_cache:
            self.reset_prefix_cache()
        return outputs

    def resume_generation(self) -> None:
        self._paused = False

    def is_paused(self) -> bool:
        return self._paused

    def _land_no_launch(self) -> list[RequestOutput]:
        """The batch still on the device, finished and committed; step() launches nothing after it while
        paused. Outputs a failed step kept are delivered too."""
        if self._in_flight is None:
            outputs, self._undelivered = self._undelivered, []
            return outputs
        return self.step()

    def _abort_all(self) -> list[RequestOutput]:
        outputs = []
        for group in list(self.groups.values()):
            self.abort_request(group.request_id)
            out = group.output()  # never None: each sequence reports its finish
            out.finished = True  # also where an n > 1 request had not forked yet (its one sample reports)
            outputs.append(out)
        return outputs

    def _paused_refusal(self) -> Optional[str]:
        if self._paused and self._in_flight is None:
            return "the engine is paused (pause_generation): call resume_generation() to run requests"
        return None
