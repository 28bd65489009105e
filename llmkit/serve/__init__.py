"""``llmkit serve``: an OpenAI-compatible HTTP front end beside the terminal one (``llmkit/cli``).

- ``engine.py``: the one loop that owns the model; requests wait in a queue and those that can
  share a batch (the same decoding settings) are decoded together;
- ``protocol.py``: OpenAI's request fields as llmkit's decoding settings, errors and response shapes;
- ``server.py``: the loaded checkpoint, its prompts (core's shared prompt policy) and its engine;
- ``api.py``: the FastAPI application: error handlers, the guard (API key, limits), the routes,
  server-sent events;
- ``host.py``: running it: the listening socket, uvicorn in a thread, the engine's loop on the
  main thread (where torch's products are fastest), signals;
- ``page.html``: the chat page served at ``/``.

Core never imports this package; it imports core, as the CLI does.
"""
