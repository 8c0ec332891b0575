"""Synthetic scenes of coloured shapes (`scene`) and the trainer of a small Qwen2-VL that answers questions
about them (`train`, with the training-only `probe`). No trained checkpoint ships yet: see
docs/shapes_model.md for the recipe, what it reached, and what is left."""
