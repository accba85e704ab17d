"""OpenAI-compatible HTTP server (DESIGN §6): chat completions with cited facts, live KB updates.

    POST   /v1/chat/completions   plain or SSE; citations in an extra top-level "atlaskv" field
                                  (in the final chunk when streaming)
    GET    /v1/models
    POST   /v1/kb/triples         {"triples": [{"head", "relation", "tail"}, ...]} -> added, version
    DELETE /v1/kb/triples         same body -> removed, not_found, version
    GET    /v1/kb                 size, version, encoder, relations with their counts
    GET    /v1/kb/search          ?head=text&limit=n: facts whose head contains the text
    GET    /health
    GET    /                      the web page (page.py; static files, no data: its every call needs the key)

The routes read and check the request, call the KBService (service.py: concurrent chat requests are answered
together by one scheduler thread, scheduler.py; KB writes never wait for answers, and every request admitted
after a write's acknowledgement reads it, never half of it) and shape its reply.
Requests wait in a bounded queue (503 when full).
With ATLASKV_API_KEY set (or api_key=...), every request needs `Authorization: Bearer <key>`.
When no fact in the KB stands out the answer is "I don't know." (Answer.or_refusal; "refused": true).
Errors are OpenAI-shaped JSON: {"error": {"message", "type", "code"}} with a status that says what is
wrong (400 unreadable JSON, 401 auth, 413 body too large, 422 invalid request, 409 KB busy, 503 queue full).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Annotated, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from atlaskv.defaults import LACKING_RATIO, MAX_BATCH, MAX_NEW_TOKENS, REFUSE_BELOW
from atlaskv.kb.store import KnowledgeBase
from atlaskv.serve.page import page_router
from atlaskv.serve.schemas import ChatRequest, TriplesRequest
from atlaskv.serve.service import KBChange, KBService, Reply, ServiceError, StreamRun

log = logging.getLogger(__name__)

# ServiceError.kind -> HTTP status and OpenAI error type
STATUS = {"invalid": (422, "invalid_request_error"), "queue_full": (503, "server_busy"), "kb_busy": (409, "kb_error")}


class ApiError(Exception):
    """A request refused before it reaches the service (body, JSON, auth)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type, code


def error_response(status: int, message: str, type: str, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "code": code}}, status_code=status)


def create_app(model, kb: KnowledgeBase | str | Path, *, api_key: str | None = None, model_name: str | None = None,
               max_body_bytes: int = 1 << 20, max_messages: int = 64, max_tokens: int = 512,
               default_max_tokens: int = MAX_NEW_TOKENS, max_prompt_tokens: int = 2048, max_triples: int = 10_000,
               max_queue: int = 64, max_batch: int = MAX_BATCH, refuse_below: float = REFUSE_BELOW,
               lacking_ratio: float = LACKING_RATIO) -> FastAPI:
    """A FastAPI app serving `model` (an AtlasKV) over `kb`. api_key None reads $ATLASKV_API_KEY.
    refuse_below: answer "I don't know." when no fact stands out (Answer.or_refusal; 0 = never); lacking_ratio:
    ... or when a fact the KB lacks about the answer's entity draws the question that many times more (0 = never)."""
    service = KBService(model, kb, model_name=model_name, max_messages=max_messages, max_tokens=max_tokens,
                        default_max_tokens=default_max_tokens, max_prompt_tokens=max_prompt_tokens,
                        max_triples=max_triples, max_queue=max_queue, max_batch=max_batch,
                        refuse_below=refuse_below, lacking_ratio=lacking_ratio)
    return service_app(service, api_key=api_key, max_body_bytes=max_body_bytes)


def service_app(service: KBService, *, api_key: str | None = None, max_body_bytes: int = 1 << 20) -> FastAPI:
    """The HTTP API over a ready KBService, and the web page at / (the page itself holds no data: every
    API route needs the key, the page's files do not)."""
    app = FastAPI(title="atlaskv", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.state.api_key = api_key if api_key is not None else os.environ.get("ATLASKV_API_KEY") or None
    app.state.max_body_bytes = max_body_bytes
    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(Exception, on_internal_error)
    app.include_router(router)
    app.include_router(page_router)
    return app


# ---------------------------------------------------------------- auth, errors, bodies
def authorize(request: Request) -> None:
    key = request.app.state.api_key
    if key is None:
        return
    got = request.headers.get("authorization", "")
    scheme, _, token = got.partition(" ")
    # compare_digest: the time taken does not reveal how much of the key was right
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                       "authentication_error", "invalid_api_key")


async def on_api_error(request: Request, e: ApiError) -> JSONResponse:
    return error_response(e.status, e.message, e.type, e.code)


async def on_service_error(request: Request, e: ServiceError) -> JSONResponse:
    status, type = STATUS[e.kind]
    return error_response(status, e.message, type, e.code)


async def on_http_error(request: Request, e: HTTPException) -> JSONResponse:
    return error_response(e.status_code, str(e.detail), "invalid_request_error")


async def on_internal_error(request: Request, e: Exception) -> JSONResponse:
    log.exception("internal error")
    return error_response(500, f"internal error ({type(e).__name__})", "server_error")


async def read_body(request: Request, schema: type[BaseModel]):
    """The body as `schema`: 413 over the app's max_body_bytes, 400 not JSON, 422 not the schema."""
    limit = request.app.state.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        if not declared.isdigit():
            raise ApiError(400, "bad Content-Length header")
        if int(declared) > 16 * limit:  # not worth draining: answer now, the connection closes
            raise ApiError(413, f"request body over {limit} bytes", code="body_too_large")
    body, size = bytearray(), 0
    # read (and past the limit, drain) the whole body so the client gets the 413 instead of a reset
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            body += chunk
        elif size > 16 * limit:
            break
    if size > limit:
        raise ApiError(413, f"request body over {limit} bytes", code="body_too_large")
    return validate(parse_json(body), schema)


def parse_json(body: bytes):
    try:
        data = json.loads(body)
        # a lone surrogate (JSON "\ud800") would pass validation and fail deep inside the tokenizer or Parquet
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    except UnicodeEncodeError:
        raise ApiError(400, "request body is not valid JSON: a string holds a lone surrogate escape",
                       code="invalid_json") from None
    except (ValueError, RecursionError) as e:  # a 5,000-digit number, [[[[... nested past the recursion limit
        raise ApiError(400, f"request body is not valid JSON: {str(e)[:100] or type(e).__name__}",
                       code="invalid_json") from None
    return data


def validate(data, schema: type[BaseModel]):
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        where = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors()[:5])
        raise ApiError(422, f"invalid request: {where}", code="invalid_request") from None


# ---------------------------------------------------------------- responses
def atlaskv_field(reply: Reply) -> dict:
    """The extra top-level "atlaskv" field: cited facts, the refusal rule's verdict, the KB version read."""
    ans = reply.answer
    support = ans.support
    return {"citations": [{"head": t.head, "relation": t.relation, "tail": t.tail, "weight": round(w, 4)}
                          for t, w in ans.citations],
            "refused": ans.refused, "support": round(support, 3) if support != float("inf") else None,
            # why a refusal: the fact asked for that the KB lacks ([entity, relation]), when that is the reason
            "missing": list(ans.missing) if ans.refused and ans.missing else None,
            "kb_attention_mass": round(ans.kb_attention_mass, 4), "kb_size": ans.kb_size,
            "kb_version": reply.kb_version}


def finish_reason(reply: Reply) -> str:
    return "length" if reply.truncated else "stop"


def completion(reply: Reply, cid: str, now: int, name: str) -> dict:
    return {"id": cid, "object": "chat.completion", "created": now, "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.answer.text},
                         "finish_reason": finish_reason(reply)}],
            "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                      "total_tokens": reply.prompt_tokens + reply.completion_tokens},
            "atlaskv": atlaskv_field(reply)}


async def sse_events(run: StreamRun, cid: str, now: int, name: str) -> AsyncIterator[str]:
    """The streamed completion as server-sent events: role, text pieces, final chunk with citations, [DONE]."""
    def event(delta: dict, finish: str | None = None, **more) -> str:
        chunk = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": name,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **more}
        return f"data: {json.dumps(chunk)}\n\n"

    yield event({"role": "assistant", "content": ""})
    async for piece in run:
        yield event({"content": piece})
    try:
        reply = await run.finish()
    except BaseException as e:  # the status line went out long ago: the error is an event
        if isinstance(e, asyncio.CancelledError):
            raise
        if not isinstance(e, ServiceError):
            log.error("generation failed", exc_info=e)
        msg = e.message if isinstance(e, ServiceError) else f"internal error ({type(e).__name__})"
        yield f"data: {json.dumps({'error': {'message': msg, 'type': 'server_error', 'code': None}})}\n\n"
    else:
        if reply.answer.refused:
            yield event({"content": reply.answer.text})
        yield event({}, finish_reason(reply), atlaskv=atlaskv_field(reply))
    yield "data: [DONE]\n\n"


def kb_change(change: KBChange, op: str) -> dict:
    res = change.result
    if op == "add":
        return {"added": res.added, "duplicates": res.duplicates, "version": res.version, "triples": change.triples}
    return {"removed": res.removed, "not_found": res.not_found, "version": res.version, "triples": change.triples}


# ---------------------------------------------------------------- routes
def service_of(request: Request) -> KBService:
    return request.app.state.service


Service = Annotated[KBService, Depends(service_of)]
router = APIRouter(dependencies=[Depends(authorize)])  # every API route needs the key (when one is set)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, service: Service):
    req = await read_body(request, ChatRequest)
    job = service.chat_job([{"role": m.role, "content": m.text()} for m in req.messages],
                           req.max_completion_tokens or req.max_tokens, req.temperature, req.top_p)
    cid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if req.stream:
        run = service.stream(job, asyncio.get_running_loop())  # before the 200: a full queue is still a clean 503
        return StreamingResponse(sse_events(run, cid, now, service.name), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    reply = await service.answer_async(job)  # waits in the scheduler's batch, not on a thread
    return completion(reply, cid, now, service.name)


@router.get("/v1/models")
def models(service: Service):
    return {"object": "list",
            "data": [{"id": service.name, "object": "model", "created": service.created, "owned_by": "atlaskv"}]}


async def read_triples(request: Request) -> list[tuple[str, str, str]]:
    req = await read_body(request, TriplesRequest)
    return [(t.head, t.relation, t.tail) for t in req.triples]


@router.post("/v1/kb/triples")
async def add_triples(request: Request, service: Service):
    return kb_change(await run_in_threadpool(service.add, await read_triples(request)), "add")


@router.delete("/v1/kb/triples")
async def remove_triples(request: Request, service: Service):
    return kb_change(await run_in_threadpool(service.remove, await read_triples(request)), "remove")


@router.get("/v1/kb")
async def kb_overview(service: Service):
    return await run_in_threadpool(service.overview)


@router.get("/v1/kb/search")
async def kb_search(request: Request, service: Service):
    q = request.query_params
    limit = q.get("limit", "50")
    if not (limit.isascii() and limit.isdigit()):
        raise ApiError(422, f"invalid request: limit must be a whole number, got {limit[:20]!r}",
                       code="invalid_request")
    return await run_in_threadpool(service.search, q.get("head", ""), int(limit))


@router.get("/health")
def health(service: Service):
    version, n = service.kb_status()
    return {"status": "ok", "model": service.name, "kb": {"version": version, "triples": n}}
