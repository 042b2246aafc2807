"""The OpenAI-compatible HTTP API: ``create_app`` for an ASGI app, ``build_server`` to run it."""
