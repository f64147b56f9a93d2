"""LLM access (any OpenAI-compatible endpoint), prompts, tolerant answer parsing, test server."""
