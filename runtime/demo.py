"""`make serve`: start `epd serve tiny`, answer one real multimodal chat request, then keep serving.

Set EPD_DEMO_ONCE=1 to stop the server after the first answer (used by the tests).
"""
from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
from PIL import Image, ImageDraw


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _picture_url() -> str:
    image = Image.new("RGB", (224, 224), (200, 40, 40))
    ImageDraw.Draw(image).ellipse((40, 40, 180, 180), fill=(30, 30, 220))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _wait_ready(base: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited early with code {proc.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    sys.exit(f"the server was not ready after {timeout_s:.0f}s")


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
    port = int(os.environ.get("EPD_PORT") or _free_port())
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "serve", "tiny", "--host", "127.0.0.1",
                             "--port", str(port)])
    try:
        _wait_ready(base, proc)
        _ask(base)
        if os.environ.get("EPD_DEMO_ONCE"):
            return
        print(f"serving the tiny model at {base}/v1 (OpenAI) and {base}/generate (SGLang); Ctrl-C stops",
              flush=True)
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
