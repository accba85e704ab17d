"""RDF triples files (N-Triples, Turtle, via rdflib): every node named by its rdfs:label when it has one,
else by the local name of its IRI ("placeOfBirth" -> "place of birth"); labels are names, not facts.
Readers as in formats.py: rows in file order, a bad row as its KGFormatError in place.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator
from urllib.parse import unquote

from atlaskv.kb.formats import KGFormatError, Triple, numbered_lines, open_binary, to_triple


def _read_text(path: str) -> str:
    with open_binary(path) as f:
        try:
            data = f.read()
        except (OSError, EOFError, zlib.error) as e:
            raise KGFormatError(path, None, f"cannot read: {e}") from None
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise KGFormatError(path, line, f"invalid UTF-8 at byte offset {e.start}") from None


def _local_name(iri: str, predicate: bool) -> str:
    name = re.split(r"[#/:]", iri.rstrip("/#"))[-1] or iri
    name = unquote(name).replace("_", " ")
    if predicate:
        # placeOfBirth -> place of birth, but keep acronyms: hasISBN -> has ISBN
        words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name).split(" ")
        name = " ".join(w.lower() if w[1:].islower() else w for w in words)
    return name


_RdfRow = tuple[int | None, object, object, object]


def _rdf_rows(path: str, limit: int, rows: list[_RdfRow | KGFormatError]) -> Iterator[Triple | KGFormatError]:
    """Turn parsed RDF terms into readable triples, naming each node by its rdfs:label if it has one.

    ``rows`` may hold errors for bad lines; they pass through in place."""
    from rdflib import BNode, Literal
    from rdflib.namespace import RDFS

    def rank(lit: Literal) -> int:  # English, then untagged, then any other language
        lang = (lit.language or "").lower()
        return 0 if lang == "en" or lang.startswith("en-") else 1 if not lang else 2

    labels: dict[object, Literal] = {}
    for row in rows:
        if isinstance(row, KGFormatError):
            continue
        _, s, p, o = row
        if p == RDFS.label and isinstance(o, Literal) and (s not in labels or rank(o) < rank(labels[s])):
            labels[s] = o

    def name(node: object, predicate: bool = False) -> str:
        if node in labels:
            return str(labels[node])
        if isinstance(node, (Literal, BNode)):
            return str(node)
        return _local_name(str(node), predicate)

    for row in rows:
        if isinstance(row, KGFormatError):
            yield row
        elif row[2] != RDFS.label:  # labels are names, not facts
            line, s, p, o = row
            yield to_triple(path, line, (name(s), name(p, True), name(o)), limit)


def nt_rows(path: str, limit: int, header: bool) -> Iterator[Triple | KGFormatError]:
    from rdflib import BNode
    from rdflib.plugins.parsers.ntriples import W3CNTriplesParser

    # N-Triples is one triple per line, so parse line by line: exact line numbers, and a bad line can be
    # skipped. Labels may come after their use, so the whole file is parsed before any row is named.
    rows: list[_RdfRow | KGFormatError] = []
    bnode_ids: dict[str, BNode] = {}

    class Sink:
        def triple(self, s, p, o):
            rows.append((lineno, s, p, o))

    parser = W3CNTriplesParser(Sink(), bnode_context=bnode_ids)
    for lineno, line in numbered_lines(path):
        if isinstance(line, KGFormatError):
            rows.append(line)
            continue
        parser.line = line
        try:
            parser.parseline()
        except Exception as e:  # rdflib raises several types for bad input; all mean "bad line"
            # rdflib's messages quote its own regexes; the unparsed rest of the line says more.
            message = str(e)
            reason = "syntax error" if message.startswith("Failed to eat") else message.split(":", 1)[0]
            column = len(line) - len(parser.line or "") + 1
            rows.append(KGFormatError(path, lineno, f"invalid N-Triples ({reason}) at column {column}: {line[:80]!r}"))

    # Name blank nodes by their label in the file (_:b1 -> "b1"), not rdflib's random id.
    original = {v: BNode(k) for k, v in bnode_ids.items()}
    rows = [r if isinstance(r, KGFormatError) else (r[0], original.get(r[1], r[1]), r[2], original.get(r[3], r[3]))
            for r in rows]
    yield from _rdf_rows(path, limit, rows)


def ttl_rows(path: str, limit: int, header: bool) -> Iterator[Triple | KGFormatError]:
    from rdflib import Graph
    from rdflib.plugins.stores.memory import Memory

    class OrderedStore(Memory):  # a Graph is a set; remember parse order so rows come in file order
        def __init__(self) -> None:
            super().__init__()
            self.order: list[_RdfRow | KGFormatError] = []

        def add(self, triple, context, quoted=False):
            self.order.append((None, *triple))
            super().add(triple, context, quoted)

    # rdflib does not take a lone CR as a line break (Turtle does); CR/CRLF -> LF keeps lines as
    # numbered_lines counts them, and any CR inside a literal is whitespace that cleaning collapses anyway
    text = _read_text(path).replace("\r\n", "\n").replace("\r", "\n")
    store = OrderedStore()
    try:
        Graph(store=store).parse(data=text, format="turtle")
    except Exception as e:  # rdflib raises BadSyntax and assorted others; all mean "bad file"
        message = str(e)
        m = re.search(r"\bline (\d+)", message)
        line = int(m.group(1)) if m else None
        why = re.search(r"Bad syntax \((.*?)\) at \^", message)
        reason = why.group(1) if why else message.splitlines()[0] if message else type(e).__name__
        lines = text.split("\n")  # as rdflib counts lines; splitlines() also splits on \x0b, \u2028...
        last = max((i for i, s in enumerate(lines, 1) if s.strip()), default=1)
        if isinstance(e, IndexError) or (line is not None and line > last):
            # rdflib says "string index out of range", or a line past the end, when the file stops mid-statement
            reason, line = ("unexpected end of file" if isinstance(e, IndexError) else f"{reason}, at end of file"), last
        near = f": {lines[line - 1][:80]!r}" if line is not None and 0 < line <= len(lines) else ""
        raise KGFormatError(path, line, f"invalid Turtle ({reason}){near}") from None
    yield from _rdf_rows(path, limit, store.order)
