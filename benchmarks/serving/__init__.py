"""`epd bench`: synthetic multimodal serving workloads against any OpenAI-compatible endpoint."""
