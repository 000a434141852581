"""A test object whose RPC methods run storage operations, one turn per call."""

from __future__ import annotations

import asyncio

from wsecho import App, DurableObject, InvalidStateError, Response, WebSocketPair


class Store(DurableObject):
    def __init__(self, ctx, env):
        super().__init__(ctx, env)
        self.rec = env.REC
        self.flags = env.FLAGS
        self.rec.record("constructor", ctx.id.name)

    async def do(self, op, *args, **kwargs):
        """One storage call in its own turn."""
        return await getattr(self.ctx.storage, op)(*args, **kwargs)

    async def script(self, steps):
        """Several storage calls in one turn: [(op, args, kwargs), ...] -> results."""
        out = []
        for op, args, kwargs in steps:
            out.append(await getattr(self.ctx.storage, op)(*args, **kwargs))
        return out

    async def sql_calls(self):
        """``ctx.storage.sql`` and ``transaction_sync()`` on this key-value class: what each raises."""
        out = []
        for call in (lambda: self.ctx.storage.sql, lambda: self.ctx.storage.transaction_sync(lambda: None)):
            try:
                call()
            except InvalidStateError as exc:
                out.append(str(exc))
        return out

    async def txn(self, writes, fail=False, rollback=False):
        async def body(txn):
            for key, value in writes.items():
                await txn.put(key, value)
            seen = await txn.get(list(writes))
            if rollback:
                txn.rollback()
            if fail:
                raise ValueError("transaction body failed")
            return seen

        return await self.ctx.storage.transaction(body)

    async def nested(self, inner_rollback):
        """A transaction inside a transaction; then the outer one's txn used after it ended."""
        storage = self.ctx.storage
        kept = {}

        async def inner(txn):
            await txn.put("inner", 1)
            if inner_rollback:
                txn.rollback()

        async def outer(txn):
            await txn.put("outer", 1)
            await storage.transaction(inner)
            kept["txn"] = txn

        await storage.transaction(outer)
        try:
            await kept["txn"].put("late", 1)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return "no error"

    async def delete_all_rolled_back(self):
        await self.ctx.storage.put("a", 1)

        async def body(txn):
            await txn.delete_all()
            assert await txn.list() == {}
            txn.rollback()

        await self.ctx.storage.transaction(body)
        return await self.ctx.storage.list()

    async def write_later(self, entries, transaction=None, first=None):
        """A wait_until task puts ``entries`` once the test resolves flags["gate"] (this turn is
        over by then): plainly, or in a transaction that pauses and then "commit"s or "rollback"s;
        ``first`` is put plainly just before that transaction starts."""
        storage = self.ctx.storage
        gate = self.flags["gate"]

        async def body(txn):
            await txn.put(entries)
            for _ in range(3):
                await asyncio.sleep(0)  # nothing may commit while the transaction is open
            if transaction == "rollback":
                txn.rollback()

        async def later():
            await gate
            if transaction is None:
                await storage.put(entries)
            else:
                if first:
                    await storage.put(first)
                await storage.transaction(body)
            self.flags["written"].set_result(None)

        self.ctx.wait_until(later())

    async def txn_api(self, at_ms):
        """Every call of a transaction's txn, in one transaction: what each one saw."""

        async def body(txn):
            await txn.put({"a": 1, "b": 2})
            deleted = await txn.delete("a")
            await txn.set_alarm(at_ms)
            alarm = await txn.get_alarm()
            await txn.delete_alarm()
            return deleted, alarm, await txn.get_alarm(), await txn.list()

        return await self.ctx.storage.transaction(body)

    async def rollback_then_put(self, key, value):
        """In one turn: a transaction that puts a small ``key`` and rolls back, then put(key, value)."""

        async def body(txn):
            await txn.put(key, 1)
            txn.rollback()

        await self.ctx.storage.transaction(body)
        await self.ctx.storage.put(key, value)

    async def put_with_pauses(self, entries):
        """One put per entry, letting the event loop run between them, in one turn."""
        for key, value in entries.items():
            await self.ctx.storage.put(key, value)
            for _ in range(3):
                await asyncio.sleep(0)

    async def put_and_sync(self, key, value):
        """put(), sync(), then what the test's flags["after_sync"]() finds durable."""
        await self.ctx.storage.put(key, value)
        await self.ctx.storage.sync()
        return await self.flags["after_sync"]()

    async def sync_alone(self):
        """sync() in a turn that wrote nothing, then what flags["after_sync"]() finds durable
        (flags["syncing"] is resolved just before the call)."""
        self.flags["syncing"].set_result(None)
        await self.ctx.storage.sync()
        return await self.flags["after_sync"]()

    async def put_then_fail(self, key, value):
        await self.ctx.storage.put(key, value)
        raise RuntimeError("the handler failed after writing")

    async def alarm(self, info):
        self.rec.record("alarm", self.ctx.id.name, info.retry_count, info.is_retry)
        await self.ctx.storage.put("alarm-ran", info.retry_count)
        if self.flags.get("alarm_fails"):
            raise RuntimeError("alarm failed on purpose")
        if self.flags.get("alarm_again"):
            await self.ctx.storage.set_alarm(self.flags["alarm_again"])

    async def fetch(self, request):
        # /store/<name>/ws upgrades; messages "put k v" write and answer "ok k" (output-gated)
        client, server = WebSocketPair()
        self.ctx.accept_web_socket(server)
        return Response(status=101, web_socket=client)

    async def web_socket_message(self, ws, message):
        verb, _, rest = message.partition(" ")
        if verb == "put":
            key, _, value = rest.partition(" ")
            await self.ctx.storage.put(key, value)
            ws.send(f"ok {key}")
        elif verb == "get":
            ws.send(repr(await self.ctx.storage.get(rest)))
        elif verb == "slow":
            await asyncio.sleep(0)
            ws.send("slow done")


async def store_worker(request, env):
    name = request.url.split("/store/", 1)[-1].split("/", 1)[0]
    return await env.STORE.get_by_name(name).fetch(request)


def store_app(recorder, flags):
    return App(fetch=store_worker, bindings={"STORE": Store}, vars={"REC": recorder, "FLAGS": flags})
