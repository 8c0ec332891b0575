"""The README's main job (`make serve` runs `python -m runtime.quickstart`) starts the server and answers."""
from __future__ import annotations

import os
import subprocess
import sys


def test_demo_serves_and_answers(tiny_model_dir):
    env = os.environ | {"EPD_DEMO_ONCE": "1"}
    done = subprocess.run([sys.executable, "-m", "runtime.quickstart"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "answer in" in done.stdout and "96 prompt tokens, 24 new" in done.stdout
