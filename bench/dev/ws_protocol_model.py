"""A model of flash_fwd_sm90_ws.cu's synchronization, to find a hang before a GPU does.

    python bench/dev/ws_protocol_model.py [--trials 3000]

The producer and each consumer warpgroup are written down as the sequence of mbarrier and
named-barrier operations the kernel performs for a block's walk (CF_FWD_PERSISTENT 0, 1 or 2),
in the kernel's order; a random scheduler then runs them, one operation at a time, with the
hardware's semantics:
  - an mbarrier completes a phase when `count` arrivals have come; a wait on parity p passes
    while the completed phases' count has the other parity (so a waiter two phases behind
    would pass wrongly: the model reports that as a skipped phase);
  - a named barrier (bar.sync / bar.arrive over 256 threads, two warpgroups) completes when
    both have arrived; bar.sync waits for it, bar.arrive does not.
Consumer arrivals on the stage / Q-empty barriers count per warp in the kernel (4 a
warpgroup); here a warpgroup's arrival counts 4. Tiles are walks of 0 to 5 key tiles (0: a
query tile whose rows see no key). A trial that stops with work left is a hang and is
printed with each agent's next operation.
"""

from __future__ import annotations

import argparse
import random


class Mbar:
    def __init__(self, count):
        self.count, self.arrived, self.phases = count, 0, 0

    def arrive(self, n=1):
        self.arrived += n
        if self.arrived >= self.count:
            self.arrived -= self.count
            self.phases += 1


class Named:
    def __init__(self):
        self.arrived, self.generation, self.who = 0, 0, set()


def producer(walk, stages, q_buffers, persistent):
    ops, kv, q_loads = [], 0, 0
    for n in walk:
        if n == 0:
            continue
        buf, use = q_loads % q_buffers, q_loads // q_buffers
        if persistent and use > 0:
            ops.append(("wait", ("q_empty", buf), (use - 1) & 1))
        ops.append(("arrive", ("q_full", buf), 1))
        for it in range(n):
            u = kv + it
            stage, rnd = u % stages, u // stages
            if rnd > 0:
                ops.append(("wait", ("empty", stage), (rnd - 1) & 1))
            ops.append(("arrive", ("k_full", stage), 1))
            ops.append(("arrive", ("v_full", stage), 1))
        q_loads += 1
        kv += n
    return ops


def consumer(me, walk, stages, q_buffers, across, consumers=2):
    ops, kv, q_loads = [], 0, 0
    other = (me + 1) % consumers
    turn = [("sync", me), ("arrive_named", other)]
    phase = lambda u: (u // stages) & 1  # noqa: E731
    pending, pend_use = False, 0

    def flush():
        last = pend_use % stages
        ops.append(("wait", ("v_full", last), phase(pend_use)))
        ops.extend(turn)
        ops.append(("arrive", ("empty", last), 4))

    for n in walk:
        if n == 0:
            if across and pending:
                flush()
                pending = False
            continue
        if me == consumers - 1 and q_loads == 0:
            ops.append(("arrive_named", other))
        buf = q_loads % q_buffers
        ops.append(("wait", ("q_full", buf), (q_loads // q_buffers) & 1))
        ops.append(("wait", ("k_full", kv % stages), phase(kv)))
        if across and pending:
            last = pend_use % stages
            ops.append(("wait", ("v_full", last), phase(pend_use)))
            ops.extend(turn)
            ops.append(("arrive", ("empty", last), 4))
        else:
            ops.extend(turn)
        for it in range(1, n):
            u = kv + it
            ops.append(("wait", ("k_full", u % stages), phase(u)))
            ops.append(("wait", ("v_full", (u - 1) % stages), phase(u - 1)))
            ops.extend(turn)
            ops.append(("arrive", ("empty", (u - 1) % stages), 4))
        if across:
            ops.append(("arrive", ("q_empty", buf), 4))
            pending, pend_use = True, kv + n - 1
        else:  # one tile at a time: Q released after the loop, then the last P V alone
            ops.append(("arrive", ("q_empty", buf), 4))
            last = (kv + n - 1) % stages
            ops.append(("wait", ("v_full", last), phase(kv + n - 1)))
            ops.extend(turn)
            ops.append(("arrive", ("empty", last), 4))
        q_loads += 1
        kv += n
    if across and pending:
        flush()
    return ops


def run(walk, stages, across, rng):
    q_buffers = 2 if across else 1
    bars = {}
    for s in range(stages):
        bars[("k_full", s)] = Mbar(1)
        bars[("v_full", s)] = Mbar(1)
        bars[("empty", s)] = Mbar(8)
    for b in range(q_buffers):
        bars[("q_full", b)] = Mbar(1)
        bars[("q_empty", b)] = Mbar(8)
    named = {0: Named(), 1: Named()}
    agents = [producer(walk, stages, q_buffers, True)] + [
        consumer(me, walk, stages, q_buffers, across) for me in (0, 1)]
    pos = [0, 0, 0]
    waiting_sync = {}  # agent -> (barrier, generation it waits to pass)
    while True:
        runnable = []
        for a, ops in enumerate(agents):
            if pos[a] >= len(ops):
                continue
            op = ops[pos[a]]
            if a in waiting_sync:
                nb, gen = waiting_sync[a]
                if named[nb].generation > gen:
                    runnable.append(a)
                continue
            if op[0] == "wait":
                bar = bars[op[1]]
                if (bar.phases & 1) != op[2]:
                    runnable.append(a)
            else:
                runnable.append(a)
        if not runnable:
            left = [(a, agents[a][pos[a]]) for a in range(3) if pos[a] < len(agents[a])]
            return left
        a = rng.choice(runnable)
        op = agents[a][pos[a]]
        if a in waiting_sync:
            del waiting_sync[a]
            pos[a] += 1
            continue
        kind = op[0]
        if kind == "wait":
            pos[a] += 1
        elif kind == "arrive":
            bars[op[1]].arrive(op[2])
            pos[a] += 1
        elif kind in ("sync", "arrive_named"):
            nb = named[op[1]]
            if a in nb.who:  # the same warpgroup twice in one generation: a miscount
                return [("double arrival", a, op)]
            nb.who.add(a)
            gen = nb.generation
            nb.arrived += 1
            if nb.arrived == 2:
                nb.arrived, nb.who = 0, set()
                nb.generation += 1
            if kind == "sync":
                waiting_sync[a] = (op[1], gen)
            else:
                pos[a] += 1


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=3000)
    args = ap.parse_args()
    rng = random.Random(0)
    bad = 0
    for trial in range(args.trials):
        walk = [rng.choice([0, 1, 1, 2, 3, 4, 5]) for _ in range(rng.randint(1, 7))]
        stages = rng.choice([2, 3, 4])
        across = rng.random() < 0.5
        left = run(walk, stages, across, rng)
        if left:
            bad += 1
            if bad <= 5:
                print(f"hang: walk {walk} stages {stages} across {across}: next {left}")
    print(f"{args.trials} trials, {bad} hung")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
