"""A model of the ordered (deterministic) dQ turns of flash_bwd_sm90_ws.cu under a sliding
window, to find a hang or a missed turn before a GPU does.

    python bench/dev/ordered_turns_model.py [--trials 2000]

cf_mask.cuh's tile ranges are written down in Python (`key_tiles`, `query_tiles`, the local
mask mode only: a window, causal as right = 0). Each key tile is a block that walks its query
tiles in ascending order and, at each, waits until the tile's semaphore equals its turn,
adds, and passes the turn on. A random scheduler keeps at most `resident` blocks running at
once and starts new ones in grid order (blockIdx.x, then the next kv head: waits are within
a head); a block walks its tiles once for each query head of its kv head's group. Two orders:
  - "ascending": key tile = blockIdx.x, turn = key tile - first key tile of the query tile
    (the non-causal order of today, which the window mode would take unchanged);
  - "descending": key tile = n_k - 1 - blockIdx.x, turn = last key tile - key tile (the
    causal order: the block that reaches a query tile first adds first).
A trial fails if a block waits for a turn that no block will give (a hang), if a query
tile's semaphore does not end at the number of key tiles that see it, or if a key tile's
walk and the query tile's key range disagree.
"""

from __future__ import annotations

import argparse
import random
from itertools import product


def key_tiles(sq, sk, left, right, block_m, block_n, m):
    """cf_mask.cuh key_tiles_of (CF_LOCAL): [begin, end) key tiles query tile m sees."""
    off = sk - sq
    q0, q_last = m * block_m, min(m * block_m + block_m, sq) - 1
    kv_begin = max(0, q0 + off - left)
    end = (sk + block_n - 1) // block_n
    last_key = q_last + off + right + 1 - 1
    end = min(end, 0 if last_key < 0 else last_key // block_n + 1)
    begin = min(kv_begin // block_n, end)
    return begin, end


def query_tiles(sq, sk, left, right, block_m, block_n, n):
    """cf_mask.cuh query_tiles_of (CF_LOCAL): [first, end) query tiles key tile n serves."""
    off = sk - sq
    n0, n_last = n * block_n, min(n * block_n + block_n, sk) - 1
    m_tiles = (sq + block_m - 1) // block_m
    i_min = n0 - off - right
    first = m_tiles if i_min >= sq else i_min // block_m if i_min > 0 else 0
    query_end = min(sq, max(0, n_last - off + left + 1))
    return first, max(first, (query_end + block_m - 1) // block_m)


def ranges_agree(sq, sk, left, right, block_m, block_n) -> str | None:
    """Whether key tile n walks query tile m exactly when m's key range holds n."""
    n_k, m_tiles = (sk + block_n - 1) // block_n, (sq + block_m - 1) // block_m
    walks = {n: range(*query_tiles(sq, sk, left, right, block_m, block_n, n)) for n in range(n_k)}
    for m in range(m_tiles):
        seen = set(range(*key_tiles(sq, sk, left, right, block_m, block_n, m)))
        walked = {n for n in range(n_k) if m in walks[n]}
        if seen != walked:
            return f"query tile {m}: key range {sorted(seen)}, walked by {sorted(walked)}"
    return None


def _blocks(sq, sk, left, right, block_m, block_n, heads, group, order):
    """Grid order: per kv head, its key tiles (blockIdx.x); each block walks its query tiles
    for each of the kv head's `group` query heads in turn: [(key tile, [(head, tile)])]."""
    n_k = (sk + block_n - 1) // block_n
    out = []
    for kvh in range(heads):
        for x in range(n_k):
            n = x if order == "ascending" else n_k - 1 - x
            tiles = range(*query_tiles(sq, sk, left, right, block_m, block_n, n))
            out.append((n, [(kvh * group + g, m) for g in range(group) for m in tiles]))
    return out


def run(sq, sk, left, right, block_m, block_n, heads, resident, order, rng,
        group=1) -> str | None:
    """One trial; None if every block finished and every semaphore ended where it should."""
    m_tiles = (sq + block_m - 1) // block_m
    blocks = [(n, walk) for n, walk in _blocks(sq, sk, left, right, block_m, block_n, heads,
                                               group, order)]
    sem = {(h, m): 0 for h in range(heads * group) for m in range(m_tiles)}

    def turn(n, m):
        begin, end = key_tiles(sq, sk, left, right, block_m, block_n, m)
        return n - begin if order == "ascending" else end - 1 - n

    step = [0] * len(blocks)
    started, running, waits = 0, [], 0
    while True:
        while len(running) < resident and started < len(blocks):
            running.append(started)
            started += 1
        if not running:
            break
        ready = [b for b in running if step[b] == len(blocks[b][1])
                 or sem[blocks[b][1][step[b]]] == turn(blocks[b][0], blocks[b][1][step[b]][1])]
        waits += len(running) - len(ready)
        if not ready:
            n, walk = blocks[running[0]]
            h, m = walk[step[running[0]]]
            return (f"hang: key tile {n} waits at head {h} query tile {m} for turn "
                    f"{turn(n, m)}, semaphore at {sem[h, m]}")
        b = rng.choice(ready)
        n, walk = blocks[b]
        if step[b] == len(walk):
            running.remove(b)
            continue
        sem[walk[step[b]]] += 1
        step[b] += 1
    for (_, m), value in sem.items():
        begin, end = key_tiles(sq, sk, left, right, block_m, block_n, m)
        if value != max(0, end - begin):
            return f"head {h} query tile {m}: {value} adds, {end - begin} key tiles see it"
    run.waits = waits
    return None


def run_mixed(sq, sk, left, right, block_m, block_n, heads, resident) -> str | None:
    """A deliberate bug for the tests: ascending turns, blocks in descending order."""
    m_tiles = (sq + block_m - 1) // block_m
    blocks = _blocks(sq, sk, left, right, block_m, block_n, heads, 1, "descending")
    sem = {(h, m): 0 for h in range(heads) for m in range(m_tiles)}
    step, started, running = [0] * len(blocks), 0, []
    while started < len(blocks) or running:
        running = [b for b in running if step[b] < len(blocks[b][1])]
        while len(running) < resident and started < len(blocks):
            running.append(started)
            started += 1
        moved = False
        for b in running:
            if step[b] < len(blocks[b][1]):
                n, (h, m) = blocks[b][0], blocks[b][1][step[b]]
                if sem[h, m] == n - key_tiles(sq, sk, left, right, block_m, block_n, m)[0]:
                    sem[h, m] += 1
                    step[b] += 1
                    moved = True
        if running and not moved:
            return f"hang: {len(running)} blocks wait"
    return None


def lockstep_steps(sq, sk, left, right, block_m, block_n, heads, resident, order,
                   group=1) -> int:
    """Time steps to finish when every running block takes one step a query tile (its add
    lands at the step's end) and a block whose turn has not come idles the step."""
    m_tiles = (sq + block_m - 1) // block_m
    blocks = _blocks(sq, sk, left, right, block_m, block_n, heads, group, order)
    walks = [walk for _, walk in blocks]
    ranges = [key_tiles(sq, sk, left, right, block_m, block_n, m) for m in range(m_tiles)]
    sem = {(h, m): 0 for h in range(heads * group) for m in range(m_tiles)}
    step, started, running, t = [0] * len(walks), 0, [], 0
    while started < len(walks) or running:
        running = [b for b in running if step[b] < len(walks[b])]
        while len(running) < resident and started < len(walks):
            running.append(started)
            started += 1
        go = []
        for b in running:
            if step[b] == len(walks[b]):
                continue
            n, (h, m) = blocks[b][0], walks[b][step[b]]
            begin, end = ranges[m]
            if sem[h, m] == (n - begin if order == "ascending" else end - 1 - n):
                go.append((b, h, m))
        for b, h, m in go:
            sem[h, m] += 1
            step[b] += 1
        t += 1
        if t > 10 * (m_tiles + 1) * (len(walks) + 1):
            raise RuntimeError("no progress")
    return t


def random_case(rng):
    block_m, block_n = rng.choice([(64, 128), (128, 128), (64, 64)])
    sq, sk = rng.randint(1, 1200), rng.randint(1, 1200)
    unbounded = sq + sk  # cuflash.launch.mod_args: an unbounded side
    left = rng.choice([unbounded, rng.randint(0, 700)])
    right = rng.choice([0, unbounded, rng.randint(0, 700)])
    return sq, sk, left, right, block_m, block_n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    waits = {"ascending": 0, "descending": 0}
    for trial in range(args.trials):
        case = random_case(rng)
        problem = ranges_agree(*case)
        if problem:
            print("ranges", case, problem)
            return 1
        resident, group = rng.randint(1, 40), rng.choice([1, 1, 2, 4])
        for order in waits:
            problem = run(*case, heads=2, resident=resident, order=order, rng=rng,
                          group=group)
            if problem:
                print(order, case, "resident", resident, problem)
                return 1
            waits[order] += run.waits
    print(f"{args.trials} trials: no hang, every turn given; scheduler steps spent waiting "
          f"{waits}")
    # time in tile steps, every block of a head resident (16k keys of 128, 64-row query
    # tiles, as d128): the longest walk is the floor
    for (left, right), group in product(((4096, 0), (4096, 4096), (1024, 0), (32768, 0)),
                                        (1, 4)):
        case = (16384, 16384, left, right, 64, 128)
        floor = group * max(q[1] - q[0] for q in (query_tiles(*case, n) for n in range(128)))
        times = {order: lockstep_steps(*case, heads=1, resident=132, order=order, group=group)
                 for order in waits}
        print(f"window ({left}, {right}) at 16k, {group} query heads a block: longest walk "
              f"{floor} tiles; steps {times}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
