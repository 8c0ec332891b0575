"""Rendering program pieces into a chat-formatted prompt or OpenAI-style messages."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from epdlang.ir import Expr, Image, RoleBegin, RoleEnd, Text


@dataclass(frozen=True)
class ChatTemplate:
    """Role markers as text. The default is ChatML with Qwen2-VL's vision markers."""

    role_begin: str = "<|im_start|>{role}\n"
    role_end: str = "<|im_end|>\n"
    image: str = "<|vision_start|><|image_pad|><|vision_end|>"

    def render(self, pieces: Sequence[Expr]) -> tuple[str, list[Image]]:
        """The prompt text (one image marker per image) and the images in order."""
        out, images = [], []
        for p in pieces:
            if isinstance(p, Text):
                out.append(p.text)
            elif isinstance(p, Image):
                out.append(self.image)
                images.append(p)
            elif isinstance(p, RoleBegin):
                out.append(self.role_begin.format(role=p.role))
            elif isinstance(p, RoleEnd):
                out.append(self.role_end.format(role=p.role))
        return "".join(out), images


QWEN2_VL = ChatTemplate()


def to_messages(pieces: Sequence[Expr], image_part=lambda img: {"type": "image"}) -> list[dict[str, Any]]:
    """OpenAI-style messages; text outside any role goes to a user message. The last may be open."""
    messages: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for p in pieces:
        if isinstance(p, RoleBegin):
            current = {"role": p.role, "content": []}
            messages.append(current)
        elif isinstance(p, RoleEnd):
            current = None
        elif isinstance(p, (Text, Image)):
            if current is None:
                current = {"role": "user", "content": []}
                messages.append(current)
            part = {"type": "text", "text": p.text} if isinstance(p, Text) else image_part(p)
            current["content"].append(part)
    return [{"role": m["role"], "content": _merge_text(m["content"])} for m in messages]


def _merge_text(parts: list[dict]) -> list[dict] | str:
    merged: list[dict] = []
    for part in parts:
        if part["type"] == "text" and merged and merged[-1]["type"] == "text":
            merged[-1] = {"type": "text", "text": merged[-1]["text"] + part["text"]}
        else:
            merged.append(part)
    if all(p["type"] == "text" for p in merged):
        return "".join(p["text"] for p in merged)
    return merged


def open_role(pieces: Sequence[Expr]) -> str | None:
    """The role whose begin has no end yet, if any."""
    role = None
    for p in pieces:
        if isinstance(p, RoleBegin):
            role = p.role
        elif isinstance(p, RoleEnd):
            role = None
    return role
