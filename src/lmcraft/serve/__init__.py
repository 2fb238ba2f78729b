"""`lmcraft serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn, imported only here) over our own decoder.

`batcher.Batcher` queues requests and decodes every waiting one as one batch; `app.build_app` holds the endpoints.
"""
