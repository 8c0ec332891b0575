"""`make serve` stand-in until the HTTP server lands: offline generation on the embedded tiny model."""
from __future__ import annotations

import logging
import time

from epdlang.sampling import SamplingParams
from runtime.engine import Engine
from runtime.tiny_model import ensure_tiny_model


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (224, 224), (200, 40, 40))
    ImageDraw.Draw(image).ellipse((40, 40, 180, 180), fill=(30, 30, 220))
    engine = Engine(ensure_tiny_model())
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "Describe the picture."}]}]
    t0 = time.perf_counter()
    [out] = engine.generate({"messages": messages}, SamplingParams(max_new_tokens=24))
    print(f"answer ({out.prompt_tokens} prompt tokens, {len(out.token_ids)} new, "
          f"{time.perf_counter() - t0:.2f}s): {out.text!r}")


if __name__ == "__main__":
    main()
