"""The README's main job (`make serve` runs `python -m runtime.quickstart`) starts the shapes model's server
and answers questions about a picture correctly."""
from __future__ import annotations

import os
import subprocess
import sys

from runtime.quickstart import QUESTIONS


def test_demo_serves_and_answers_right():
    env = os.environ | {"EPD_DEMO_ONCE": "1"}
    done = subprocess.run([sys.executable, "-m", "runtime.quickstart"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for question, right in QUESTIONS:
        assert f"{question} -> {right!r} (right answer: {right!r}" in done.stdout, done.stdout
