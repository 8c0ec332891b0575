"""The HTTP server: OpenAI-compatible and SGLang-native APIs over one `Deployment`."""
