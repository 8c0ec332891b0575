"""epdlang's own routes, for `epd.RuntimeEndpoint`: upload a program's images once (they are encoded ahead,
then named `epd-image:<hash>` in /generate and chat requests), and end a program's session."""
from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from runtime.server.image_store import image_id
from runtime.server.openai_api import frontend, json_body, parse
from runtime.server.serving import guarded

router = APIRouter()


class ImagesUpload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    images: list[str] = Field(min_length=1)  # refs as /generate's image_data takes them


class EndSession(BaseModel):
    model_config = ConfigDict(extra="forbid")

    session_id: str = Field(min_length=1)


@router.post("/epd/images", openapi_extra=json_body(ImagesUpload))
async def upload_images(request: Request) -> dict:
    fe = frontend(request)
    req: ImagesUpload = parse(ImagesUpload, await request.body())
    inputs = await guarded(request, fe.upload_images(req.images))
    return {"images": [{"id": image_id(x), "num_tokens": x.num_tokens} for x in inputs]}


@router.post("/epd/end_session", openapi_extra=json_body(EndSession))
async def end_session(request: Request) -> dict:
    fe = frontend(request)
    req: EndSession = parse(EndSession, await request.body())
    fe.deployment.end_session(req.session_id)
    return {"session_id": req.session_id, "ended": True}
