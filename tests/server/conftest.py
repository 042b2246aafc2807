from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.tiny_checkpoints import (
    SMOLLM2_VOCAB_SIZE,
    random_state_dict,
    smollm2_gguf_path,
    tiny_config,
    write_hf_checkpoint,
)
from tests.server.live import LiveServer, load_tiny


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random model with SmolLM2's tokenizer and chat template; served as model "tiny-chat"."""
    config = tiny_config(vocab_size=SMOLLM2_VOCAB_SIZE, max_position_embeddings=2048)
    return write_hf_checkpoint(
        tmp_path_factory.mktemp("models") / "tiny-chat",
        config,
        random_state_dict(config, seed=0),
        tokenizer_from=smollm2_gguf_path(),
    )


@pytest.fixture(scope="session")
def server(tiny_chat: Path) -> Iterator[LiveServer]:
    """The default server: no API key, 32 running + 64 queued requests."""
    with LiveServer(load_tiny(tiny_chat, max_queue_len=64)) as live:
        yield live
