"""The OpenAI-compatible HTTP server (`lmstack serve`); build_app is the entry point."""
