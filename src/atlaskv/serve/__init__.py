"""Serving: the OpenAI-compatible HTTP server over one KB and one model."""
