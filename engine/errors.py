"""Errors a user can fix (bad path, bad parameter, mismatched models). The CLI prints them as one line,
without a traceback; library users catch them as ValueError subclasses."""
from __future__ import annotations


class RastError(ValueError):
    """A user-facing error with a clear, actionable message; ``param`` names the request field at fault
    when it is not the prompt (the server's 400 reports it)."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ModelLoadError(RastError):
    """A model directory is missing, incomplete or inconsistent with the other models."""


class NoAdmissibleToken(RuntimeError):
    """A draw found no token to sample: every combined logit of its row was NaN or infinite (non-finite
    logits from a model, or λ·(R − S) overflowing float32). The step is undone, as for any runner error;
    ``request_ids`` names the requests whose draws failed, so a caller can abort just those and step on.
    ``rows`` are the failed rows of the step's results until the engine resolves them to requests;
    ``self_masked`` are those of ``request_ids`` whose own constraints mask tokens (the likelier cause,
    so the server answers them 400, the others 500)."""

    def __init__(self, rows: list[int], request_ids: tuple[str, ...] = (),
                 self_masked: tuple[str, ...] = ()) -> None:
        self.rows, self.request_ids, self.self_masked = rows, request_ids, self_masked
        who = f"requests {list(request_ids)}: " if request_ids else ""
        super().__init__(f"{who}the sampler found no admissible token (every combined logit is NaN or "
                         "infinite, or masked by the request's own constraints: allowed_token_ids, bad_words, "
                         "plausibility_alpha with any of these, or a structured output finished while min_tokens "
                         "masks EOS); the step was undone: abort "
                         "these requests to serve the others")


class RequestFailed(RastError):
    """A request's own code failed inside a step: one of its logits processors raised, or returned what is no
    logits row (engine/logits_processors.py; the original error is the ``__cause__``). The step is undone, as
    for any runner error; ``request_ids`` names the request, so a caller can abort it and step on (the
    server does, answering that request 500 and serving the others)."""

    def __init__(self, message: str, request_ids: tuple[str, ...], *, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.request_ids = request_ids
