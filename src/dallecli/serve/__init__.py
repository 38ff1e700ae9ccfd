"""``dalle serve``: models kept warm behind the OpenAI Images API, the AUTOMATIC1111 API and a web page.

Modules, one job each: ``config`` (the server's settings and the bind rule), ``auth`` (API key and signed file
links), ``errors`` (OpenAI-style error bodies), ``pool`` (engines loaded on first use, unloaded when idle or over
the memory budget), ``batcher`` (the bounded queue and dynamic batching on one worker thread), ``openai_api``,
``a1111_api``, ``page_api`` (the web page's routes and ``/files``), ``app`` (the FastAPI app factory) and
``client`` (``dalle generate --server``). Importing this package imports neither FastAPI nor torch.
"""
