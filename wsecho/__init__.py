"""wsecho: Durable Objects-style WebSocket Hibernation for Python, on Tornado.

Everything an application needs is importable from here; the names are
Cloudflare's in snake_case.
"""

from wsecho.app import App
from wsecho.errors import (
    ConfigError,
    InvalidArgumentError,
    InvalidStateError,
    NoTransitionError,
    ObjectResetError,
    QuotaExceededError,
    StorageError,
    WebSocketProtocolError,
    WsechoError,
)
from wsecho.http import Headers, Request, Response
from wsecho.limits import Limits
from wsecho.objects import (
    DurableObject,
    DurableObjectId,
    DurableObjectNamespace,
    DurableObjectState,
    DurableObjectStub,
    Env,
)
from wsecho.websocket import ReadyState, WebSocket, WebSocketPair, WebSocketRequestResponsePair

__version__ = "0.1.0"

__all__ = [
    "App",
    "ConfigError",
    "DurableObject",
    "DurableObjectId",
    "DurableObjectNamespace",
    "DurableObjectState",
    "DurableObjectStub",
    "Env",
    "Headers",
    "InvalidArgumentError",
    "InvalidStateError",
    "Limits",
    "NoTransitionError",
    "ObjectResetError",
    "QuotaExceededError",
    "ReadyState",
    "Request",
    "Response",
    "StorageError",
    "WebSocket",
    "WebSocketPair",
    "WebSocketProtocolError",
    "WebSocketRequestResponsePair",
    "WsechoError",
    "__version__",
]
