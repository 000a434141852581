"""wsecho: Durable Objects-style WebSocket Hibernation for Python, on Tornado.

Everything an application needs is importable from here; the names are
Cloudflare's in snake_case.
"""

from wsecho.api.app import App
from wsecho.api.http import Headers, Request, Response
from wsecho.api.ids import DurableObjectId
from wsecho.api.objects import (
    DurableObject,
    DurableObjectNamespace,
    DurableObjectState,
    DurableObjectStub,
    Env,
)
from wsecho.api.websocket import ReadyState, WebSocket, WebSocketPair, WebSocketRequestResponsePair
from wsecho.core.errors import (
    ConfigError,
    InvalidArgumentError,
    InvalidStateError,
    NoTransitionError,
    ObjectResetError,
    OutboundConnectError,
    QuotaExceededError,
    SqlError,
    StorageError,
    WebSocketProtocolError,
    WsechoError,
)
from wsecho.core.limits import Limits

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
    "OutboundConnectError",
    "QuotaExceededError",
    "ReadyState",
    "Request",
    "Response",
    "SqlError",
    "StorageError",
    "WebSocket",
    "WebSocketPair",
    "WebSocketProtocolError",
    "WebSocketRequestResponsePair",
    "WsechoError",
    "__version__",
]
