"""Hostile images for the fuzz mode, built with PIL in memory: truncated and corrupt PNG, JPEG, GIF and WebP;
headers that claim a huge size (decompression bombs); extreme sizes and aspect ratios; CMYK, 16-bit, palette,
animated and EXIF-rotated images; files of other formats; data URLs with the wrong MIME type or a broken header,
and image references (paths, URLs) that are broken in other ways.

Deterministic: no randomness, and PNGs are stored uncompressed (`compress_level=0`), so no zlib build's choices
show in the bytes.
"""
from __future__ import annotations

import base64
import io
import struct
import zlib
from functools import cache
from typing import Any

from PIL import Image, ImageDraw


def picture(size: tuple[int, int] = (64, 48), mode: str = "RGB") -> Image.Image:
    """A small image with some structure (gradient bands, a disc), in `mode`."""
    w, h = size
    img = Image.new("RGB", size, (200, 40, 40))
    draw = ImageDraw.Draw(img)
    for x in range(0, w, max(1, w // 8)):
        draw.line((x, 0, x, h - 1), fill=(x * 255 // max(1, w), 120, 200), width=max(1, w // 32))
    draw.ellipse((w // 4, h // 4, w * 3 // 4, h * 3 // 4), fill=(250, 250, 250))
    return img.convert(mode)


def encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    if fmt == "PNG":
        kw.setdefault("compress_level", 0)
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def corrupt(data: bytes, keep: int = 32) -> bytes:
    """Every 7th byte of the middle third flipped, the first `keep` bytes (the header) intact."""
    out = bytearray(data)
    for i in range(max(keep, len(out) // 3), len(out) * 2 // 3, 7):
        out[i] ^= 0x5A
    return bytes(out)


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims `width` x `height` (CRC fixed up, so only the size is a lie)."""
    data = bytearray(encode(picture((8, 8)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(picture((16, 16)), "JPEG", quality=80))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(picture((16, 16), "P"), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)  # the logical screen
    return bytes(data)


def webp_claiming(width: int, height: int) -> bytes:
    """A lossy WebP whose VP8 frame header claims `width` x `height` (each at most 16383)."""
    data = bytearray(encode(picture((16, 16)), "WEBP", quality=80))
    start = data.index(b"\x9d\x01\x2a") + 3
    data[start:start + 4] = struct.pack("<HH", width & 0x3FFF, height & 0x3FFF)
    return bytes(data)


def animated(fmt: str, frames: int = 3) -> bytes:
    imgs = [picture((48, 32)).rotate(30 * i) for i in range(frames)]
    return encode(imgs[0], fmt, save_all=True, append_images=imgs[1:], duration=80, loop=0)


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    return encode(picture((64, 32)), "JPEG", exif=exif.tobytes())


@cache
def valid_images() -> dict[str, bytes]:
    return {fmt: encode(picture(), fmt) for fmt in ("PNG", "JPEG", "GIF", "WEBP")}


@cache
def images() -> tuple[tuple[str, str, bytes], ...]:
    """(name, MIME subtype claimed in a data URL, bytes) for every hostile image (built once)."""
    out = []
    for fmt, data in valid_images().items():
        sub = fmt.lower()
        out += [(f"{sub}-truncated", sub, data[:len(data) // 2]), (f"{sub}-header-only", sub, data[:20]),
                (f"{sub}-corrupt", sub, corrupt(data)), (f"{sub}-tail-cut-4", sub, data[:-4])]
    out += [("png-bomb", "png", png_claiming(100_000, 100_000)), ("png-bomb-max", "png", png_claiming(2**31 - 1, 1)),
            ("png-zero-size", "png", png_claiming(0, 0)), ("jpeg-bomb", "jpeg", jpeg_claiming(65500, 65500)),
            ("gif-bomb", "gif", gif_claiming(65535, 65535)), ("webp-bomb", "webp", webp_claiming(16383, 16383)),
            ("png-3000x3000-real", "png", encode(Image.new("L", (3000, 3000), 7), "PNG", compress_level=9))]
    sizes = {"1x1": (1, 1), "30000x10": (30000, 10), "10x30000": (10, 30000), "2x2": (2, 2), "1x500": (1, 500)}
    out += [(f"png-{k}", "png", encode(picture(v), "PNG")) for k, v in sizes.items()]
    out += [("jpeg-cmyk", "jpeg", encode(picture(mode="CMYK"), "JPEG")),
            ("png-16bit", "png", encode(picture(mode="I").point(lambda v: v * 250).convert("I;16"), "PNG")),
            ("png-palette", "png", encode(picture(mode="P"), "PNG", transparency=0)),
            ("png-la", "png", encode(picture(mode="LA"), "PNG")), ("png-1bit", "png", encode(picture(mode="1"), "PNG")),
            ("webp-rgba", "webp", encode(picture(mode="RGBA"), "WEBP", lossless=True)),
            ("gif-animated", "gif", animated("GIF")), ("webp-animated", "webp", animated("WEBP")),
            ("png-animated", "png", animated("PNG")), ("jpeg-exif-rotated", "jpeg", exif_rotated())]
    png = valid_images()["PNG"]
    out += [("png-as-gif", "gif", png), ("png-as-jpeg", "jpeg", png), ("bmp-as-png", "png", encode(picture(), "BMP")),
            ("tiff-as-png", "png", encode(picture(), "TIFF")), ("ico-as-png", "png", encode(picture(), "ICO")),
            ("empty", "png", b""), ("svg", "svg+xml", b'<svg xmlns="http://www.w3.org/2000/svg"/>')]
    return tuple(out)


def data_urls() -> list[tuple[str, str]]:
    """(name, data URL): each hostile image, plus data URLs with the wrong MIME type or a broken header."""
    urls = [(name, f"data:image/{sub};base64,{base64.b64encode(data).decode()}") for name, sub, data in images()]
    png = base64.b64encode(valid_images()["PNG"]).decode()
    urls += [("mime-text", f"data:text/plain;base64,{png}"), ("mime-octet", f"data:application/x-png;base64,{png}"),
             ("mime-none", f"data:;base64,{png}"), ("mime-charset", f"data:image/png;charset=utf-8;base64,{png}"),
             ("not-base64", f"data:image/png,{png}"), ("base64-spaces", f"data:image/png;base64,{png[:40]} {png[40:]}"),
             ("base64-urlsafe", f"data:image/png;base64,{png.replace('+', '-').replace('/', '_')}"),
             ("no-comma", "data:image/png;base64"), ("surrogate-url", "data:image/png;base64,\ud800"),
             ("nul-url", "data:image/png;base64,\x00"), ("file-nul", "/tmp/x\x00.png"),
             ("file-pct-nul", "file:///tmp/x%00.png"), ("file-surrogate", "/tmp/\ud800.png"),
             ("file-unknown-user", "~nosuchuser\ud800/x.png"), ("file-long", "/" + "a" * 5000 + ".png"),
             ("file-dir", "file:///tmp/"), ("file-proc", "/proc/self/mem.png"),
             ("http-loopback", "http://127.0.0.1:9/x.png"), ("http-metadata", "http://169.254.169.254/latest"),
             ("http-ipv6-loopback", "http://[::1]:9/x.png"), ("http-bad-port", "http://example.invalid:99999/x.png"),
             ("http-bad-host", "http://exa mple.invalid/x.png"), ("http-empty-host", "http:///x.png"),
             ("http-bad-escape", "https://%zz%/x.png"), ("http-idna", "http://\u2603\ud800.invalid/x.png"),
             ("http-userinfo", "http://user:pass@127.0.0.1:9/x.png"), ("http-open-bracket", "http://[::1"),
             ("http-nul-host", "http://\x00/x.png"), ("http-tab-host", "http://\t/x.png"),
             ("http-crlf", "http://a\r\nb/x.png"), ("http-long-label", f"http://{'a' * 300}.com/x.png"),
             ("http-bad-a-label", "http://xn--/x.png"), ("http-fullwidth-dot", "https://\u3002/x.png"),
             ("http-url-70k", f"http://{'x' * 70_000}/x.png")]
    return urls
