"""Reading and validating JSON request bodies against pydantic models."""

from __future__ import annotations

import asyncio
import json
import unicodedata
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from server.api.errors import BadRequest, PayloadTooLarge, RequestTimeout, Unprocessable
from server.app_keys import SETTINGS

Model = TypeVar("Model", bound=BaseModel)


class RequestBody(BaseModel):
    """Base of every request body: unknown fields refused, no type coercion,
    and no control characters in any text (NUL and friends have no business
    in an address or a password, and some databases refuse them)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    @field_validator("*")
    @classmethod
    def _no_control_characters(cls, value: Any) -> Any:
        if isinstance(value, str):
            for char in value:
                if unicodedata.category(char) == "Cc":
                    raise ValueError(f"must not contain control characters (U+{ord(char):04X})")
        return value


async def read_json(request: web.Request, model: type[Model]) -> Model:
    """Return the body as ``model``; 400, 408, 413 or 422 with the reason otherwise."""
    if request.content_type != "application/json":
        raise BadRequest(
            f"send the body as application/json (got {request.content_type or 'nothing'})"
        )
    timeout_s = request.app[SETTINGS].server.request_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            raw = await request.read()
    except TimeoutError:
        raise RequestTimeout(
            f"the body did not arrive within {timeout_s:g} seconds", code="request_timeout"
        ) from None
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SETTINGS].server.max_body_bytes
        raise PayloadTooLarge(f"the body is larger than {limit} bytes") from None
    except RequestPayloadError:
        # A broken chunk or content encoding: the client's fault, not a 500.
        raise BadRequest("the body could not be read (a broken chunk or encoding)") from None
    except ConnectionResetError:
        # The client went before its body was all there; nobody hears the
        # answer, but the request log says what became of the request.
        raise BadRequest("the connection closed before the body was complete") from None
    try:
        data: Any = json.loads(raw, parse_constant=_not_json, object_pairs_hook=_each_once)
    except (json.JSONDecodeError, UnicodeDecodeError, _NotJson) as err:
        raise BadRequest(f"the body is not valid JSON: {err}", code="malformed_json") from None
    except (ValueError, RecursionError):
        # Numbers with thousands of digits, or nesting thousands deep.
        raise BadRequest(
            "the body is not acceptable JSON (a number too long or nesting too deep)",
            code="malformed_json",
        ) from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object", code="malformed_json")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise Unprocessable(describe_validation_error(err)) from None


class _NotJson(Exception):
    pass


def _each_once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object naming a field twice is refused: readers disagree on which
    value counts (Python's the last, others the first), so what a proxy or a
    log read would not be what the server acted on."""
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        for name, _value in pairs:
            if name in seen:
                raise _NotJson(f"the field '{name[:40]}' is given more than once")
            seen.add(name)
    return data


def _not_json(name: str) -> Any:
    """Python's reader takes NaN, Infinity and -Infinity; JSON has no such numbers."""
    raise _NotJson(f"{name} is not a JSON number")


def describe_validation_error(err: ValidationError) -> str:
    """Name the first bad field and what is wrong with it, without echoing values."""
    first = err.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    message = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "missing":
        return f"field {where!r} is required"
    if first["type"] == "extra_forbidden":
        return f"field {where!r} is not expected here"
    return f"field {where!r}: {message}"
