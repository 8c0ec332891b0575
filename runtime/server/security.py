"""Bearer-token auth and a request-body size cap, as one pure ASGI middleware (safe for streaming)."""
from __future__ import annotations

import hmac

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runtime.server.errors import ApiError, error_body

PUBLIC_PATHS = frozenset({"/health"})


class BodyTooLarge(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over {limit} bytes", "body_too_large")


def token_ok(header: bytes | None, api_key: str) -> bool:
    """Constant-time check of an `Authorization: Bearer <key>` header."""
    scheme, _, token = (header or b"").decode("latin-1").partition(" ")
    return hmac.compare_digest(token.strip().encode(), api_key.encode()) and scheme.lower() == "bearer"


async def send_error(send: Send, status: int, message: str, code: str, headers: list | None = None) -> None:
    body = orjson.dumps(error_body(status, message, code))
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class SecurityMiddleware:
    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key and scope["path"] not in PUBLIC_PATHS:
            if not token_ok(headers.get(b"authorization"), self.api_key):
                return await send_error(send, 401, "missing or invalid API key", "invalid_api_key",
                                        [(b"www-authenticate", b"Bearer")])
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_body_bytes:
            return await send_error(send, 413, f"request body over {self.max_body_bytes} bytes",
                                    "body_too_large")
        started = False

        async def capped_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise BodyTooLarge(self.max_body_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        received = 0
        try:
            await self.app(scope, capped_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await send_error(send, 413, f"request body over {self.max_body_bytes} bytes", "body_too_large")
