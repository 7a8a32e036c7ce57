"""``gasungbi serve``: an OpenAI-compatible HTTP server with continuous batching.

``scheduler`` (one model, one thread, the running decode batch), ``app`` (FastAPI routes, request
validation, server-sent events), ``protocol`` (request bodies, the OpenAI error shape),
``metrics`` (Prometheus text), ``static/index.html`` (the chat page), ``commands`` (the CLI).
Needs the ``serve`` extra: ``pip install 'gasungbi[serve]'``.
"""
