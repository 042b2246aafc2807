"""Every error the API returns, in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastapi.responses import JSONResponse

from ttedge.server.protocol import UNSUPPORTED, ErrorDetail, ErrorResponse

# Labels pydantic puts into an error's location for the member of a union that failed.
_UNION_TAGS = frozenset({"str", "int", "float", "bool"})


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type, param=param, code=code)
        self.headers = dict(headers or {})

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=self.detail)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers)


def from_validation(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """One 400 naming the first offending field, from FastAPI's list of pydantic errors."""
    first = errors[0]
    if first["type"] == "json_invalid":
        reason = first.get("ctx", {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON: {reason}", code="invalid_json")
    # A union reports an error per member: the deepest came closest to matching and says most;
    # members failing at the same depth are all named.
    path = max((_path(e["loc"]) for e in errors), key=len)
    reasons = dict.fromkeys(
        str(e["msg"]).removeprefix("Value error, ") for e in errors if _path(e["loc"]) == path
    )
    where = _format_path(path)
    message = f"{where or 'request body'}: {' or '.join(reasons)}"
    if path and str(path[0]) in UNSUPPORTED:
        message += f" ({UNSUPPORTED[str(path[0])]})"
    return APIError(400, message, param=where or None, code="invalid_value")


def for_status(status: int, detail: str, method: str, path: str) -> APIError:
    """Starlette's and FastAPI's own errors (unknown path, wrong method, unparsable body), reshaped."""
    codes = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed"}
    return APIError(status, f"{method} {path}: {detail}", code=codes.get(status, "http_error"))


def _path(loc: Sequence[Any]) -> list[str | int]:
    # loc starts with where the value came from ("body"); union member labels are not fields.
    return [p for p in loc[1:] if isinstance(p, int) or (str(p).isidentifier() and p not in _UNION_TAGS)]


def _format_path(path: list[str | int]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text
