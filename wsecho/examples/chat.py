"""A hibernating chat: one object per room, a page to chat in, rooms that sleep while people idle.

Run it with ``python -m wsecho wsecho.examples.chat`` and open http://127.0.0.1:8787/. The
application serves the page itself at ``/`` (pick a name and a room) and ``/rooms/<room>``;
the page opens ``ws(s)://<host>/rooms/<room>/websocket?name=<user>``. Room names are 1 to 64
letters, digits, ``_`` or ``-``.

What each feature of wsecho does here:

- **One object per room** (``env.ROOMS.get_by_name(room)``); the worker serves the page
  without waking any room.
- **Presence with tags**: a joined socket has the tags ``member`` and ``user:<name>``;
  the user list is read from the tags of the open ``member`` sockets. A joining socket gets
  the first ``member_list_size`` names and the count; the others get one small ``joined``
  frame (and ``left`` when a name's last socket goes), never the whole list, so a join costs
  every member the same few bytes however full the room is (at most ``max_members``).
- **The name and the client's address in the attachment** (``{"name", "address"}``), so
  both survive hibernation.
- **Rate limits in storage**, so that reconnecting does not refill them: a token bucket of
  ``rate_limit`` messages per ``rate_window`` seconds per name, and one of
  ``address_rate_limit`` per client address (``CF-Connecting-IP``, set by the runtime; an
  IPv6 client counts by its /64), so that changing names does not help either. A bucket is a
  row ``rate:name:<name>`` or ``rate:address:<address>`` written with the message; rows whose
  bucket is full again are deleted, and at most ``max_talkers`` are kept.
- **History in storage**: the last ``history_size`` messages under keys that sort by time,
  ``msg:<13-digit epoch ms>:<12-digit sequence number>``, plus ``meta``
  (``{"seq", "at"}``: the last sequence number and time, so that keys never go backwards).
  A joining socket gets the newest of them that fit in ``history_bytes`` (64 KiB).
- **An alarm prunes** messages older than ``history_max_age`` seconds: it is set for the
  oldest message's expiry and, after pruning, for the next one. Once no message is left it
  deletes ``meta`` too, so an abandoned room leaves no rows behind.
- **Keep-alive without waking**: the constructor sets the auto-response ``ping`` → ``pong``;
  the page sends ``ping`` every ``keep_alive`` seconds and the runtime answers it while the
  room hibernates.

Protocol (JSON text frames; the keep-alive is the bare text ``ping``, answered ``pong``):

- client → server: ``{"type": "message", "text": "..."}`` (other keys are ignored).
- server → client:

  - ``{"type": "history", "messages": [{"name", "text", "at"}, ...]}``: first, on joining,
    oldest first; ``at`` is epoch milliseconds.
  - ``{"type": "presence", "users": ["ann", "bob"], "count": 2}``: second, on joining; the
    first 100 names in joining order, each once, and how many names there are.
  - ``{"type": "joined", "name": "bob"}`` and ``{"type": "left", "name": "bob"}``: to the
    other members when a name's first socket joins and its last one leaves.
  - ``{"type": "message", "name": "...", "text": "...", "at": 1767225600000}``: to every
    member, the sender included, once the message is stored.
  - ``{"type": "error", "message": "..."}``: only to the socket that sent bad input; the
    connection stays open. A refused join is the exception: the error frame is followed by
    Close 1008 for a bad name, 1013 for a full room.

Frames are JSON without ASCII escapes (an emoji is 4 bytes, not 12).

Limits, enforced by the room and checked by the page too: a name is 1 to 32 characters (spaces
around it are dropped) without control characters; a message is 1 to 1,000 characters (spaces
around it dropped) of Unicode text (no lone surrogates); a frame is at most 16,384 characters;
a name sends at most 5 messages per 10 seconds and an address 20 (frames answered with an
error do not count); a room has at most 1,000 sockets. Binary frames are answered with an
error.

The limits that are class attributes of :class:`ChatRoom` can be changed in a subclass; serve
it with ``make_app(room=MyRoom)``. The room reads the time from ``env.CLOCK`` (epoch seconds),
so tests can give it a fake clock: ``make_app(clock=FakeClock().time)``.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import re
import time
import unicodedata
from collections.abc import Callable, Iterable
from typing import Any, ClassVar
from urllib.parse import parse_qs, unquote, urlsplit

from wsecho import (
    App,
    DurableObject,
    DurableObjectState,
    Env,
    InvalidArgumentError,
    ReadyState,
    Request,
    Response,
    WebSocket,
    WebSocketPair,
    WebSocketProtocolError,
    WebSocketRequestResponsePair,
)

NAME_MAX = 32
TEXT_MAX = 1000
#: Room for TEXT_MAX characters sent as ``\uXXXX`` surrogate pairs (12 characters each).
FRAME_MAX = 16384
#: The Close code for a socket whose name was refused (RFC 6455 §7.4.1: policy violation).
CLOSE_BAD_NAME = 1008
#: The Close code for a socket refused because the room is full (IANA: Try Again Later).
CLOSE_ROOM_FULL = 1013
#: The request header in which the runtime gives the client's address, as Cloudflare does.
ADDRESS_HEADER = "CF-Connecting-IP"

#: ``/`` and ``/rooms/<room>`` serve the page; ``/rooms/<room>/websocket`` is the room.
_ROOM_PATH = re.compile(r"/rooms/([^/]+)(/websocket)?/?")
_ROOM_NAME = re.compile(r"[\w-]{1,64}")
#: Storage keys: ``msg:`` + 13-digit epoch ms + ``:`` + 12-digit sequence number.
MSG_PREFIX = "msg:"
#: ``{"seq", "at"}``: the last message's sequence number and time.
META = "meta"
#: Token buckets: ``rate:name:<name>`` and ``rate:address:<address>`` (``{"tokens", "at"}``).
RATE_PREFIX = "rate:"
#: ``delete()`` takes at most 128 keys per call.
_DELETE_CHUNK = 128


def check_name(raw: str) -> str:
    """The user name without surrounding spaces; ``InvalidArgumentError`` saying what is wrong."""
    name = raw.strip()
    if not name:
        msg = f"choose a name of 1 to {NAME_MAX} characters"
        raise InvalidArgumentError(msg)
    if len(name) > NAME_MAX:
        msg = f"a name is at most {NAME_MAX} characters; this one has {len(name)}"
        raise InvalidArgumentError(msg)
    if any(unicodedata.category(c) in ("Cc", "Cf") for c in name):
        msg = "a name cannot contain control characters"
        raise InvalidArgumentError(msg)
    return check_unicode(name, "name")


def check_unicode(text: str, what: str) -> str:
    """``text`` if it can be sent as UTF-8; a JSON ``"\\ud800"`` escape yields a lone surrogate."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = f"U+{ord(text[exc.start]):04X} at character {exc.start + 1}"
        msg = f"the {what} has a lone surrogate ({bad}): not Unicode text; pair it or leave it out"
        raise InvalidArgumentError(msg) from None
    return text


def client_address(request: Request) -> str:
    """The key of the client's address bucket: its IPv4 address, or its IPv6 /64.

    One IPv6 client usually holds a whole /64, as a person behind a NAT holds one IPv4
    address. Without the header (a runtime that does not set it) every client shares "unknown".
    """
    try:
        ip = ipaddress.ip_address(request.headers.get(ADDRESS_HEADER) or "")
    except ValueError:
        return "unknown"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def parse_message(frame: str | bytes) -> str:
    """The text of a client's ``{"type": "message", "text": ...}``; ``InvalidArgumentError`` otherwise."""
    example = '{"type": "message", "text": "hello"}'
    if isinstance(frame, bytes):
        msg = f"binary frames are not supported; send JSON text like {example}"
        raise InvalidArgumentError(msg)
    if len(frame) > FRAME_MAX:
        msg = f"a frame is at most {FRAME_MAX} characters; this one has {len(frame)}"
        raise InvalidArgumentError(msg)
    try:
        data = json.loads(frame)
    except (ValueError, RecursionError):
        msg = f"not JSON; send {example}"
        raise InvalidArgumentError(msg) from None
    if not isinstance(data, dict):
        msg = f"expected a JSON object like {example}, got {type(data).__name__}"
        raise InvalidArgumentError(msg)
    if "type" not in data:
        msg = f'the object has no "type"; send {example}'
        raise InvalidArgumentError(msg)
    if data["type"] != "message":
        msg = f'unknown type {json.dumps(data["type"])[:40]}; the only type a client sends is "message"'
        raise InvalidArgumentError(msg)
    text = data.get("text")
    if not isinstance(text, str):
        msg = f'"text" must be a string, got {json.dumps(text)[:40]}'
        raise InvalidArgumentError(msg)
    text = text.strip()
    if not text:
        msg = "the message is empty"
        raise InvalidArgumentError(msg)
    if len(text) > TEXT_MAX:
        msg = f"a message is at most {TEXT_MAX} characters; this one has {len(text)}"
        raise InvalidArgumentError(msg)
    return check_unicode(text, "message")


def encode(frame: Any) -> str:
    # Without ensure_ascii=False an emoji costs 12 bytes (two \uXXXX escapes), not 4.
    return json.dumps(frame, ensure_ascii=False)


def error_frame(message: str) -> str:
    return encode({"type": "error", "message": message})


async def fetch(request: Request, env: Any) -> Response:
    """The worker: serves the page itself and hands ``/rooms/<room>/websocket`` to the room."""
    path = urlsplit(request.url).path
    match = _ROOM_PATH.fullmatch(path)
    if path != "/" and match is None:
        return Response(f"Not found: {path}\nThe chat is at / and /rooms/<room>.\n", status=404)
    room = unquote(match[1]) if match else None
    if room is not None and not _ROOM_NAME.fullmatch(room):
        return Response(f"{room[:80]!r} is not a room name: use 1 to 64 letters, digits, _ or -\n", status=404)
    if room is not None and match is not None and match[2]:
        return await env.ROOMS.get_by_name(room).fetch(request)  # type: ignore[no-any-return]
    if request.method not in ("GET", "HEAD"):
        return Response(f"{request.method} is not allowed here; the page takes GET\n", status=405)
    page: ChatPage = env.PAGE
    return page.response(request.method)


class ChatRoom(DurableObject):
    """One chat room: its members' sockets, its history in storage, its pruning alarm."""

    #: How many messages the room keeps, and how many bytes of them a joining socket gets.
    history_size: ClassVar[int] = 50
    history_bytes: ClassVar[int] = 64 * 1024
    #: Messages older than this many seconds are pruned by the alarm.
    history_max_age: ClassVar[float] = 24 * 3600.0
    #: At most ``rate_limit`` messages per ``rate_window`` seconds per name, and
    #: ``address_rate_limit`` per client address, whatever names it uses.
    rate_limit: ClassVar[int] = 5
    address_rate_limit: ClassVar[int] = 20
    rate_window: ClassVar[float] = 10.0
    #: At most this many names and addresses may have talked in the last ``rate_window``.
    max_talkers: ClassVar[int] = 1000
    #: At most this many sockets in the room; a joining socket is shown this many names.
    max_members: ClassVar[int] = 1000
    member_list_size: ClassVar[int] = 100
    #: How often the page sends its keep-alive "ping", in seconds.
    keep_alive: ClassVar[float] = 20.0
    #: A member whose connection has more than this many bytes of broadcasts waiting is cut
    #: (its object sees 1008; the page sees the connection drop, reconnects and gets the
    #: history), so one stalled phone costs the room at most this much memory and never slows
    #: the others.
    fanout_overflow: ClassVar[str] = "close"
    fanout_queue_bytes: ClassVar[int | None] = 1024 * 1024

    def __init__(self, ctx: DurableObjectState, env: Env) -> None:
        super().__init__(ctx, env)
        # Runs on every wake, so it stays cheap. The pair is kept while the room has
        # sockets; setting it here also covers a room that empties and fills again.
        ctx.set_web_socket_auto_response(WebSocketRequestResponsePair("ping", "pong"))
        self._clock: Callable[[], float] = env.CLOCK

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def fetch(self, request: Request) -> Response:
        if (request.headers.get("Upgrade") or "").lower() != "websocket":
            return Response("This is a chat room's WebSocket: connect with Upgrade: websocket\n", status=426)
        raw = parse_qs(urlsplit(request.url).query, keep_blank_values=True).get("name", [""])[0]
        client, server = WebSocketPair()
        try:
            name = check_name(raw)
        except InvalidArgumentError as exc:
            # A browser cannot read the body of a refused handshake, so the socket is
            # accepted (without the member tag: it is nobody) to carry the reason.
            return self._refuse(client, server, str(exc), CLOSE_BAD_NAME, "invalid name")
        members = self._members()
        if len(members) >= self.max_members:
            full = f"the room is full: it has its limit of {self.max_members} members; try again later"
            return self._refuse(client, server, full, CLOSE_ROOM_FULL, "room is full")
        # Another tab of the same name is not news to the others.
        new_name = not self._open(self.ctx.get_web_sockets(f"user:{name}"))
        self.ctx.accept_web_socket(server, ["member", f"user:{name}"])
        server.serialize_attachment({"name": name, "address": client_address(request)})
        server.send(encode({"type": "history", "messages": await self._history()}))
        server.send(self._presence())
        if new_name:
            # One small frame to the others: presence goes out as a change, never as the list.
            self.ctx.broadcast(encode({"type": "joined", "name": name}), tag="member", exclude=[server])
        return Response(status=101, web_socket=client)

    async def web_socket_message(self, ws: WebSocket, message: str | bytes) -> None:
        member = ws.deserialize_attachment()
        if not isinstance(member, dict):
            return  # a socket that was refused; it is already closing
        try:
            text = parse_message(message)
            entry = await self._store(member["name"], member["address"], text, self._now_ms())
        except InvalidArgumentError as exc:
            ws.send(error_frame(str(exc)))
            return
        # Held back by the output gate until the message is durable: nobody sees a message
        # that a crash could still lose.
        self.ctx.broadcast(encode({"type": "message", **entry}), tag="member")

    async def web_socket_close(self, ws: WebSocket, code: int, reason: str, was_clean: bool) -> None:
        # The runtime answers the peer's Close (same code) since this handler does not.
        self._left(ws)

    async def web_socket_error(self, ws: WebSocket, error: WebSocketProtocolError) -> None:
        self._left(ws)

    async def alarm(self) -> None:
        """Prune every message older than ``history_max_age``; set the alarm for the next one."""
        storage = self.ctx.storage
        now = self._now_ms()
        cutoff = now - int(self.history_max_age * 1000)
        if cutoff >= 0:
            expired = await storage.list(prefix=MSG_PREFIX, end=f"{MSG_PREFIX}{cutoff + 1:013d}")
            await self._delete(expired)
        await self._prune_rates(now)
        oldest = await storage.list(prefix=MSG_PREFIX, limit=1)
        for entry in oldest.values():
            await storage.set_alarm(self._expiry(entry))
        if not oldest:
            # Nothing is left to keep in order, so the room's storage is empty again.
            await storage.delete(META)

    # -- the room's parts -------------------------------------------------------------------

    def _refuse(self, client: WebSocket, server: WebSocket, why: str, code: int, reason: str) -> Response:
        self.ctx.accept_web_socket(server)
        server.send(error_frame(why))
        server.close(code, reason)
        return Response(status=101, web_socket=client)

    @staticmethod
    def _open(sockets: Iterable[WebSocket]) -> list[WebSocket]:
        # A socket that is joining is still CONNECTING (frames sent to it go out once the
        # handshake is done); one that is closing is no longer in the room.
        return [ws for ws in sockets if ws.ready_state <= ReadyState.OPEN]

    def _members(self) -> list[WebSocket]:
        return self._open(self.ctx.get_web_sockets("member"))

    def _left(self, ws: WebSocket) -> None:
        tags = self.ctx.get_tags(ws)
        if "member" not in tags:
            return  # a socket that was refused
        name = next(t for t in tags if t.startswith("user:"))
        if not self._open(self.ctx.get_web_sockets(name)):  # its last tab closed
            # (The closing socket is no longer open: the broadcast skips it.)
            self.ctx.broadcast(encode({"type": "left", "name": name.removeprefix("user:")}), tag="member")

    def _presence(self) -> str:
        """The joining socket's view of the room: the first names and how many there are."""
        users: dict[str, None] = {}
        for ws in self._members():
            for tag in self.ctx.get_tags(ws):
                if tag.startswith("user:"):
                    users[tag.removeprefix("user:")] = None
        shown = list(users)[: self.member_list_size]
        return encode({"type": "presence", "users": shown, "count": len(users)})

    async def _history(self) -> list[Any]:
        """The newest messages, oldest first, as many as fit in ``history_bytes`` with the frame."""
        newest = await self.ctx.storage.list(prefix=MSG_PREFIX, reverse=True, limit=self.history_size)
        budget = self.history_bytes - len(encode({"type": "history", "messages": []}))
        kept: list[Any] = []
        for entry in newest.values():
            budget -= len(encode(entry).encode()) + len(", ")
            if budget < 0:
                break
            kept.append(entry)
        return kept[::-1]

    async def _store(self, name: str, address: str, text: str, now: int) -> dict[str, Any]:
        """Spend the sender's tokens and store the message; ``InvalidArgumentError`` if it may not."""
        storage = self.ctx.storage
        limits = {
            f"{RATE_PREFIX}name:{name}": self.rate_limit,
            f"{RATE_PREFIX}address:{address}": self.address_rate_limit,
        }
        rows = await storage.get([META, *limits])
        buckets: dict[str, Any] = {}
        for key, limit in limits.items():
            bucket, wait = take_token(rows.get(key), limit, self.rate_window, now)
            if bucket is None:
                whose = "" if key.startswith(f"{RATE_PREFIX}name:") else " from one address"
                msg = (
                    f"slow down: at most {limit} messages per {self.rate_window:g} seconds{whose}; "
                    f"try again in {wait:.1f} s"
                )
                raise InvalidArgumentError(msg)
            buckets[key] = bucket
        if not rows.keys() >= limits.keys():
            await self._make_room_for_talkers(now, len(limits.keys() - rows.keys()))
        meta = rows.get(META) or {"seq": 0, "at": 0}
        # Keys sort by time; a clock that stepped back must not put a message before older ones.
        at = max(now, meta["at"])
        seq = meta["seq"] + 1
        entry = {"name": name, "text": text, "at": at}
        await storage.put({f"{MSG_PREFIX}{at:013d}:{seq:012d}": entry, META: {"seq": seq, "at": at}, **buckets})
        stored = await storage.list(prefix=MSG_PREFIX)
        excess = max(len(stored) - self.history_size, 0)
        await self._delete(list(stored)[:excess])
        if await storage.get_alarm() is None:
            oldest = list(stored.values())[excess]
            await storage.set_alarm(self._expiry(oldest))
        return entry

    async def _make_room_for_talkers(self, now: int, new: int) -> None:
        """Make room for ``new`` rate-limit rows, or refuse if the room holds ``max_talkers``."""
        kept = await self._prune_rates(now)
        if kept + new > self.max_talkers:
            msg = (
                f"the room is busy: {kept} names and addresses talked in the last "
                f"{self.rate_window:g} seconds (the limit is {self.max_talkers}); try again in a moment"
            )
            raise InvalidArgumentError(msg)

    async def _prune_rates(self, now: int) -> int:
        """Delete the rate-limit rows whose bucket is full again; return how many are left."""
        rows = await self.ctx.storage.list(prefix=RATE_PREFIX)
        window = int(self.rate_window * 1000)
        full = [key for key, row in rows.items() if now - int(row["at"]) >= window]
        await self._delete(full)
        return len(rows) - len(full)

    def _expiry(self, entry: dict[str, Any]) -> int:
        return int(entry["at"]) + int(self.history_max_age * 1000)

    async def _delete(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        for i in range(0, len(keys), _DELETE_CHUNK):
            await self.ctx.storage.delete(keys[i : i + _DELETE_CHUNK])


def take_token(
    bucket: dict[str, Any] | None, limit: int, window: float, now: int
) -> tuple[dict[str, Any] | None, float]:
    """Spend a token of a bucket of ``limit`` tokens that refills over ``window`` seconds.

    ``bucket`` is ``{"tokens", "at"}`` (None: a full one); returns the bucket after spending,
    or None and the seconds to wait for a token.
    """
    per_ms = limit / (window * 1000)
    tokens = float(limit)
    if bucket is not None:
        elapsed = max(now - int(bucket["at"]), 0)  # a clock that stepped back refills nothing
        tokens = min(tokens, float(bucket["tokens"]) + elapsed * per_ms)
    if tokens < 1:
        return None, (1 - tokens) / per_ms / 1000
    return {"tokens": tokens - 1, "at": now}, 0.0


class ChatPage:
    """The page, rendered once with the room's limits, and the headers it is served with."""

    def __init__(self, room: type[ChatRoom]) -> None:
        config = {
            "nameMax": NAME_MAX,
            "textMax": TEXT_MAX,
            "listMax": room.member_list_size,
            "keepAliveMs": int(room.keep_alive * 1000),
        }
        self.body = (
            PAGE.replace("/*CONFIG*/{}", json.dumps(config)).replace("/*STYLE*/", STYLE).replace("/*SCRIPT*/", SCRIPT)
        ).encode()
        # Only this page's own script and style may run: a message that slipped HTML in
        # could not load or run anything.
        self.headers = {
            "Content-Type": "text/html;charset=UTF-8",
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": (
                f"default-src 'none'; script-src '{_sha256(SCRIPT)}'; style-src '{_sha256(STYLE)}'; "
                "connect-src 'self' ws: wss:; img-src data:; base-uri 'none'; form-action 'self'"
            ),
        }

    def response(self, method: str) -> Response:
        if method == "HEAD":  # the headers a GET would get, no body
            return Response(None, headers={**self.headers, "Content-Length": str(len(self.body))})
        return Response(self.body, headers=self.headers)


def _sha256(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


def make_app(*, room: type[ChatRoom] = ChatRoom, clock: Callable[[], float] = time.time) -> App:
    """The chat application with ``room`` as the room class and ``clock`` (epoch seconds) as its time."""
    return App(fetch=fetch, bindings={"ROOMS": room}, vars={"CLOCK": clock, "PAGE": ChatPage(room)})


STYLE = """
:root { color-scheme: light; --accent: #2f6fde; --muted: #6b7280; --line: #e5e7eb; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, sans-serif; color: #111827; background: #f3f4f6; }
header { display: flex; align-items: center; gap: 12px; padding: 12px 20px; background: #fff;
  border-bottom: 1px solid var(--line); }
header h1 { margin: 0; font-size: 18px; }
header .room { color: var(--muted); }
#status { margin-left: auto; padding: 2px 10px; border-radius: 999px; font-size: 13px;
  background: #fef3c7; color: #92400e; }
#status.connected { background: #dcfce7; color: #166534; }
main { max-width: 900px; margin: 20px auto; padding: 0 16px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 18px; }
#join label { display: block; margin: 0 0 12px; font-weight: 600; }
#join input { display: block; width: 100%; margin-top: 4px; font-weight: 400; }
input { font: inherit; padding: 8px 10px; border: 1px solid #d1d5db; border-radius: 6px; }
button { font: inherit; padding: 8px 16px; border: 0; border-radius: 6px; background: var(--accent);
  color: #fff; cursor: pointer; }
#chat { display: grid; grid-template-columns: 1fr 190px; gap: 16px; }
#log { list-style: none; margin: 0; padding: 0; height: 380px; overflow-y: auto; }
#log li { padding: 6px 2px; border-bottom: 1px solid #f3f4f6; overflow-wrap: anywhere; }
#log .name { font-weight: 600; margin-right: 6px; }
#log .mine .name { color: var(--accent); }
#log time { color: var(--muted); font-size: 12px; margin-right: 8px; }
#send { display: flex; gap: 8px; margin-top: 12px; }
#send input { flex: 1; }
aside h2 { margin: 0 0 8px; font-size: 14px; color: var(--muted); text-transform: uppercase; }
#people { list-style: none; margin: 0; padding: 0; }
#people li::before { content: "\\25CF  "; color: #22c55e; }
#error { margin: 0 0 12px; padding: 10px 14px; border-radius: 8px; background: #fee2e2; color: #991b1b; }
.hint { color: var(--muted); font-size: 13px; margin: 12px 0 0; }
[hidden] { display: none !important; }
"""

SCRIPT = """
"use strict";
const config = JSON.parse(document.getElementById("config").textContent);
const $ = (id) => document.getElementById(id);
const match = location.pathname.match(/^\\/rooms\\/([^/]+)\\/?$/);
const room = match ? decodeURIComponent(match[1]) : null;
const NAME_KEY = "wsecho-chat:name";
// Each tab keeps its own name (a reload rejoins as the same person); the last name used
// anywhere only pre-fills the form.
const state = { ws: null, name: sessionStorage.getItem(NAME_KEY), users: [], count: 0, messages: 0,
  pongs: 0, status: "not joined", retry: 0, errors: [] };

function setStatus(text) {
  state.status = text;
  $("status").textContent = text;
  $("status").className = text === "connected" ? "connected" : "";
}

function showError(text) {
  state.errors.push(text);
  $("error").textContent = text;
  $("error").hidden = false;
  clearTimeout(showError.timer);
  showError.timer = setTimeout(() => { $("error").hidden = true; }, 6000);
}

function addMessage(m) {
  const li = document.createElement("li");
  if (m.name === state.name) li.className = "mine";
  const when = document.createElement("time");
  when.textContent = new Date(m.at).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  const who = document.createElement("span");
  who.className = "name";
  who.textContent = m.name;
  const text = document.createElement("span");
  text.textContent = m.text;
  li.append(when, who, text);
  $("log").append(li);
  $("log").scrollTop = $("log").scrollHeight;
  state.messages += 1;
}

function showPeople(users, count) {
  // The room sends the first names and the count on joining, then only who came and went.
  state.users = users;
  state.count = count;
  $("count").textContent = `(${count})`;
  $("people").replaceChildren(...users.map((u) => {
    const li = document.createElement("li");
    li.textContent = u;
    return li;
  }));
  $("more").textContent = count > users.length ? `and ${count - users.length} more` : "";
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const url = `${scheme}://${location.host}/rooms/${encodeURIComponent(room)}/websocket` +
    `?name=${encodeURIComponent(state.name)}`;
  setStatus(state.retry ? "reconnecting…" : "connecting…");
  const ws = new WebSocket(url);
  state.ws = ws;
  ws.onopen = () => { state.retry = 0; setStatus("connected"); $("text").focus(); };
  ws.onmessage = (event) => {
    if (event.data === "pong") { state.pongs += 1; return; }  // the keep-alive's answer
    const data = JSON.parse(event.data);
    if (data.type === "history") {
      $("log").replaceChildren();
      state.messages = 0;
      data.messages.forEach(addMessage);
    } else if (data.type === "message") {
      addMessage(data);
    } else if (data.type === "presence") {
      showPeople(data.users, data.count);
    } else if (data.type === "joined") {
      const shown = state.users.length < config.listMax ? [...state.users, data.name] : state.users;
      showPeople(shown, state.count + 1);
    } else if (data.type === "left") {
      showPeople(state.users.filter((u) => u !== data.name), Math.max(state.count - 1, 0));
    } else if (data.type === "error") {
      showError(data.message);
    }
  };
  ws.onclose = (event) => {
    if (state.ws !== ws) return;
    state.ws = null;
    if (event.code === 1008) {  // the room refused the name: choose another
      sessionStorage.removeItem(NAME_KEY);
      state.name = null;
      setStatus("not joined");
      showJoin();
      return;
    }
    // A restart or a lost network: rejoin (the history comes again), backing off up to 10 s.
    state.retry += 1;
    setStatus("reconnecting…");
    setTimeout(connect, Math.min(500 * 2 ** state.retry, 10000));
  };
}

function keepAlive() {
  // Answered by the runtime ("pong") without waking the room.
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send("ping");
}

function send(text) {
  text = text.trim();
  if (!text) return false;
  if (text.length > config.textMax) {
    showError(`a message is at most ${config.textMax} characters`);
    return false;
  }
  if (!state.ws || state.ws.readyState !== WebSocket.OPEN) {
    showError("not connected yet; try again in a moment");
    return false;
  }
  state.ws.send(JSON.stringify({ type: "message", text }));
  return true;
}

function showJoin() {
  $("chat").hidden = true;
  $("join").hidden = false;
  $("room-field").hidden = room !== null;
  $("name").value = state.name || localStorage.getItem(NAME_KEY) || "";
  $("name").focus();
}

function join(name) {
  state.name = name;
  sessionStorage.setItem(NAME_KEY, name);
  localStorage.setItem(NAME_KEY, name);
  $("join").hidden = true;
  $("chat").hidden = false;
  $("who").textContent = name;
  connect();
}

$("join").addEventListener("submit", (event) => {
  event.preventDefault();
  const name = $("name").value.trim();
  if (!name || name.length > config.nameMax) {
    showError(`choose a name of 1 to ${config.nameMax} characters`);
    return;
  }
  if (room === null) {
    const target = $("room").value.trim() || "lobby";
    if (!/^[\\p{L}\\p{N}_-]{1,64}$/u.test(target)) {
      showError("a room name is 1 to 64 letters, digits, _ or -");
      return;
    }
    sessionStorage.setItem(NAME_KEY, name);
    localStorage.setItem(NAME_KEY, name);
    location.assign(`/rooms/${encodeURIComponent(target)}`);
    return;
  }
  join(name);
});

$("send").addEventListener("submit", (event) => {
  event.preventDefault();
  if (send($("text").value)) $("text").value = "";
});

$("name").maxLength = config.nameMax;
$("text").maxLength = config.textMax;
$("room-label").textContent = room === null ? "pick a room" : `room ${room}`;
document.title = room === null ? "wsecho chat" : `${room} · wsecho chat`;
setInterval(keepAlive, config.keepAliveMs);
if (room !== null && state.name) join(state.name); else showJoin();
window.chat = { state, send, keepAlive };
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>wsecho chat</title>
<link rel="icon" href="data:,">
<style>/*STYLE*/</style>
<script id="config" type="application/json">/*CONFIG*/{}</script>
</head>
<body>
<header>
  <h1>wsecho chat</h1>
  <span class="room" id="room-label"></span>
  <span id="status">not joined</span>
</header>
<main>
  <p id="error" role="alert" hidden></p>
  <form id="join" class="card" hidden>
    <label>Your name <input id="name" autocomplete="nickname" required></label>
    <label id="room-field">Room <input id="room" value="lobby"></label>
    <button>Join</button>
    <p class="hint">Rooms sleep while nobody talks; your connection stays open and you will not notice.</p>
  </form>
  <section id="chat" hidden>
    <div class="card">
      <ul id="log" aria-live="polite"></ul>
      <form id="send">
        <input id="text" autocomplete="off" placeholder="Say something">
        <button>Send</button>
      </form>
    </div>
    <aside class="card">
      <h2>In the room <span id="count"></span></h2>
      <ul id="people"></ul>
      <p class="hint" id="more"></p>
      <p class="hint">You are <strong id="who"></strong>.</p>
    </aside>
  </section>
</main>
<script>/*SCRIPT*/</script>
</body>
</html>
"""

app = make_app()
