"""The OpenAI-compatible HTTP server: protocol models, FastAPI app, Prometheus metrics, cost."""
