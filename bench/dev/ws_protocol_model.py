"""A model of flash_fwd_sm90_ws.cu's synchronization, to find a hang before a GPU does.

    python bench/dev/ws_protocol_model.py [--trials 3000] [--cluster]

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


def _runnable(agents, pos, waiting, named, bars) -> list[int]:
    """The agents whose next operation can go now: one past a named barrier whose generation
    moved on, a wait whose mbarrier phase has the other parity, anything else."""
    out = []
    for a, ops in enumerate(agents):
        if pos[a] >= len(ops):
            continue
        op = ops[pos[a]]
        if a in waiting:
            nb, gen = waiting[a]
            if named[nb].generation > gen:
                out.append(a)
        elif op[0] != "wait" or (bars[op[1]].phases & 1) != op[2]:
            out.append(a)
    return out


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
        runnable = _runnable(agents, pos, waiting_sync, named, bars)
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


# -- clusters of two (CF_FWD_CLUSTER=2 with CF_FWD_TMA; one tile a block, n key tiles) ----------
# Each block: a producer thread (TMA) and two consumer warpgroups. The producer arms its own
# full mbarriers with a whole tile's bytes (2 halves) and issues its half as a multicast, which
# lands later, at random, as one half on each block's barrier. A stage's empty mbarrier counts
# both blocks' consumer warps (2 x 2 x 4). The checks: no hang; no half lands while the phase
# it belongs to is not the barrier's current one; no half of round r lands on a block whose
# consumers have not all released round r - 1 of that stage (a refill under a reader); no
# arrival or half reaches a block that has exited (its agents all done); `bug` injects one.


class TxBar:
    """An mbarrier with a transaction count: a phase completes when `count` arrivals have
    come and the bytes expected have landed (landing first is allowed: tx goes negative)."""

    def __init__(self, count):
        self.count, self.arrived, self.tx, self.phases = count, 0, 0, 0

    def _settle(self):
        if self.arrived >= self.count and self.tx == 0:
            self.arrived -= self.count
            self.phases += 1

    def arrive(self, n=1, expect=0):
        self.arrived += n
        self.tx += expect
        self._settle()

    def land(self, n):
        self.tx -= n
        self._settle()


def cluster_block_ops(me, n, stages, bug):
    """(producer ops, [consumer ops x 2]) of block `me`."""
    peer = 1 - me
    prod = [("arrive", (me, "q_full", 0), 1, 1), ("issue_q",)]
    for u in range(n):
        stage, rnd = u % stages, u // stages
        if rnd > 0:
            prod.append(("wait", (me, "empty", stage), (rnd - 1) & 1))
        for full in ("k_full", "v_full"):
            prod.append(("arrive", (me, full, stage), 1, 2))
            prod.append(("issue", full, stage, rnd))
    if bug != "no_tail":
        for s in range(stages):
            uses = (n - s + stages - 1) // stages
            if uses > 0:
                prod.append(("wait", (me, "empty", s), (uses - 1) & 1))
    phase = lambda u: (u // stages) & 1  # noqa: E731
    cons = []
    for wg in (0, 1):
        other = 1 - wg
        turn = [("sync", (me, wg)), ("arrive_named", (me, other))]
        ops = []
        if wg == 1:
            ops.append(("arrive_named", (me, other)))
        ops.append(("wait", (me, "q_full", 0), 0))
        ops.append(("wait", (me, "k_full", 0), 0))
        ops.append(("read", 0, 0))
        ops.extend(turn)

        def release(u):
            st = u % stages
            out = [("unread", st, u // stages), ("arrive", (me, "empty", st), 4, 0)]
            if bug != "local_release":
                out.append(("arrive", (peer, "empty", st), 4, 0))
            return out

        for it in range(1, n):
            ops.append(("wait", (me, "k_full", it % stages), phase(it)))
            ops.append(("read", it % stages, it // stages))
            ops.append(("wait", (me, "v_full", (it - 1) % stages), phase(it - 1)))
            ops.extend(turn)
            ops.extend(release(it - 1))
        ops.append(("wait", (me, "v_full", (n - 1) % stages), phase(n - 1)))
        ops.extend(turn)
        if bug != "no_last_release":
            ops.extend(release(n - 1))
        cons.append(ops)
    return prod, cons


def run_cluster(n, stages, rng, bug=None):
    """None if the pair finishes cleanly, else what went wrong."""
    count = 8 if bug == "empty_count" else 16
    bars = {}
    for blk in (0, 1):
        bars[(blk, "q_full", 0)] = TxBar(1)
        for s in range(stages):
            bars[(blk, "k_full", s)] = TxBar(1)
            bars[(blk, "v_full", s)] = TxBar(1)
            bars[(blk, "empty", s)] = TxBar(count)
    named = {(blk, wg): Named() for blk in (0, 1) for wg in (0, 1)}
    agents, owner = [], []
    for blk in (0, 1):
        prod, cons = cluster_block_ops(blk, n, stages, bug)
        agents += [prod] + cons
        owner += [(blk, None), (blk, 0), (blk, 1)]
    pos = [0] * len(agents)
    waiting = {}
    in_flight = []  # halves issued, not landed: (block, barrier key, round)
    reading = {(blk, wg): {} for blk in (0, 1) for wg in (0, 1)}  # stage -> round being read
    released = {(blk, wg, s): -1 for blk in (0, 1) for wg in (0, 1) for s in range(stages)}

    def exited(blk):
        return all(pos[a] >= len(agents[a]) for a in range(len(agents)) if owner[a][0] == blk)

    def target(key):
        if exited(key[0]):
            raise RuntimeError(f"an arrival or a box reached block {key[0]} after it exited")
        return bars[key]

    try:
        while True:
            runnable = _runnable(agents, pos, waiting, named, bars)
            choices = runnable + [("land", i) for i in range(len(in_flight))]
            if not choices:
                left = [(a, agents[a][pos[a]]) for a in range(len(agents))
                        if pos[a] < len(agents[a])]
                return f"hang: {left}" if left else None
            pick = rng.choice(choices)
            if isinstance(pick, tuple):  # a half of a box lands
                blk, key, rnd = in_flight.pop(pick[1])
                bar = target(key)
                if bar.phases != rnd:
                    return f"a half of round {rnd} landed in phase {bar.phases} of {key}"
                stage = key[2]
                if rnd > 0 and key[1] != "q_full" and any(
                        released[(blk, wg, stage)] < rnd - 1 for wg in (0, 1)):
                    return f"round {rnd} refilled stage {stage} of block {blk} under a reader"
                bar.land(1)
                continue
            a = pick
            op = agents[a][pos[a]]
            blk, wg = owner[a]
            if a in waiting:
                del waiting[a]
                pos[a] += 1
                continue
            kind = op[0]
            pos[a] += 1
            if kind == "arrive":
                target(op[1]).arrive(op[2], op[3])
            elif kind == "issue_q":
                in_flight.append((blk, (blk, "q_full", 0), 0))
            elif kind == "issue":
                _, full, stage, rnd = op
                for dst in (0, 1):
                    in_flight.append((dst, (dst, full, stage), rnd))
            elif kind == "read":
                reading[(blk, wg)][op[1]] = op[2]
            elif kind == "unread":
                released[(blk, wg, op[1])] = op[2]
            elif kind in ("sync", "arrive_named"):
                nb = named[op[1]]
                nb.arrived += 1
                gen = nb.generation
                if nb.arrived == 2:
                    nb.arrived, nb.generation = 0, nb.generation + 1
                if kind == "sync":
                    pos[a] -= 1
                    waiting[a] = (op[1], gen)
    except RuntimeError as exc:
        return str(exc)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=3000)
    ap.add_argument("--cluster", action="store_true",
                    help="the clusters of two (CF_FWD_CLUSTER=2), and injected bugs")
    args = ap.parse_args()
    rng = random.Random(0)
    bad = 0
    if args.cluster:
        for trial in range(args.trials):
            n, stages = rng.randint(1, 9), rng.choice([2, 3])
            why = run_cluster(n, stages, rng)
            if why:
                bad += 1
                if bad <= 5:
                    print(f"n {n} stages {stages}: {why}")
        print(f"clusters: {args.trials} trials, {bad} failed")
        for bug in ("no_tail", "local_release", "no_last_release", "empty_count"):
            caught = sum(bool(run_cluster(rng.randint(2, 9), rng.choice([2, 3]), rng, bug))
                         for _ in range(300))
            print(f"injected {bug}: caught in {caught} of 300 trials")
            bad += caught == 0
        return 1 if bad else 0
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
