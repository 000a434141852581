"""The checker of the fault tests: reads what the objects recorded (tests/apps/workers_app.py's
probe lines) and what the clients saw (tests/cluster/driver.py's history) and says what went
wrong, if anything:

- two activations of one object that overlap in time: an instance acted (a turn started, or
  was resumed after an await that suspended it) after another instance of the same object
  was constructed. What a turn runs after that without suspending is not counted: a process
  paused in the middle of a turn's synchronous code runs the rest of it when it resumes, and
  no runtime can stop that (its writes are fenced and what it sends waits for them: the
  acknowledgements below show whether any of it got out);
- an acknowledged write that was lost (a later acknowledgement of the same room with a
  count not above every earlier one);
- a room that was not served again within the bound after a fault.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable

import attrs


@attrs.define
class Activation:
    name: str
    instance: str
    pid: int
    built: float
    #: The last time one of its turns acted: started, or was resumed after an await that suspended it.
    last_acted: float
    #: That turn's start and end.
    turn: tuple[float, float] = (0.0, 0.0)


def activations(probe_lines: Iterable[str]) -> dict[str, list[Activation]]:
    """Every instance of every object: when it was built and when it last acted."""
    found: dict[tuple[str, str], Activation] = {}
    for line in probe_lines:
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "ctor":
            _, name, pid, at, instance = parts
            found[(name, instance)] = Activation(name, instance, int(pid), float(at), float(at))
        elif parts[0] == "turn":
            _, name, _pid, start, end, instance, acted = parts
            act = found.get((name, instance))
            if act is not None and float(acted) > act.last_acted:
                act.last_acted = float(acted)
                act.turn = (float(start), float(end))
    by_object: dict[str, list[Activation]] = defaultdict(list)
    for act in found.values():
        by_object[act.name].append(act)
    for acts in by_object.values():
        acts.sort(key=lambda a: a.built)
    return by_object


def overlaps(by_object: dict[str, list[Activation]]) -> list[str]:
    """Two activations of one object live at once: the earlier acted after the later was built."""
    problems = []
    for name, acts in sorted(by_object.items()):
        for earlier, later in itertools.pairwise(acts):
            if earlier.last_acted > later.built:
                start, end = earlier.turn
                problems.append(
                    f"{name}: instance {earlier.instance} (pid {earlier.pid}) acted at "
                    f"{earlier.last_acted:.3f} (a turn from {start:.3f} to {end:.3f}), after instance "
                    f"{later.instance} (pid {later.pid}) was built at {later.built:.3f}"
                )
    return problems


def acks(history_lines: Iterable[str]) -> dict[str, list[tuple[float, int]]]:
    out: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for line in history_lines:
        parts = line.split()
        if parts and parts[0] == "ack":
            out[parts[1]].append((float(parts[3]), int(parts[2])))
    for values in out.values():
        values.sort()
    return out


def lost_writes(by_room: dict[str, list[tuple[float, int]]]) -> list[str]:
    """Each acknowledgement must count above every earlier one of its room (nothing acknowledged lost)."""
    problems = []
    for room, values in sorted(by_room.items()):
        best = 0
        for at, count in values:
            if count <= best:
                problems.append(f"{room}: acknowledged {count} at {at:.3f} after {best} was acknowledged")
            best = max(best, count)
    return problems


def recovery(by_room: dict[str, list[tuple[float, int]]], since: float, rooms: Iterable[str]) -> dict[str, float]:
    """For each room, seconds from ``since`` to its first acknowledgement after it (inf: none)."""
    out = {}
    for room in rooms:
        after = [at for at, _ in by_room.get(room, []) if at > since]
        out[room] = (min(after) - since) if after else float("inf")
    return out
