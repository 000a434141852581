"""wsecho.tornado: objects mounted in an existing Tornado application (the example app)."""

import asyncio

import pytest
import tornado.httpserver
import tornado.netutil
from tornado.httpclient import AsyncHTTPClient
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

import wsecho.tornado
from wsecho.core.lifecycle import ObjectState
from wsecho.examples.tornado_app import make_application, rooms_app


@pytest.fixture
def served(io_loop):
    rooms = wsecho.tornado.Mount(rooms_app, prefix="/rooms/", data_dir=":memory:", sweeper=False)
    io_loop.run_sync(rooms.start)
    (sock,) = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server = tornado.httpserver.HTTPServer(make_application(rooms))
    server.add_sockets([sock])
    yield rooms, sock.getsockname()[1]
    server.stop()
    io_loop.run_sync(lambda: rooms.stop(timeout=2))
    io_loop.run_sync(server.close_all_connections)


@pytest.mark.gen_test(timeout=20)
async def test_a_room_mounted_in_a_tornado_app_sees_its_login_cookie_and_hibernates(served):
    rooms, port = served
    http = AsyncHTTPClient()
    home = await http.fetch(f"http://127.0.0.1:{port}/")
    assert home.body == b"hello stranger; rooms are under /rooms/\n"  # the app's own handler
    login = await http.fetch(f"http://127.0.0.1:{port}/login?name=ann")
    cookie = login.headers["Set-Cookie"].split(";", 1)[0]
    refused = await http.fetch(f"http://127.0.0.1:{port}/rooms/kitchen", raise_error=False)
    assert (refused.code, refused.body) == (401, b"log in first: /login?name=...\n")

    url = f"ws://127.0.0.1:{port}/rooms/kitchen"
    async with connect(url, additional_headers={"Cookie": cookie}) as ws:
        await ws.send("hi")
        assert await asyncio.wait_for(ws.recv(), 5) == "ann: hi"
        host = rooms.runtime.find("ROOMS", "kitchen")
        rooms.runtime.hibernate(host)  # as the sweep does once the room is idle
        assert host.lifecycle.state is ObjectState.HIBERNATING
        await ws.send("still here")  # the socket stayed open; the message wakes the room
        assert await asyncio.wait_for(ws.recv(), 5) == "ann: still here"
        assert host.constructions == 2
        await ws.close(4000, "leaving")
        assert ws.close_code == 4000  # answered by the object's web_socket_close with the peer's code
        assert ws.close_reason == "bye"


@pytest.mark.gen_test(timeout=20)
async def test_stopping_the_mount_closes_its_sockets_with_1001(served):
    rooms, port = served
    login = await AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}/login?name=bob")
    cookie = login.headers["Set-Cookie"].split(";", 1)[0]
    async with connect(f"ws://127.0.0.1:{port}/rooms/x", additional_headers={"Cookie": cookie}) as ws:
        stopping = asyncio.ensure_future(rooms.stop(timeout=2))
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 1001
        await stopping
