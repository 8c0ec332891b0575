"""A fixed set of prompts covering text, one image, several images of different sizes and long inputs."""
from __future__ import annotations

import inspect
import json

from images import make_image


def _user(*parts) -> list[dict]:
    content = [{"type": "image", "image": p} if not isinstance(p, str) else {"type": "text", "text": p}
               for p in parts]
    return [{"role": "user", "content": content}]


def parity_prompts() -> dict[str, dict]:
    long_text = inspect.getsource(json)[:2500]
    return {
        "text": {"messages": _user("Write a haiku about the sea.")},
        "raw_prompt": {"prompt": "def fibonacci(n):\n    "},
        "image_224": {"messages": _user(make_image("red", (224, 224)), "Describe this image.")},
        "image_224_blue": {"messages": _user(make_image("blue", (224, 224)), "Describe this image.")},
        "two_images": {"messages": _user(make_image("green", (224, 224)), make_image("yellow", (280, 196)),
                                         "What differs between these?")},
        "image_448x336": {"messages": _user(make_image("purple", (448, 336)), "What is shown?")},
        "system_and_turns": {"messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": [{"type": "image", "image": make_image("orange", (112, 168))},
                                         {"type": "text", "text": "And this?"}]}]},
        "long_text": {"messages": _user("Summarise this code:\n" + long_text)},
    }
