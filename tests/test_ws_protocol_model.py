"""bench/dev/ws_protocol_model.py, the warp-specialized forward's barrier protocol under a
random scheduler (no GPU): the persistent walks (CF_FWD_PERSISTENT 1 and 2) and the clusters
of two sharing K / V (CF_FWD_CLUSTER=2) finish without a hang or a misplaced box, and the
bugs the model injects into the cluster protocol are caught."""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "dev"))
import ws_protocol_model as model  # noqa: E402


def test_persistent_walks_finish():
    rng = random.Random(1)
    for _ in range(300):
        walk = [rng.choice([0, 1, 2, 3, 5]) for _ in range(rng.randint(1, 6))]
        assert not model.run(walk, rng.choice([2, 3, 4]), rng.random() < 0.5, rng), walk


def test_cluster_pairs_finish():
    rng = random.Random(2)
    for _ in range(300):
        n, stages = rng.randint(1, 9), rng.choice([2, 3])
        assert model.run_cluster(n, stages, rng) is None, (n, stages)


def test_cluster_bugs_are_caught():
    rng = random.Random(3)
    for bug in ("no_tail", "local_release", "no_last_release", "empty_count"):
        assert any(model.run_cluster(rng.randint(2, 9), rng.choice([2, 3]), rng, bug)
                   for _ in range(50)), bug
