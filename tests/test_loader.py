import hashlib
import json
import textwrap

import numpy as np
import pytest
import torch

from ae.data import DeviceResidentBatches, FFCVBatches, eval_batches, eval_shard, read_split
from tests.helpers import PYTHON, REPO, free_port, ok, run

CPU = torch.device("cpu")


def image_ids(batches) -> list[str]:
    """Identify images by content (the synthetic images are all different)."""
    return [
        hashlib.sha1(img.contiguous().numpy().tobytes()).hexdigest() for batch in batches for img in batch
    ]


def test_order_is_seeded(tiny_data):
    first = image_ids(FFCVBatches(tiny_data, 32, CPU, seed=0, workers=1).epoch(0))
    again = image_ids(FFCVBatches(tiny_data, 32, CPU, seed=0, workers=1).epoch(0))
    other_seed = image_ids(FFCVBatches(tiny_data, 32, CPU, seed=1, workers=1).epoch(0))
    next_epoch = image_ids(FFCVBatches(tiny_data, 32, CPU, seed=0, workers=1).epoch(1))
    assert first == again
    assert first != other_seed and sorted(first) == sorted(other_seed)
    assert first != next_epoch and sorted(first) == sorted(next_epoch)
    assert len(set(first)) == 256


def test_an_epoch_can_start_at_any_batch(tiny_data):
    batches = FFCVBatches(tiny_data, 24, CPU, seed=3, workers=1)
    whole = image_ids(batches.epoch(2))
    assert len(batches) == 11  # 256 / 24, the last batch partial
    assert image_ids(batches.epoch(2, start_batch=7)) == whole[7 * 24 :]


def test_batches_are_uint8_nchw(tiny_data):
    images = next(iter(FFCVBatches(tiny_data, 16, CPU, seed=0, workers=1).epoch(0)))
    assert images.dtype == torch.uint8 and images.shape == (16, 3, 32, 32)


def test_device_resident_batches_follow_ffcv_order_in_one_process(tiny_data):
    ffcv = FFCVBatches(tiny_data, 32, CPU, seed=5, workers=1)
    resident = DeviceResidentBatches(tiny_data, np.arange(256), 32, CPU, seed=5, rank=0, world_size=1)
    for epoch in range(2):
        assert image_ids(resident.epoch(epoch)) == image_ids(ffcv.epoch(epoch))
    assert image_ids(resident.epoch(1, start_batch=3)) == image_ids(ffcv.epoch(1))[96:]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_shards_cover_the_test_split_once(world_size):
    shards = [eval_shard(100, rank, world_size) for rank in range(world_size)]
    assert np.array_equal(np.concatenate(shards), np.arange(100))


def test_eval_batches_and_read_split_agree(tiny_data):
    assert torch.equal(
        torch.cat(list(eval_batches(tiny_data, 64, CPU))), read_split(tiny_data, "test", 64, CPU)
    )


def test_two_ranks_get_disjoint_shards_that_cover_the_split(tiny_data, tmp_path):
    script = tmp_path / "shards.py"
    script.write_text(
        textwrap.dedent(f"""
        import hashlib, json, os, sys
        from pathlib import Path
        import numpy as np, torch, torch.distributed as dist
        sys.path.insert(0, {str(REPO)!r})
        dist.init_process_group("gloo")
        from ae.data import DeviceResidentBatches, FFCVBatches
        rank, world = dist.get_rank(), dist.get_world_size()
        ids = lambda batches: [hashlib.sha1(i.contiguous().numpy().tobytes()).hexdigest() for b in batches for i in b]
        data = Path({str(tiny_data)!r})
        ffcv = FFCVBatches(data, 16, torch.device("cpu"), seed=0, workers=1)
        resident = DeviceResidentBatches(data, np.arange(256), 16, torch.device("cpu"), 0, rank, world)
        out = {{"ffcv": ids(ffcv.epoch(0)), "ffcv_next": ids(ffcv.epoch(1)), "resident": ids(resident.epoch(0)),
               "steps": [len(ffcv), len(resident)]}}
        Path({str(tmp_path)!r}, f"rank{{rank}}.json").write_text(json.dumps(out))
        dist.destroy_process_group()
        """)
    )
    ok(
        run(
            [
                PYTHON,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node=2",
                f"--master_port={free_port()}",
                str(script),
            ],
            timeout=180,
        )
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    everything = set(image_ids(FFCVBatches(tiny_data, 256, CPU, seed=0, workers=1).epoch(0)))
    for key in ("ffcv", "ffcv_next", "resident"):
        a, b = (set(r[key]) for r in ranks)
        assert len(ranks[0][key]) == len(ranks[1][key]) == 128, key
        assert not a & b, f"{key}: shards overlap"
        assert a | b == everything, f"{key}: shards do not cover the split"
    assert ranks[0]["ffcv"] != ranks[0]["ffcv_next"]  # reshuffled each epoch
    assert ranks[0]["steps"] == ranks[1]["steps"] == [8, 8]
