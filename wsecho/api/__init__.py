"""What applications touch: App, DurableObject, ids, namespaces, Request, Response, WebSocket,
storage, codecs. It reaches the runtime only through the small protocols of :mod:`wsecho.api.ports`,
handed in at construction."""
