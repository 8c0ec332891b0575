"""Request front end: chat template, tokenization, image decode/hash/patchify, placeholder expansion.

It uses the model dir's tokenizer and image processor directly (not Qwen2VLProcessor or LlavaProcessor,
which need torchvision), and takes everything model-specific from the model's config object
(`runtime.models.read_config`): the image token id, and the tokens per image (fixed for LLaVA's CLIP
tower; from the patch grid for Qwen2-VL's dynamic resolution). The result is a `PreparedPrompt` whose
image placeholders are already expanded, ready for a `GenerateRequest`.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from epdlang.errors import ImageError, InvalidRequest
from runtime.messages import ImageInput

ImageLike = Any  # str | os.PathLike | bytes | PIL.Image.Image | dict (image / image_url part) | ImageInput
Message = dict[str, Any]
IMAGE_PART_TYPES = ("image", "image_url")
MAX_DECODE_PIXELS = 64 * 1024 * 1024  # refuse to decode larger images (decompression bombs)


@dataclass(frozen=True)
class PreparedPrompt:
    input_ids: tuple[int, ...]  # image pads expanded to each image's num_tokens
    images: tuple[ImageInput, ...] = ()


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _as_tuple(value: int | Sequence[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, int) else tuple(value)


class Processor:
    """Turns chat messages, raw prompts or token ids plus images into a `PreparedPrompt`."""

    def __init__(self, model_dir: str | Path, *, max_pixels: int | None = None, compact_pixels: bool = False) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer

        from runtime.models import read_config
        from runtime.models.qwen2vl_pixels import Qwen2VLPixels

        self.model_dir = Path(model_dir)
        self.model_config = read_config(self.model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.tokens_per_image: int | None = self.model_config.tokens_per_image  # None: by the image's size
        kwargs = {} if max_pixels is None or self.tokens_per_image else {"max_pixels": max_pixels}
        # PIL-based processors: no torchvision is needed (nor installed on CPU machines).
        self.image_processor = AutoImageProcessor.from_pretrained(self.model_dir, backend="pil", **kwargs)
        ip = self.image_processor
        self._fast_pixels = Qwen2VLPixels(ip) if Qwen2VLPixels.supports(ip) else None
        # uint8 pixels for a process that sends them on: the one that runs the tower expands them (`tower_pixels`)
        self.compact_pixels = compact_pixels and self._fast_pixels is not None
        config = _read_json(self.model_dir / "config.json")
        text_config = config.get("text_config", config)
        self.model_type: str = config.get("model_type", "")
        self.vocab_size: int = self.model_config.vocab_size
        self.image_token_id: int = self.model_config.image_token_id
        self.vision_start_id: int | None = config.get("vision_start_token_id")
        self.vision_end_id: int | None = config.get("vision_end_token_id")
        generation = _read_json(self.model_dir / "generation_config.json")
        eos = _as_tuple(generation.get("eos_token_id")) + _as_tuple(text_config.get("eos_token_id"))
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos))
        if self.tokens_per_image:  # a fixed-size tower: every image is resized to the same patch grid
            self.merge_size, self.max_image_tokens = 1, self.tokens_per_image
            return
        self.merge_size: int = self.image_processor.merge_size
        self.max_pixels: int = self.image_processor.size["longest_edge"]
        patch = self.image_processor.patch_size * self.merge_size
        self.max_image_tokens: int = self.max_pixels // (patch * patch)

    # ---- images

    def load_image(self, x: ImageLike) -> Image.Image:
        """Decode a path, bytes, PIL image, data URL or image/image_url part into an RGB image."""
        if isinstance(x, dict):
            return self.load_image(_image_part_source(x))
        if isinstance(x, Image.Image):
            return _to_rgb(x)
        if isinstance(x, (bytes, bytearray, memoryview)):
            return _decode(bytes(x), "image bytes")
        if isinstance(x, str) and x.startswith("data:"):
            return _decode(_data_url_bytes(x), "data URL")
        if isinstance(x, str) and x.startswith(("http://", "https://")):
            raise ImageError("remote image URLs are not fetched here; pass bytes, a path or a data URL")
        if isinstance(x, (str, Path)):
            return _decode(_read_path(x), f"image file {str(x)[:200]!r}")
        raise ImageError(f"unsupported image input of type {type(x).__name__}")

    def process_image(self, img: Image.Image) -> ImageInput:
        """Hash and patchify one RGB image for the vision tower."""
        img = _to_rgb(img)
        try:
            pixel_values, grid, num_tokens = self._pixels(img)
        except ValueError as e:  # e.g. an aspect ratio beyond 200:1
            raise ImageError(f"image {img.size[0]}x{img.size[1]} cannot be processed: {e}") from e
        if num_tokens > self.max_image_tokens:
            raise ImageError(f"image needs {num_tokens} tokens, more than the limit {self.max_image_tokens}")
        return ImageInput(content_hash=content_hash(img), pixel_values=pixel_values, grid_thw=grid,
                          num_tokens=num_tokens)

    def _pixels(self, img: Image.Image) -> tuple[Any, tuple[int, int, int], int]:
        if self._fast_pixels is not None:
            make = self._fast_pixels.compact if self.compact_pixels else self._fast_pixels
            pixel_values, grid = make(img)
            return pixel_values, grid, self._num_tokens(grid)
        out = self.image_processor(images=[img], return_tensors="pt")
        grid, num_tokens = self._grid(out)
        return out["pixel_values"].float(), grid, num_tokens

    def tower_pixels(self, pixels: Any) -> Any:
        """The tower's input from an `ImageInput.pixel_values`: as it is, or expanded from the compact uint8 form."""
        if str(pixels.dtype) != "torch.uint8":
            return pixels
        if self._fast_pixels is None:
            raise ImageError("compact uint8 pixels reached a model whose processor has no compact form")
        try:
            return self._fast_pixels.expand(pixels)
        except ValueError as e:
            raise ImageError(str(e)) from None

    def pixel_pattern(self, dtype: str, model_shape: tuple) -> tuple:
        """The shape a received pixel tensor of `dtype` must have: the compact form's, or the model's own."""
        return self._fast_pixels.compact_shape() if dtype == "uint8" and self._fast_pixels else model_shape

    def _grid(self, out: Any) -> tuple[tuple[int, int, int], int]:
        """The image's patch grid (frames, rows, columns) and its placeholder-token count."""
        if self.tokens_per_image:
            patch = self.model_config.patch_size
            h, w = out["pixel_values"].shape[-2:]
            return (1, h // patch, w // patch), self.tokens_per_image
        grid = tuple(int(v) for v in out["image_grid_thw"][0])
        return grid, self._num_tokens(grid)

    def _num_tokens(self, grid: tuple[int, int, int]) -> int:
        return grid[0] * grid[1] * grid[2] // self.merge_size**2

    def image_input(self, x: ImageLike | ImageInput) -> ImageInput:
        return x if isinstance(x, ImageInput) else self.process_image(self.load_image(x))

    # ---- prompts

    def prepare(
        self,
        messages: Sequence[Message] | None = None,
        *,
        prompt: str | None = None,
        input_ids: Sequence[int] | None = None,
        images: Sequence[ImageLike | ImageInput] | None = (),
        add_generation_prompt: bool = True,
    ) -> PreparedPrompt:
        """Build expanded token ids and image inputs from exactly one of messages, prompt or input_ids.

        With `prompt` or `input_ids`, `images` pairs in order with the image placeholder tokens (one per
        image, or already expanded to each image's `num_tokens`). Messages carry their own images.
        """
        given = [name for name, v in (("messages", messages), ("prompt", prompt), ("input_ids", input_ids))
                 if v is not None]
        if len(given) != 1:
            raise InvalidRequest(f"give exactly one of messages, prompt or input_ids (got {given or 'none'})")
        if messages is not None:
            if images:
                raise InvalidRequest("with messages, put images inside the message content")
            text, images = self.render_messages(messages, add_generation_prompt)
            ids = self._encode(text)
        else:
            ids = self._encode(prompt) if prompt is not None else self._check_ids(input_ids)
        if not ids:
            raise InvalidRequest("prompt is empty")
        image_inputs = tuple(self.image_input(x) for x in images or ())
        return PreparedPrompt(self._expand(ids, image_inputs), image_inputs)

    def render_messages(
        self, messages: Sequence[Message], add_generation_prompt: bool = True
    ) -> tuple[str, list[ImageLike]]:
        """Apply the chat template; return the text and the image sources in order of appearance."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise InvalidRequest("messages must be a non-empty list")
        normalized, images = [], []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise InvalidRequest(f"messages[{i}] must be an object with a string 'role'")
            content, found = _normalize_content(message.get("content"), i)
            normalized.append({**message, "content": content})
            images.extend(found)
        text = self.tokenizer.apply_chat_template(
            normalized, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return text, images

    def _encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise InvalidRequest(f"prompt must be a string, got {type(text).__name__}")
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _check_ids(self, input_ids: Sequence[int]) -> list[int]:
        if isinstance(input_ids, (str, bytes)):
            raise InvalidRequest("input_ids must be a list of integers")
        ids = list(input_ids)
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, numbers.Integral):
                raise InvalidRequest(f"input_ids must be integers, got {type(t).__name__}")
            if not 0 <= t < self.vocab_size:
                raise InvalidRequest(f"token id {t} is out of range [0, {self.vocab_size})")
        return [int(t) for t in ids]

    def _expand(self, ids: list[int], images: tuple[ImageInput, ...]) -> tuple[int, ...]:
        """Expand one pad per image to num_tokens pads; accept runs that are already expanded."""
        pads = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(pads) == len(images):
            out, prev = [], 0
            for pos, img in zip(pads, images):
                out += ids[prev:pos] + [self.image_token_id] * img.num_tokens
                prev = pos + 1
            return tuple(out + ids[prev:])
        if len(pads) == sum(img.num_tokens for img in images) and self._runs_match(ids, images):
            return tuple(ids)
        raise InvalidRequest(
            f"the prompt has {len(pads)} image placeholder tokens but {len(images)} images were given"
        )

    def _runs_match(self, ids: list[int], images: tuple[ImageInput, ...]) -> bool:
        """True if the pad runs split exactly into consecutive images' num_tokens, in order."""
        runs, run = [], 0
        for t in ids + [-1]:
            if t == self.image_token_id:
                run += 1
            elif run:
                runs.append(run)
                run = 0
        sizes = iter(img.num_tokens for img in images)
        for run in runs:
            while run > 0:
                run -= next(sizes, run + 1)
            if run < 0:
                return False
        return next(sizes, None) is None


def content_hash(img: Image.Image) -> str:
    """sha256 over mode, size and raw pixel bytes: equal pixels give equal keys, whatever the file format."""
    h = hashlib.sha256(f"{img.mode}:{img.size[0]}x{img.size[1]}:".encode())
    h.update(img.tobytes())
    return h.hexdigest()


def _normalize_content(content: Any, index: int) -> tuple[Any, list[ImageLike]]:
    """Validate one message's content; image parts become bare `{"type": "image"}` for the template."""
    if content is None or isinstance(content, str):
        return content, []
    if not isinstance(content, (list, tuple)):
        raise InvalidRequest(f"messages[{index}].content must be a string or a list of parts")
    parts, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind in IMAGE_PART_TYPES:
            images.append(_image_part_source(part))
            parts.append({"type": "image"})
        else:
            raise InvalidRequest(f"messages[{index}] has an unsupported content part: {str(part)[:100]}")
    return parts, images


def _image_part_source(part: dict) -> ImageLike:
    source = part.get("image_url", part.get("image", part.get("url")))
    if isinstance(source, dict):
        source = source.get("url")
    if source is None:
        raise InvalidRequest(f"image part has no image or url: {str(part)[:100]}")
    return source


def _data_url_bytes(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64") or not header[5:].startswith("image/"):
        raise ImageError("data URL must look like data:image/<format>;base64,<data>")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"data URL has invalid base64: {e}") from e


def _read_path(path: str | Path) -> bytes:
    path = Path(str(path).removeprefix("file://"))
    try:
        return path.read_bytes()
    except OSError as e:
        raise ImageError(f"cannot read image file {str(path)[:200]!r}: {e.strerror or e}") from e


def _decode(data: bytes, what: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))  # reads only the header
        if img.size[0] * img.size[1] > MAX_DECODE_PIXELS:
            raise ImageError(f"{what} is {img.size[0]}x{img.size[1]}, over {MAX_DECODE_PIXELS} pixels")
        img.seek(0)  # first frame of animations
        return _to_rgb(img)
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"cannot decode {what}: {e}") from e


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        img.load()
        return img
    return img.convert("RGB")
