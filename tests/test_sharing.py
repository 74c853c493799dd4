"""`synergen_lightning.sharing` over 2 real gloo processes (spawned, as torchrun starts them): which items each rank
takes, its collectives against what one process computes, and rank 0's record written before the others read it."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch


def _rank(rank: int, port: int, out: str) -> None:
    from synergen_lightning.sharing import join

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    share, device = join("cpu")
    record = Path(out) / "record.json"
    seen = []
    # rank 0 writes the record; the other rank reads it only once it is there
    share.lead_first(lambda lead: record.write_text(json.dumps({"by": share.rank})) if lead
                     else seen.append(json.loads(record.read_text())))
    result = {"rank": share.rank, "world": share.world, "device": device, "seen": seen,
              "takes": [i for i in range(7) if share.takes(i)],
              "count": share.gather(torch.tensor(10 + rank)).tolist(),
              "rows": share.gather(torch.full((2, 2), rank)).tolist(),
              "objects": share.gather_object({"rank": rank}),
              "total": share.total(3 + rank)}

    def refuse(lead):
        if lead:
            raise ValueError("this folder holds another run's files")

    try:  # rank 0's refusal: its own error there, a quiet exit 2 on the others (no collective left hanging)
        share.lead_first(refuse)
    except (ValueError, SystemExit) as exc:
        result["refused"] = repr(exc)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_processes_share_items_gather_and_write_the_record_first(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_rank, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["rank"], r0["world"], r1["rank"], r1["world"]) == (0, 2, 1, 2) and r0["device"] == "cpu"
    assert r0["takes"] == [0, 2, 4, 6] and r1["takes"] == [1, 3, 5]  # every item once, by index
    assert r0["seen"] == [] and r1["seen"] == [{"by": 0}]
    for r in (r0, r1):
        assert r["count"] == [10, 11]  # 0-d counts stacked in rank order, on every rank
        assert r["rows"] == [[0, 0], [0, 0], [1, 1], [1, 1]]  # rows concatenated
        assert r["total"] == 3 + 4
    assert r0["objects"] == [{"rank": 0}, {"rank": 1}] and r1["objects"] is None  # gathered on rank 0 only
    assert r0["refused"] == "ValueError(\"this folder holds another run's files\")" and r1["refused"] == "SystemExit(2)"


def test_one_process_takes_everything_and_its_collectives_are_the_identity(monkeypatch):
    from synergen_lightning.sharing import WHOLE, join

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    share, device = join("cpu")
    assert share is WHOLE and device == "cpu" and all(share.takes(i) for i in range(5))
    t = torch.tensor([1, 2])
    assert share.gather(t) is t and share.gather_object("x") == ["x"] and share.total(4) == 4
    calls = []
    share.lead_first(calls.append)
    assert calls == [True]
