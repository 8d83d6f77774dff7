"""`camelid serve`: an OpenAI-compatible HTTP API and a web chat page over the one engine.

app.py (routes, auth, limits, errors) -> openai_api.py (wire format <-> engine) ->
registry.py (served names) -> scheduler.py (the thread that owns the engine and batches).
"""
