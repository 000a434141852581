"""Cloudflare's SQL storage examples, ported; served by the runtime tests and by a real process.

- ``COUNTER``: a counter in a table (one row per name), and its last caller in the key-value
  API: each ``increment`` turn writes both, so they commit together.
- ``ARTISTS``: Cloudflare's ``artist`` table with an index, queried through it.
- ``BANK``: a transfer in ``transaction_sync``: all of it or none of it.

Over a WebSocket (``/counter/<name>``), ``inc N`` adds 1 and stores ``k<N>`` in the
key-value API in the same turn, and answers ``ok N <count>``: once the answer arrives, both
writes are durable.
"""

from __future__ import annotations

from wsecho import App, DurableObject, Response, WebSocketPair


class Counter(DurableObject):
    storage = "sql"

    def __init__(self, ctx, env):
        super().__init__(ctx, env)
        self.sql = ctx.storage.sql
        self.sql.exec("CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")

    async def increment(self, who="someone"):
        value = self.sql.exec(
            "INSERT INTO counters (name, value) VALUES ('hits', 1) "
            "ON CONFLICT (name) DO UPDATE SET value = value + 1 RETURNING value"
        ).one()["value"]
        await self.ctx.storage.put("last", who)
        return value

    async def increment_and_abort(self):
        await self.increment("aborted")
        self.ctx.abort("the test resets the object mid-turn")

    async def read(self):
        rows = self.sql.exec("SELECT value FROM counters WHERE name = 'hits'").to_list()
        return {"value": rows[0]["value"] if rows else 0, "last": await self.ctx.storage.get("last")}

    def run(self, query, *bindings):
        cursor = self.sql.exec(query, *bindings)
        return {
            "rows": cursor.to_list(),
            "columns": cursor.column_names,
            "read": cursor.rows_read,
            "written": cursor.rows_written,
        }

    def size(self):
        return self.ctx.storage.sql.database_size

    async def wipe(self):
        await self.ctx.storage.delete_all()

    async def fetch(self, request):
        client, server = WebSocketPair()
        self.ctx.accept_web_socket(server)
        return Response(status=101, web_socket=client)

    async def web_socket_message(self, ws, message):
        n = int(message.split()[1])
        value = self.sql.exec(
            "INSERT INTO counters (name, value) VALUES ('hits', 1) "
            "ON CONFLICT (name) DO UPDATE SET value = value + 1 RETURNING value"
        ).one()["value"]
        await self.ctx.storage.put(f"k{n:08d}", n)
        ws.send(f"ok {n} {value}")


class Artists(DurableObject):
    """Cloudflare's SQL API example: a table, rows inserted in one exec(), an index."""

    storage = "sql"

    def __init__(self, ctx, env):
        super().__init__(ctx, env)
        self.sql = ctx.storage.sql
        self.sql.exec(
            "CREATE TABLE IF NOT EXISTS artist (artistid INTEGER PRIMARY KEY, artistname TEXT);"
            "CREATE INDEX IF NOT EXISTS artist_by_name ON artist (artistname);"
        )

    def seed(self):
        self.sql.exec(
            "INSERT OR IGNORE INTO artist (artistid, artistname) VALUES (123, 'Alice'), (456, 'Bob'), (789, 'Charlie')"
        )

    def by_name(self, name):
        return [row["artistid"] for row in self.sql.exec("SELECT artistid FROM artist WHERE artistname = ?", name)]

    def plan(self, name):
        rows = self.sql.exec("EXPLAIN QUERY PLAN SELECT artistid FROM artist WHERE artistname = ?", name).raw()
        return " ".join(str(row[-1]) for row in rows)

    def all(self):
        return list(self.sql.exec("SELECT artistid, artistname FROM artist ORDER BY artistid").raw())


class Bank(DurableObject):
    storage = "sql"

    def __init__(self, ctx, env):
        super().__init__(ctx, env)
        self.sql = ctx.storage.sql
        self.sql.exec("CREATE TABLE IF NOT EXISTS accounts (name TEXT PRIMARY KEY, balance INTEGER NOT NULL)")

    def open(self, name, balance):
        self.sql.exec("INSERT INTO accounts VALUES (?, ?)", name, balance)

    def transfer(self, source, target, amount):
        def move():
            self.sql.exec("UPDATE accounts SET balance = balance + ? WHERE name = ?", amount, target)
            self.sql.exec("UPDATE accounts SET balance = balance - ? WHERE name = ?", amount, source)
            if self.sql.exec("SELECT balance FROM accounts WHERE name = ?", source).one()["balance"] < 0:
                raise ValueError(f"{source} has not {amount}")

        try:
            self.ctx.storage.transaction_sync(move)
        except ValueError as exc:
            return str(exc)
        return "done"

    def balances(self):
        return {row["name"]: row["balance"] for row in self.sql.exec("SELECT * FROM accounts ORDER BY name")}


async def fetch(request, env):
    name = request.url.rsplit("/", 1)[-1]
    return await env.COUNTER.get_by_name(name).fetch(request)


app = App(fetch=fetch, bindings={"COUNTER": Counter, "ARTISTS": Artists, "BANK": Bank})
