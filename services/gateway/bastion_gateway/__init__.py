"""The gateway: OpenAI-compatible HTTP API, auth, admission, streaming to the client."""
