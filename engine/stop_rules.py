"""When a sequence stops, as vLLM's rules: an EOS token (unless ignore_eos) or one of stop_token_ids,
max_tokens or the context's end (max_model_len), or a stop string in its detokenised text. The scheduler
checks lengths to plan steps ahead; the engine checks every rule after each token it takes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rast_engine.sequence import Sequence


@dataclass
class StopRules:
    max_model_len: int
    eos_token_ids: frozenset[int]
    # the generation config's eos ids other than the model's EOS: vLLM makes them stop_token_ids, so an
    # output they end names them as its stop_reason
    named_eos_ids: frozenset[int] = frozenset()

    def stop_token(self, seq: Sequence) -> bool:
        """Whether the newest known token is an EOS (unless ignore_eos) or one of stop_token_ids."""
        params = seq.params
        token = seq.token_ids[seq.num_known - 1]
        return (not params.ignore_eos and token in self.eos_token_ids) or token in params.stop_token_ids

    def at_length(self, seq: Sequence, pending: bool = False) -> bool:
        """Whether the known tokens (with ``pending``: all of them) reach max_tokens or max_model_len."""
        length = len(seq.token_ids) if pending else seq.num_known
        return length - seq.num_prompt_tokens >= seq.params.max_tokens or length >= self.max_model_len

    def ends_by_token(self, seq: Sequence) -> bool:
        """Whether the sequence stops after its newest token for a reason that needs no text: an EOS or
        stop token, max_tokens or max_model_len (stop strings need the detokenised text)."""
        return self.stop_token(seq) or self.at_length(seq)

    def check(self, seq: Sequence, prev_text_len: int) -> Optional[str]:
        """The finish reason after the sequence's newest token, if any; trims what follows a matched
        stop string from ``seq.output_text``, and the string too unless include_stop_str_in_output.
        ``prev_text_len`` is the text length before it."""
        token = seq.token_ids[seq.num_known - 1]
        if not seq.params.ignore_eos and token in self.eos_token_ids:
            if token in self.named_eos_ids:
                seq.stop_reason = token
            return "stop"  # as vLLM: the model's EOS names no stop_reason
        if token in seq.params.stop_token_ids:
            seq.stop_reason = token
            return "stop"
        # as vLLM, stop strings count only once the output is longer than min_tokens
        stops = seq.params.stop_list if seq.num_known - seq.num_prompt_tokens > seq.params.min_tokens else []
        if stops:
            # only matches that end in the newest text: one ending earlier was found by an earlier check, or
            # lies in the text of the first min_tokens tokens, where vLLM matches nothing either
            hits = [(i, -len(s)) for i, s in ((seq.output_text.find(s, max(prev_text_len - len(s) + 1, 0)), s)
                                              for s in stops) if i >= 0]
            if hits:
                at, minus_len = min(hits)  # the earliest match, the longest of those starting there
                seq.stop_reason = seq.output_text[at:at - minus_len]
                seq.output_text = seq.output_text[:at - minus_len if seq.params.include_stop_str_in_output else at]
                return "stop"
        return "length" if self.at_length(seq) else None
