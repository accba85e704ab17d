"""Request bodies of the HTTP API (routes.py), as the OpenAI chat completions API spells them."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints


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
