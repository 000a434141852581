"""The application the crash tests run in a real ``python -m wsecho`` process.

Every message ``put N`` stores ``N`` under ``k<N>`` and answers ``ok N``; thanks to
the output gate, an ``ok`` means the write is durable.
"""

from wsecho import App, DurableObject, Response, WebSocketPair


class Ledger(DurableObject):
    async def fetch(self, request):
        client, server = WebSocketPair()
        self.ctx.accept_web_socket(server)
        return Response(status=101, web_socket=client)

    async def web_socket_message(self, ws, message):
        n = int(message.split()[1])
        await self.ctx.storage.put(f"k{n:08d}", n)
        ws.send(f"ok {n}")


async def fetch(request, env):
    # several objects, so commits of different objects share transactions
    shard = request.url.rsplit("/", 1)[-1]
    return await env.LEDGER.get_by_name(shard).fetch(request)


app = App(fetch=fetch, bindings={"LEDGER": Ledger})
