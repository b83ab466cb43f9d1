"""The serving engine (continuous batching over a KV cache) and the OpenAI-compatible HTTP server."""
