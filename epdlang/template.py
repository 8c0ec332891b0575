"""Rendering program pieces into a chat-formatted prompt or OpenAI-style messages."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from epdlang.ir import Expr, Image, RoleBegin, RoleEnd, Text


@dataclass(frozen=True)
class ChatTemplate:
    """Role markers as text, matching a model family's chat template. The default is ChatML with
    Qwen2-VL's vision markers; `per_role` holds (role, begin, end) where a role differs from the pattern.
    `default_system` is the system turn the family's template adds when a conversation opens without one."""

    role_begin: str = "<|im_start|>{role}\n"
    role_end: str = "<|im_end|>\n"
    image: str = "<|vision_start|><|image_pad|><|vision_end|>"
    per_role: tuple[tuple[str, str, str], ...] = ()
    default_system: str | None = None

    def begin(self, role: str) -> str:
        return next((b for r, b, _ in self.per_role if r == role), self.role_begin.format(role=role))

    def end(self, role: str) -> str:
        return next((e for r, _, e in self.per_role if r == role), self.role_end.format(role=role))

    def render(self, pieces: Sequence[Expr]) -> tuple[str, list[Image]]:
        """The prompt text (one image marker per image) and the images in order."""
        out, images = [self._default_system(pieces)], []
        for p in pieces:
            if isinstance(p, Text):
                out.append(p.text)
            elif isinstance(p, Image):
                out.append(self.image)
                images.append(p)
            elif isinstance(p, RoleBegin):
                out.append(self.begin(p.role))
            elif isinstance(p, RoleEnd):
                out.append(self.end(p.role))
        return "".join(out), images

    def _default_system(self, pieces: Sequence[Expr]) -> str:
        first = next((p for p in pieces if not (isinstance(p, Text) and not p.text)), None)
        if self.default_system is None or not isinstance(first, RoleBegin) or first.role == "system":
            return ""
        return self.begin("system") + self.default_system + self.end("system")


# Qwen2-VL's template opens with "You are a helpful assistant." when the messages have no system turn.
QWEN2_VL = ChatTemplate(default_system="You are a helpful assistant.")
# LLaVA-1.5: "USER: <image>\nWhat is it? ASSISTANT: answer</s>" (a system turn is bare text and a newline).
LLAVA = ChatTemplate(image="<image>\n", per_role=(("system", "", "\n"), ("user", "USER: ", " "),
                                                  ("assistant", "ASSISTANT:", "</s>")))
TEMPLATES = {"qwen2_vl": QWEN2_VL, "qwen2_5_vl": QWEN2_VL, "llava": LLAVA}  # by config.json model_type


def template_for(model_type: str) -> ChatTemplate:
    """The DSL's markers for a model family (ChatML for an unknown one)."""
    return TEMPLATES.get(model_type, QWEN2_VL)


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
