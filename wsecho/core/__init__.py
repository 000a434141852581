"""The sans-IO core: lifecycle tables, frames, handshake rules, idle index, alarm schedule, stats.

Nothing here imports asyncio, sqlite3, fcntl or tornado, or reads a clock: time comes in as
an argument, and what must happen goes out as a return value. A test fails on any such import.
"""
