"""``gasungbi serve``: an OpenAI-compatible HTTP server with continuous batching.

``scheduler`` (one model, one thread, the running decode batch), ``app`` (the app factory and error
handlers), ``routes`` (the endpoints over ``app.state``), ``respond`` (collect or stream one request),
``openai_format`` (token text, logprobs, response and chunk builders), ``protocol`` (request bodies
and their checks, the OpenAI error shape), ``metrics`` (Prometheus), ``static/index.html`` (the chat
page), ``commands`` (the CLI).
"""
