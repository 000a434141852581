"""Applications shared by the tests."""

from urllib.parse import urlsplit

from wsecho import Response


async def room_fetch(request, env):
    """The worker ``fetch`` of the apps whose objects are rooms: ``/room/NAME`` reaches object
    NAME of ``env.ROOM``; any other path is 404."""
    parts = urlsplit(request.url).path.strip("/").split("/")
    if parts[0] == "room" and len(parts) == 2:
        return await env.ROOM.get_by_name(parts[1]).fetch(request)
    return Response("not found", status=404)
