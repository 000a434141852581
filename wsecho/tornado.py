"""Mount wsecho objects in your own Tornado application.

::

    import tornado.web
    import wsecho.tornado

    rooms = wsecho.tornado.Mount(my_app, prefix="/rooms/", data_dir="rooms-data")
    application = tornado.web.Application([
        (r"/api/.*", MyHandler),
        *rooms.routes(),
    ])
    await rooms.start()   # in your start-up code
    ...
    await rooms.stop()    # in your shutdown code

Requests under the prefix go to the app's ``fetch``; a WebSocket an object accepts is served
by a real ``tornado.websocket.WebSocketHandler`` (:class:`~wsecho.serve.mount.ObjectHandler`)
whose events go into the same runtime as ``python -m wsecho``'s: hibernation with the socket
kept open, tags, attachments, auto-response, close rules, storage, alarms.
"""

from wsecho.serve.mount import Mount, ObjectHandler, routes

__all__ = ["Mount", "ObjectHandler", "routes"]
