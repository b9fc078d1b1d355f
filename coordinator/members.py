"""Members of a worker's JSON answer relayed into the coordinator's own, as they arrive.

``POST /run`` through the coordinator answers one JSON object made of the
job's ``/status`` document, the worker's ``/logs`` (``stdout``, ``stderr``:
up to 10 MiB of output each, up to six bytes of JSON per byte) and its
``/outputs`` listing (up to 10,000 entries).  Read whole, N such answers held
at once would cost N times that.  ``MemberRelay`` reads a worker's answer
incrementally instead and writes the members the coordinator wants as they
come, under their names in our answer:

- ``Stream``: a string value is passed on byte for byte as the worker escaped
  it (its quotes included), never held;
- ``Keep``: a small value (``truncated``) is collected, up to a cap, and
  parsed into ``kept``;
- ``Each``: an array of small values (``files``) is passed on element by
  element, each parsed and rewritten (our download URLs) on the way;
- any other member is skipped; a string without being held, anything else
  within the same cap as ``Keep``.

It is a strict scanner of one JSON object with ASCII strings (what
``json.dumps`` writes): a string cannot end early or hide a member, and a
member over its cap or a malformed answer is ``BadWorkerResponse``, never a
reason to buffer.  What one relay holds is its cap (``MAX_VALUE_BYTES``), a
member name, and at most five bytes of an escape split between two reads.
The same interface as ``rewrite.LineRewriter`` (``feed``, ``end``), so
``proxy.relay`` pauses the worker while the client lags.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from coordinator.worker_client import BadWorkerResponse

MAX_VALUE_BYTES = 256 * 1024  # one kept or skipped value, one array entry (an /outputs file)
MAX_NAME_BYTES = 1024  # one member's name

# A run of a JSON string's content: printable ASCII but '"' and '\', and whole escapes
# (written as runs between escapes: on mostly plain text, one step per run).
_PRINTABLE = rb"[\x20\x21\x23-\x5b\x5d-\x7e]*+"
_CHARS = re.compile(_PRINTABLE + rb'(?:(?:\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})' + _PRINTABLE + rb")*+")
_SPACE = re.compile(rb"[ \t\r\n]*+")
_PLAIN = re.compile(rb'[^\[\]{}",]*+')  # inside a value: what is neither string nor structure
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_OPENERS, _CLOSERS = b"[{", b"]}"


@dataclass(frozen=True)
class Stream:
    """A string member passed on as it comes, as ``name`` in our answer."""

    name: str


@dataclass(frozen=True)
class Keep:
    """A small member collected into ``MemberRelay.kept``."""


@dataclass(frozen=True)
class Each:
    """An array member passed on as ``name``, each element through ``rewrite``."""

    name: str
    rewrite: Callable[[Any], Any] = field(default=lambda value: value)


Rule = Stream | Keep | Each


class MemberRelay:
    """Feed it a worker's JSON object in order; it returns our answer's bytes to send.

    Each member written is preceded by ``", "``: our answer's first members
    (the status document) are already written.  A member is written at most
    once; a repeated one is skipped.
    """

    def __init__(self, rules: dict[str, Rule]) -> None:
        self.rules = rules
        self.kept: dict[str, Any] = {}
        self.written: set[str] = set()  # names in our answer
        self._state = "open"
        self._rule: Rule | None = None  # the current member's
        self._pending = b""  # an escape split between two reads
        self._value = bytearray()  # a value being collected
        self._purpose = ""  # what it is: "name", "value" or "entry"
        self._depth = 0
        self._in_string = False
        self._emit = False  # the string being scanned is written
        self._entries = 0
        self._seen_member = False
        self._name = ""

    # -- the interface proxy.relay uses ---------------------------------------------

    def feed(self, data: bytes) -> bytes:
        buf = self._pending + data if self._pending else data
        self._pending = b""
        out: list[bytes] = []
        i, n = 0, len(buf)
        while i < n:
            i = self._step(buf, i, n, out)
        return b"".join(out)

    def end(self) -> bytes:
        if self._state != "done" or self._pending:
            raise BadWorkerResponse("the worker's answer ended in the middle of its JSON")
        return b""

    # -- scanning ------------------------------------------------------------------------

    def _step(self, buf: bytes, i: int, n: int, out: list[bytes]) -> int:
        """Go on from ``buf[i]``; the index where this step stopped."""
        state = self._state
        if state == "string":
            return self._string(buf, i, n, out)
        if state == "collect":
            return self._collect(buf, i, n, out)
        i = _SPACE.match(buf, i).end()  # type: ignore[union-attr]
        if i == n:
            return i
        c = buf[i]
        if state == "open":
            self._expect(c, b"{")
            self._state = "name"
            return i + 1
        if state == "name":
            if c == ord("}") and not self._seen_member:
                self._state = "done"
                return i + 1
            self._expect(c, b'"')
            self._start_collect("name")
            return i
        if state == "colon":
            self._expect(c, b":")
            self._state = "value"
            return i + 1
        if state == "value":
            return self._value_start(buf, i, c, out)
        if state == "after":
            if c == ord(","):
                self._state = "name"
                return i + 1
            self._expect(c, b"}")
            self._state = "done"
            return i + 1
        if state == "array" and c == ord("]"):  # just after "[": an entry, or none
            return self._array_end(i, out)
        if state in ("array", "array-entry"):
            self._start_collect("entry")
            return i
        if state == "array-next":
            if c == ord("]"):
                return self._array_end(i, out)
            self._expect(c, b",")
            self._state = "array-entry"
            return i + 1
        raise BadWorkerResponse("the worker's answer goes on after its JSON object")

    def _value_start(self, buf: bytes, i: int, c: int, out: list[bytes]) -> int:
        rule = self._rule
        if isinstance(rule, Stream):
            self._expect(c, b'"')
            out.append(b", " + json.dumps(rule.name).encode() + b': "')
            self.written.add(rule.name)
            self._state, self._emit = "string", True
            return i + 1
        if isinstance(rule, Each):
            self._expect(c, b"[")
            out.append(b", " + json.dumps(rule.name).encode() + b": [")
            self.written.add(rule.name)
            self._state, self._entries = "array", 0
            return i + 1
        if rule is None and c == _QUOTE:  # skipped without being held, however long
            self._state, self._emit = "string", False
            return i + 1
        self._start_collect("value")
        return i

    def _string(self, buf: bytes, i: int, n: int, out: list[bytes]) -> int:
        """A string value's content, written or skipped, up to its closing quote."""
        j = _CHARS.match(buf, i).end()  # type: ignore[union-attr]
        if self._emit and j > i:
            out.append(buf[i:j])
        if j == n:
            return j
        if buf[j] == _QUOTE:
            if self._emit:
                out.append(b'"')
            self._state = "after"
            return j + 1
        if buf[j] == _BACKSLASH and n - j < 6:  # an escape the next read completes
            self._pending = buf[j:]
            return n
        raise BadWorkerResponse("the worker's answer has a malformed string")

    def _start_collect(self, purpose: str) -> None:
        self._state, self._purpose = "collect", purpose
        self._value.clear()
        self._depth, self._in_string = 0, False

    def _collect(self, buf: bytes, i: int, n: int, out: list[bytes]) -> int:
        """A small value (a name, a kept or skipped value, an entry), held up to the cap."""
        start = i
        done = False
        while i < n and not done:
            if self._in_string:
                i = _CHARS.match(buf, i).end()  # type: ignore[union-attr]
                if i == n:
                    break
                if buf[i] == _QUOTE:
                    self._in_string = False
                    i += 1
                    done = self._depth == 0
                elif buf[i] == _BACKSLASH and n - i < 6:
                    self._hold(buf[start:i])
                    self._pending = buf[i:]
                    return n
                else:
                    raise BadWorkerResponse("the worker's answer has a malformed string")
                continue
            i = _PLAIN.match(buf, i).end()  # type: ignore[union-attr]
            if i == n:
                break
            c = buf[i]
            if c == _QUOTE:
                self._in_string = True
                i += 1
            elif c in _OPENERS:
                self._depth += 1
                i += 1
            elif self._depth == 0:  # a "," "]" or "}" that ends a scalar: not the value's
                done = True
            elif c in _CLOSERS:
                self._depth -= 1
                i += 1
                done = self._depth == 0
            else:
                i += 1  # a "," inside the value
        self._hold(buf[start:i])
        if done:
            self._collected(out)
        return i

    def _hold(self, piece: bytes) -> None:
        cap = MAX_NAME_BYTES if self._purpose == "name" else MAX_VALUE_BYTES
        if len(self._value) + len(piece) > cap:
            raise BadWorkerResponse(f"the worker's answer has a value over {cap} bytes")
        self._value += piece

    def _collected(self, out: list[bytes]) -> None:
        try:
            value = json.loads(bytes(self._value))
        except ValueError:
            raise BadWorkerResponse("the worker's answer is not JSON") from None
        self._value.clear()
        purpose = self._purpose
        if purpose == "name":
            if not isinstance(value, str):
                raise BadWorkerResponse("the worker's answer has a member name that is not one")
            self._seen_member = True
            self._rule = self._rule_for(value)
            self._state = "colon"
        elif purpose == "entry":
            rule = self._rule
            assert isinstance(rule, Each)
            out.append((b", " if self._entries else b"") + json.dumps(rule.rewrite(value)).encode())
            self._entries += 1
            self._state = "array-next"
        else:
            if isinstance(self._rule, Keep):
                self.kept[self._name] = value
            self._state = "after"

    def _rule_for(self, name: str) -> Rule | None:
        self._name = name
        rule = self.rules.get(name)
        if isinstance(rule, Keep):
            return None if name in self.kept else rule
        if rule is not None and rule.name in self.written:
            return None  # a member repeated: our answer has it once
        return rule

    def _array_end(self, i: int, out: list[bytes]) -> int:
        out.append(b"]")
        self._state = "after"
        return i + 1

    @staticmethod
    def _expect(c: int, wanted: bytes) -> None:
        if c != wanted[0]:
            raise BadWorkerResponse(
                f"the worker's answer is not the JSON expected (wanted {wanted.decode()!r})")
