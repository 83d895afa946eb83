"""``DataSource`` sharded over ranks: one shared stream order, disjoint per-rank slices, an exact ``loader``."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from fastgen.data import DataSource
from fastgen.errors import UsageError

RANK_SCRIPT = """
import json, sys
import torch
import torch.distributed as dist
from fastgen.data import DataSource

rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
source = DataSource(4, 11, x0=torch.arange(40) * 10, rank=rank, world_size=2)
mine = []
for k in range(10):  # two epochs of 40 samples: 5 global batches of 2 x 4 each
    batch = source.batch(k)
    assert torch.equal(batch.x0, source.indices(k) * 10), "x0 rows follow the indices"
    mine.append(source.indices(k).tolist())
gathered = [None, None]
dist.all_gather_object(gathered, mine)
if rank == 0:
    with open(out, "w") as f:
        json.dump(gathered, f)
dist.destroy_process_group()
"""


def _seed(seed: int, *parts) -> int:
    """The documented seed derivation (``fastgen.data.batch.derive_seed``), written out independently."""
    text = ":".join(str(p) for p in ("fastgen-data", seed, *parts))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def _expected_indices(seed: int, size: int, batch_size: int, rank: int, world_size: int, k: int) -> list[int]:
    """Positions ``[k B W + r B, k B W + (r + 1) B)`` of the concatenated epoch orders."""
    first = (k * world_size + rank) * batch_size
    last_epoch = (first + batch_size - 1) // size
    stream = torch.cat([torch.randperm(size, generator=torch.Generator().manual_seed(_seed(seed, "epoch", e)))
                        for e in range(last_epoch + 1)])
    return stream[first:first + batch_size].tolist()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_ranks_split_each_epoch(tmp_path):
    out = tmp_path / "gathered.json"
    port = str(_free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(rank), port, str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    for rank in ranks:
        output = rank.communicate(timeout=120)[0]
        assert rank.returncode == 0, output[-3000:]
    gathered = json.loads(out.read_text())
    for epoch in range(2):
        per_rank = [set(itertools.chain(*batches[epoch * 5:(epoch + 1) * 5])) for batches in gathered]
        assert all(len(indices) == 20 for indices in per_rank), "no sample twice on a rank within an epoch"
        assert not per_rank[0] & per_rank[1], "the ranks' samples are disjoint"
        assert per_rank[0] | per_rank[1] == set(range(40)), "together the ranks cover the epoch"
    for rank in (0, 1):
        assert gathered[rank] == [_expected_indices(11, 40, 4, rank, 2, k) for k in range(10)]


def test_world_size_one_is_the_single_process_stream():
    # recorded from the single-process code before sharding (seed 7): indices and data-free class labels
    source = DataSource(4, 7, x0=torch.arange(10))
    assert [source.indices(k).tolist() for k in range(6)] == [
        [1, 5, 8, 6], [9, 3, 2, 4], [0, 7, 1, 2], [6, 8, 4, 0], [5, 3, 7, 9], [0, 5, 4, 8]]
    assert [source.indices(k).tolist() for k in range(6)] == [_expected_indices(7, 10, 4, 0, 1, k) for k in range(6)]
    free = DataSource(3, 7, random_classes=5)
    assert [free.batch(k).cond["class_labels"].tolist() for k in range(3)] == [[2, 2, 2], [0, 2, 1], [3, 4, 3]]


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_follow_the_documented_rule(world_size):
    """Batches straddling epochs (10 samples, 4 per rank) and data-free labels sliced from one global draw."""
    for rank in range(world_size):
        source = DataSource(4, 5, x0=torch.arange(10), rank=rank, world_size=world_size)
        for k in range(5):
            assert source.indices(k).tolist() == _expected_indices(5, 10, 4, rank, world_size, k)
    labels = [DataSource(4, 5, random_classes=7, rank=rank, world_size=world_size).batch(3).cond["class_labels"]
              for rank in range(world_size)]
    drawn = torch.randint(7, (4 * world_size,), generator=torch.Generator().manual_seed(_seed(5, "labels", 3)))
    assert torch.equal(torch.cat(labels), drawn)


def test_bad_rank_is_a_usage_error():
    for rank, world_size in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(UsageError, match="rank = .*world_size = "):
            DataSource(4, 0, x0=torch.arange(8), rank=rank, world_size=world_size)


def _assert_batches_equal(got, expected):
    for a, b in zip(got, expected, strict=True):
        assert a.size == b.size
        for name in ("x0", "noise"):
            assert torch.equal(getattr(a, name), getattr(b, name))
        assert a.cond.keys() == b.cond.keys() and all(torch.equal(a.cond[key], b.cond[key]) for key in a.cond)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_is_the_batch_sequence(num_workers):
    generator = torch.Generator().manual_seed(0)
    source = DataSource(3, 9, x0=torch.randn(7, 2, 4, 4, generator=generator),
                        noise=torch.randn(7, 2, 4, 4, generator=generator),
                        cond={"a": torch.randn(7, 5, generator=generator)}, rank=1, world_size=2)
    rng = torch.get_rng_state()
    batches = list(itertools.islice(source.loader(start=4, num_workers=num_workers), 6))
    assert torch.equal(torch.get_rng_state(), rng), "the loader leaves the global RNG alone"
    _assert_batches_equal(batches, [source.batch(k) for k in range(4, 10)])
    free = DataSource(5, 9, random_classes=10, rank=1, world_size=2)
    labels = [b.cond["class_labels"] for b in itertools.islice(free.loader(start=2, num_workers=num_workers), 4)]
    assert all(torch.equal(a, free.batch(k).cond["class_labels"]) for k, a in zip(range(2, 6), labels, strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs an accelerator")
def test_loader_pins_memory():
    source = DataSource(2, 0, x0=torch.randn(6, 3), cond={"a": {"b": torch.randn(6, 2)}})
    for num_workers in (0, 2):
        batch = next(source.loader(start=1, num_workers=num_workers, pin_memory=True))
        assert batch.x0.is_pinned() and batch.cond["a"]["b"].is_pinned()
        assert torch.equal(batch.x0, source.batch(1).x0)
