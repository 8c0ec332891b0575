"""`make serve`: start `epd serve tiny`, answer one real multimodal chat request, then keep serving.

Set EPD_DEMO_ONCE=1 to stop the server after the first answer (used by the tests).
"""
from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import time

from PIL import Image, ImageDraw

from runtime.cluster.server_process import free_port, stop, wait_healthy


def _picture_url() -> str:
    image = Image.new("RGB", (224, 224), (200, 40, 40))
    ImageDraw.Draw(image).ellipse((40, 40, 180, 180), fill=(30, 30, 220))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _ask(base: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key="none")
    t0 = time.perf_counter()
    reply = client.chat.completions.create(model="tiny", max_tokens=24, temperature=0, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _picture_url()}},
                                     {"type": "text", "text": "Describe the picture."}]}])
    print(f"\nanswer in {time.perf_counter() - t0:.2f}s "
          f"({reply.usage.prompt_tokens} prompt tokens, {reply.usage.completion_tokens} new): "
          f"{reply.choices[0].message.content!r}\n", flush=True)


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
        print(f"serving the tiny model at {base}/v1 (OpenAI) and {base}/generate (SGLang); Ctrl-C stops",
              flush=True)
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop(proc, grace_s=30)


if __name__ == "__main__":
    main()
