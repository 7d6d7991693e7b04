"""The serve stage: Ray Serve hosts a model behind an OpenAI-compatible API."""
