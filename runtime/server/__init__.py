"""The HTTP server: OpenAI-compatible and SGLang-native APIs over one `Deployment` (runtime.cluster).

- app: the fastapi app, its lifespan and `run_server`; cli: the `epd serve` flags → `ServerConfig` (config).
- openai_api / openai_protocol: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.
- sglang_api / sglang_protocol: `/generate`, `/tokenize`, `/get_model_info`, `/flush_cache`, ...
- epd_api, image_store: `/epd/images` and `/epd/end_session`, for `epd.RuntimeEndpoint`.
- serving: what both APIs share (image loading, prompt preparation under limits, streams).
- media (image URLs and files under a policy), security (API key), errors (OpenAI-style bodies),
  metrics (`/metrics`), sse; process: run `epd serve` as a child process (tests, benchmarks, quickstart).
"""
