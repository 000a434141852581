"""What applications touch: App, DurableObject, ids, namespaces, Request, Response, WebSocket,
storage, codecs.

It reaches the runtime only through small Protocols defined beside their users and handed in
at construction: :class:`~wsecho.api.objects.Router` (stubs), :class:`~wsecho.api.objects.ObjectPort`
(``ctx``), :class:`~wsecho.api.websocket.SocketOwner` (sockets) and
:class:`~wsecho.api.storage.StoragePort` (``ctx.storage``). It never imports the runtime.
"""
