"""The public HTTP edge: the seed REST/SSE chat API on FastAPI."""
