"""A request body's bytes to its validated model: JSON errors, unknown fields and bad values answered with an
APIError(400) naming the field; OpenAI's nulls read as "the default"."""
from __future__ import annotations

import json
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from rast_engine.server.api_error import APIError


def _admits_none(annotation: Any) -> bool:
    return annotation is Any or annotation is None or type(None) in get_args(annotation)


def nulls_to_defaults(model: type[BaseModel], data: Any) -> Any:
    """OpenAI marks n, stream, echo, logprobs and the penalties "or null", and its client sends a null
    for an argument left None: null there means the default. A field whose type admits None keeps
    it (max_tokens: null is "the rest of the context"); a required one fails as missing."""
    if not isinstance(data, dict):
        return data
    fields = model.model_fields
    return {key: value for key, value in data.items()
            if value is not None or key not in fields or fields[key].is_required()
            or _admits_none(fields[key].annotation)}


def parse_request(raw: bytes, model_cls: type[BaseModel]) -> Any:
    """Body bytes -> a validated request, or an APIError(400) naming the offending field."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:  # ValueError: JSONDecodeError, or an integer of >4300 digits
        raise APIError(400, f"request body is not valid JSON: {exc}") from None
    except RecursionError:  # a body nested thousands deep: no request is shaped like that
        raise APIError(400, "request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(part) for part in err["loc"])  # the path, for the message (prompt.0)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unrecognised request field"
        # param: the request's own field, as OpenAI names it
        raise APIError(400, f"{where}: {msg}" if where else msg,
                       param=str(err["loc"][0]) if err["loc"] else None) from None
