"""Images uploaded through `POST /epd/images`: preprocessed `ImageInput`s kept by content hash, so later
requests name them as `epd-image:<hash>` instead of sending them again. LRU within a byte budget."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

from epdlang.errors import UnknownImage
from runtime.messages import ImageInput

ID_PREFIX = "epd-image:"
DEFAULT_MAX_BYTES = 512 << 20


def is_image_id(ref: Any) -> bool:
    return isinstance(ref, str) and ref.startswith(ID_PREFIX)


def image_id(image: ImageInput) -> str:
    return ID_PREFIX + image.content_hash


def _nbytes(image: ImageInput) -> int:
    return image.pixel_values.numel() * image.pixel_values.element_size()


class ImageStore:
    """Used from the server's event loop only. `uploads` counts images received by /epd/images."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes, self.bytes, self.uploads = max_bytes, 0, 0
        self._items: OrderedDict[str, ImageInput] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, image: ImageInput) -> None:
        if image.content_hash in self._items:
            self._items.move_to_end(image.content_hash)
            return
        self._items[image.content_hash] = image
        self.bytes += _nbytes(image)
        while self.bytes > self.max_bytes and len(self._items) > 1:  # the newest always stays
            self.bytes -= _nbytes(self._items.popitem(last=False)[1])

    def get(self, ref: str) -> ImageInput:
        image = self._items.get(ref.removeprefix(ID_PREFIX))
        if image is None:
            raise UnknownImage(f"unknown image id {ref[:100]!r}: it was never uploaded or has been evicted; "
                               "upload it again with POST /epd/images")
        self._items.move_to_end(image.content_hash)
        return image

    def info(self) -> dict[str, int]:
        return {"images_uploaded": self.uploads, "images_stored": len(self), "image_store_bytes": self.bytes,
                "image_store_max_bytes": self.max_bytes}
