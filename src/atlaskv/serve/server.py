"""OpenAI-compatible HTTP server (DESIGN §6): chat completions with cited facts, live KB updates.

    POST   /v1/chat/completions   plain or SSE; citations in an extra top-level "atlaskv" field
                                  (in the final chunk when streaming)
    GET    /v1/models
    POST   /v1/kb/triples         {"triples": [{"head", "relation", "tail"}, ...]} -> added, version
    DELETE /v1/kb/triples         same body -> removed, not_found, version
    GET    /health

One model, one KB, one lock: generation and KB updates run one at a time, so every request sees all
updates made before it and never a half-applied one. Requests wait in a bounded queue (503 when full).
With ATLASKV_API_KEY set (or api_key=...), every request needs `Authorization: Bearer <key>`.
When no fact in the KB stands out the answer is "I don't know." (Answer.or_refusal; "refused": true).
Errors are OpenAI-shaped JSON: {"error": {"message", "type", "code"}} with a status that says what is
wrong (400 unreadable JSON, 401 auth, 413 body too large, 422 invalid request, 409 KB busy, 503 queue full).
"""
from __future__ import annotations

import hmac
import json
import logging
import os
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from atlaskv.defaults import REFUSE_BELOW
from atlaskv.kb.store import KBError, KnowledgeBase

log = logging.getLogger("atlaskv.serve.server")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type, code


def _error(status: int, message: str, type: str, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "code": code}}, status_code=status)


# ---------------------------------------------------------------- request bodies
class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # other OpenAI parameters (user, seed, ...) are accepted, unused
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)


Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000)]


class TripleIn(BaseModel):
    head: Text
    relation: Text
    tail: Text


class TriplesRequest(BaseModel):
    triples: list[TripleIn] = Field(min_length=1)


# ---------------------------------------------------------------- the model, one call at a time
class Worker:
    """Serialises every model call and KB update (a lock), with at most `max_queue` callers waiting."""

    def __init__(self, max_queue: int):
        self.lock = threading.Lock()
        self.slots = threading.Semaphore(max_queue + 1)

    def reserve(self) -> None:
        if not self.slots.acquire(blocking=False):
            raise ApiError(503, "server busy: too many queued requests, retry later", "server_busy")

    @contextmanager
    def turn(self):
        """Hold the model; the slot taken by reserve() is given back afterwards."""
        try:
            with self.lock:
                yield
        finally:
            self.slots.release()

    def call(self, fn):
        self.reserve()
        with self.turn():
            return fn()


class LiveKB:
    """The served KB; reopened when another process (`atlaskv kb add`) replaced its manifest."""

    def __init__(self, kb: KnowledgeBase):
        self.kb, self._stamp = kb, self._mtime(kb.path)

    @staticmethod
    def _mtime(path: Path) -> int:
        return (Path(path) / "manifest.json").stat().st_mtime_ns

    def current(self) -> KnowledgeBase:  # call with the worker lock held
        stamp = self._mtime(self.kb.path)
        if stamp != self._stamp:
            self.kb, self._stamp = KnowledgeBase.open(self.kb.path), stamp
        return self.kb


def _citations(ans) -> dict:
    support = ans.support
    return {"citations": [{"head": t.head, "relation": t.relation, "tail": t.tail, "weight": round(w, 4)}
                          for t, w in ans.citations],
            "refused": ans.refused, "support": round(support, 3) if support != float("inf") else None,
            "kb_attention_mass": round(ans.kb_attention_mass, 4), "kb_size": ans.kb_size}


def create_app(model, kb: KnowledgeBase | str | Path, *, api_key: str | None = None, model_name: str | None = None,
               max_body_bytes: int = 1 << 20, max_messages: int = 64, max_tokens: int = 512,
               default_max_tokens: int = 64, max_prompt_tokens: int = 2048, max_triples: int = 10_000,
               max_queue: int = 64, refuse_below: float = REFUSE_BELOW) -> FastAPI:
    """A FastAPI app serving `model` (an AtlasKV) over `kb`. api_key None reads $ATLASKV_API_KEY.
    refuse_below: answer "I don't know." when no fact stands out (Answer.or_refusal; 0 = never)."""
    live = LiveKB(kb if isinstance(kb, KnowledgeBase) else KnowledgeBase.open(kb))
    key = api_key if api_key is not None else os.environ.get("ATLASKV_API_KEY") or None
    name = model_name or f"atlaskv-{model.adapter.config.base_model}"
    worker = Worker(max_queue)
    created = int(time.time())

    def auth(request: Request) -> None:
        if key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        # compare_digest: the time taken does not reveal how much of the key was right
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                           "authentication_error", "invalid_api_key")

    app = FastAPI(title="atlaskv", dependencies=[Depends(auth)], docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return _error(e.status, e.message, e.type, e.code)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        return _error(e.status_code, str(e.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        log.exception("internal error")
        return _error(500, f"internal error ({type(e).__name__})", "server_error")

    async def read_body(request: Request, schema: type[BaseModel]):
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > max_body_bytes):
            if not declared.isdigit():
                raise ApiError(400, "bad Content-Length header")
            if int(declared) > 16 * max_body_bytes:  # not worth draining: answer now, the connection closes
                raise ApiError(413, f"request body over {max_body_bytes} bytes", code="body_too_large")
        body, size = bytearray(), 0
        # read (and past the limit, drain) the whole body so the client gets the 413 instead of a reset
        async for chunk in request.stream():
            size += len(chunk)
            if size <= max_body_bytes:
                body += chunk
            elif size > 16 * max_body_bytes:
                break
        if size > max_body_bytes:
            raise ApiError(413, f"request body over {max_body_bytes} bytes", code="body_too_large")
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
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            where = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors()[:5])
            raise ApiError(422, f"invalid request: {where}", code="invalid_request") from None

    def prepare(req: ChatRequest) -> tuple[list[dict], dict]:
        if len(req.messages) > max_messages:
            raise ApiError(422, f"{len(req.messages)} messages, at most {max_messages}", code="too_many_messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        if not any(m["role"] == "user" and m["content"].strip() for m in messages):
            raise ApiError(422, "no user message with a question", code="no_question")
        n = req.max_completion_tokens or req.max_tokens or default_max_tokens
        if n > max_tokens:
            raise ApiError(422, f"max_tokens {n} is over this server's limit of {max_tokens}", code="max_tokens")
        gen = {"max_new_tokens": n}
        if req.temperature:  # None or 0: greedy, the setting the adapter was trained and evaluated with
            gen.update(do_sample=True, temperature=req.temperature, top_p=req.top_p or 1.0)
        return messages, gen

    def answer(messages: list[dict], gen: dict, streamer=None):
        """Run with the worker lock held: (Answer, prompt tokens, completion tokens, KB version)."""
        kb = live.current()
        n_prompt = model.chat_ids(messages).shape[1]
        if n_prompt > max_prompt_tokens:
            raise ApiError(422, f"prompt is {n_prompt} tokens, at most {max_prompt_tokens}", code="prompt_too_long")
        if streamer is not None and refuse_below > 0:
            # the rule reads the prefill's attention: decide before any token goes out (one prefill more)
            pre = model.ask(messages, kb, max_new_tokens=1).or_refusal(refuse_below)
            if pre.refused:
                streamer.end()
                return pre, n_prompt, len(model.tokenizer(pre.text, add_special_tokens=False)["input_ids"]), kb.version
        ans = model.ask(messages, kb, streamer=streamer, **gen)
        if refuse_below > 0:
            ans = ans.or_refusal(refuse_below)
        n_out = len(model.tokenizer(ans.text, add_special_tokens=False)["input_ids"])
        return ans, n_prompt, n_out, kb.version

    def extra(ans, version: int) -> dict:
        return {**_citations(ans), "kb_version": version}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await read_body(request, ChatRequest)
        messages, gen = prepare(req)
        cid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            return StreamingResponse(stream(messages, gen, cid, now), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        ans, n_prompt, n_out, version = await run_in_threadpool(worker.call, lambda: answer(messages, gen))
        return {"id": cid, "object": "chat.completion", "created": now, "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": ans.text},
                             "finish_reason": "length" if n_out >= gen["max_new_tokens"] else "stop"}],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out},
                "atlaskv": extra(ans, version)}

    def stream(messages: list[dict], gen: dict, cid: str, now: int):
        from transformers import TextIteratorStreamer

        worker.reserve()  # before the 200 goes out: a full queue is still a clean 503
        streamer = TextIteratorStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
        out: dict = {}

        def run():
            try:
                with worker.turn():
                    out["result"] = answer(messages, gen, streamer)
            except BaseException as e:  # reported in the stream below
                out["error"] = e
                streamer.end()

        def event(delta: dict, finish: str | None = None, **more) -> str:
            chunk = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": name,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **more}
            return f"data: {json.dumps(chunk)}\n\n"

        # started here, not in events(): the slot is given back even if the client leaves before reading
        t = threading.Thread(target=run, daemon=True)
        t.start()

        def events():
            yield event({"role": "assistant", "content": ""})
            for piece in streamer:
                if piece:
                    yield event({"content": piece})
            t.join()
            if "result" in out and out["result"][0].refused:
                yield event({"content": out["result"][0].text})
            if "error" in out:
                e = out["error"]
                if not isinstance(e, ApiError):
                    log.error("generation failed", exc_info=e)
                msg = e.message if isinstance(e, ApiError) else f"internal error ({type(e).__name__})"
                yield f"data: {json.dumps({'error': {'message': msg, 'type': 'server_error', 'code': None}})}\n\n"
            else:
                ans, _, n_out, version = out["result"]
                yield event({}, "length" if n_out >= gen["max_new_tokens"] else "stop", atlaskv=extra(ans, version))
            yield "data: [DONE]\n\n"

        return events()

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "atlaskv"}]}

    async def update(request: Request, op: str) -> dict:
        req = await read_body(request, TriplesRequest)
        if len(req.triples) > max_triples:
            raise ApiError(422, f"{len(req.triples)} triples, at most {max_triples} per request",
                           code="too_many_triples")
        triples = [(t.head, t.relation, t.tail) for t in req.triples]
        if any("\x00" in f for t in triples for f in t):  # the file readers refuse NUL too (kg.py)
            raise ApiError(422, "invalid request: a triple field holds a NUL character", code="invalid_request")

        def go():
            kb = live.current()
            try:
                res = getattr(kb, op)(triples)
            except KBError as e:  # e.g. another process is writing the KB right now
                raise ApiError(409, str(e), "kb_error", "kb_busy") from None
            live.current()  # our own write replaced the manifest: take its new stamp
            return res, len(kb)

        res, n = await run_in_threadpool(worker.call, go)
        if op == "add":
            return {"added": res.added, "duplicates": res.duplicates, "version": res.version, "triples": n}
        return {"removed": res.removed, "not_found": res.not_found, "version": res.version, "triples": n}

    @app.post("/v1/kb/triples")
    async def add_triples(request: Request):
        return await update(request, "add")

    @app.delete("/v1/kb/triples")
    async def remove_triples(request: Request):
        return await update(request, "remove")

    @app.get("/health")
    def health():
        kb = live.kb
        return {"status": "ok", "model": name, "kb": {"version": kb.version, "triples": len(kb)}}

    return app
