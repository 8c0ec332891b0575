"""Shared fixtures: the cached tiny checkpoint, its processor and a transformers reference model."""
from __future__ import annotations

from pathlib import Path

import pytest

from images import make_image
from runtime.preprocess import Processor
from runtime.tiny_model import ensure_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return ensure_tiny_model("tiny")


@pytest.fixture(scope="session")
def processor(tiny_model_dir: Path) -> Processor:
    return Processor(tiny_model_dir)


@pytest.fixture(scope="session")
def hf_model(tiny_model_dir: Path):
    """transformers' Qwen2VLForConditionalGeneration on the tiny checkpoint (fp32, eval)."""
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype="float32").eval()


@pytest.fixture
def red_image():
    return make_image("red")


@pytest.fixture
def blue_image():
    return make_image("blue")
