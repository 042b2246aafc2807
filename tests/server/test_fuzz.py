"""Schema-driven fuzzing: schemathesis generates requests from the app's own OpenAPI document, valid
and invalid, and sends them to the app in-process (ASGI). No input may produce a 5xx, and every
refusal must carry OpenAI's error shape.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.python import asgi

from tests.server.live import load_tiny
from ttedge.config import ServerSettings
from ttedge.server.app import create_app

EXAMPLES = {GenerationMode.POSITIVE: 40, GenerationMode.NEGATIVE: 40}


@pytest.fixture(scope="module")
def schema(tiny_chat: Path) -> Iterator[schemathesis.schemas.BaseSchema]:
    # A 64-token context bounds every generation a fuzzed request can ask for.
    app = create_app(load_tiny(tiny_chat, max_model_len=64), ServerSettings(max_body_bytes=64 * 1024))
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    asgi.shutdown_lifespans()  # stops the engine thread the ASGI client's lifespan started


@pytest.mark.parametrize("mode", list(EXAMPLES), ids=lambda mode: mode.value)
def test_no_input_makes_the_server_fail(schema: schemathesis.schemas.BaseSchema, mode: GenerationMode):
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 6
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and not operation.body:
            continue  # a request without a body (or with only a string path parameter) cannot be malformed

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES[mode],
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: schemathesis.Case) -> None:
            response = case.call()
            assert response.status_code < 500, (case.as_curl_command(), response.text)
            if response.status_code >= 400:
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"}, response.text

        check()
