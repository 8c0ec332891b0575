"""`make serve`: start `epd serve tiny` (the trained embedded shapes model), ask it about a picture it has never
seen, print its answers beside the right ones, then keep serving.

Set EPD_DEMO_ONCE=1 to stop the server after the first answer (used by the tests).
"""
from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import time

from runtime.cluster.server_process import free_port, stop, wait_healthy
from runtime.shapes.scene import Scene, Shape, describe

# Placed by hand (no training or held-out seed draws it), at sizes training draws for two shapes.
PICTURE = Scene(320, 224, "white", (Shape("circle", "red", 40, 70, 64), Shape("square", "blue", 200, 60, 70)))
QUESTIONS = (("What color is the square?", "blue"), ("How many shapes are there?", "2"),
             ("Describe the image.", describe(PICTURE)))


def _picture_url() -> str:
    buf = io.BytesIO()
    PICTURE.image().save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _ask(base: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key="none")
    model = client.models.list().data[0].id
    for question, right in QUESTIONS:
        t0 = time.perf_counter()
        reply = client.chat.completions.create(model=model, max_tokens=48, temperature=0, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _picture_url()}},
                                         {"type": "text", "text": question}]}])
        print(f"{question} -> {reply.choices[0].message.content!r} (right answer: {right!r}; "
              f"{time.perf_counter() - t0:.2f}s, {reply.usage.prompt_tokens} prompt tokens, "
              f"{reply.usage.completion_tokens} new)", flush=True)


def main() -> None:
    port = int(os.environ.get("EPD_PORT") or free_port())
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "serve", "tiny", "--host", "127.0.0.1",
                             "--port", str(port)])
    try:
        try:
            wait_healthy(base, proc, timeout_s=300)
        except RuntimeError as e:
            sys.exit(str(e))
        _ask(base)
        if os.environ.get("EPD_DEMO_ONCE"):
            return
        print(f"serving tiny (the trained shapes model) at {base}/v1 (OpenAI) and {base}/generate (SGLang); "
              "Ctrl-C stops", flush=True)
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop(proc, grace_s=30)


if __name__ == "__main__":
    main()
