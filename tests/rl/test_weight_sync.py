"""Weight sync: buckets, checksums and the manifest (pure), and the real thing — megatron actor (TP=2 under
torchrun) streamed into the colocated vLLM engine of each rank, whose log-probs must then equal megatron's."""

import json

import pytest
import torch

from launch import torchrun
from megatron_ovr.rollout.weight_sync import (
    CorruptBucketError, WeightReceiver, bucket_checksum, pack_buckets,
)

WORKER = __import__("pathlib").Path(__file__).with_name("engine_parity_worker.py")


def named_tensors():
    gen = torch.Generator().manual_seed(0)
    return [
        ("a", torch.randn(4, 8, generator=gen)),
        ("b", torch.randn(3, generator=gen).to(torch.bfloat16)),
        ("c", torch.randint(0, 100, (5, 5), generator=gen)),
        ("d", torch.randn(64, 64, generator=gen)),
    ]


def test_buckets_respect_the_size_bound_and_round_trip_exactly():
    tensors = named_tensors()
    buckets = list(pack_buckets(tensors, bucket_bytes=200))
    # a (128 B) + b (6 B) fit; c (200 B) would overflow them; d (16 KiB) is larger than the bound and
    # travels alone.
    assert [[s.name for s in b.slots] for b in buckets] == [["a", "b"], ["c"], ["d"]]
    receiver = WeightReceiver([name for name, _ in tensors])
    received = [item for bucket in buckets for item in receiver.receive(bucket)]
    receiver.finish()
    for (name, sent), (got_name, got) in zip(tensors, received):
        assert got_name == name and got.dtype == sent.dtype and torch.equal(got, sent)


def test_a_corrupted_bucket_is_detected():
    tensors = named_tensors()
    bucket = list(pack_buckets(tensors, bucket_bytes=2**20))[0]
    bucket.buffer[1234] ^= 0x10  # one bit flipped in transit
    with pytest.raises(CorruptBucketError, match="bucket 0"):
        WeightReceiver([n for n, _ in tensors]).receive(bucket)


def test_checksum_sees_swapped_words():
    words = torch.arange(16, dtype=torch.int32)
    swapped = words.clone()
    swapped[[3, 9]] = swapped[[9, 3]]
    assert bucket_checksum(words.view(torch.uint8)) != bucket_checksum(swapped.view(torch.uint8))


def test_the_manifest_names_missing_and_unexpected_tensors():
    tensors = named_tensors()
    receiver = WeightReceiver(["a", "b", "c", "d", "e"])
    for bucket in pack_buckets(tensors, 2**20):
        receiver.receive(bucket)
    with pytest.raises(KeyError, match="without 1 tensor.*'e'"):
        receiver.finish()
    with pytest.raises(KeyError, match="does not have"):
        WeightReceiver(["a"]).receive(next(pack_buckets(tensors, 2**20)))


@pytest.mark.distributed
def test_engine_log_probs_equal_megatron_after_sync(tmp_path, tiny_hf_dir):
    out = tmp_path / "result.json"
    tp = 2  # each rank gathers the other's shards: the TP layout is really undone
    torchrun(WORKER, tp, "--hf-dir", str(tiny_hf_dir), "--engine-dir", str(tmp_path / "engine"), "--tp", str(tp),
             "--out", str(out))
    result = json.loads(out.read_text())
    assert result["sync"]["tensors"] == 57 and result["image_tokens"] == 12
    assert len(result["engine"]) == 4  # 2 prompts (text, image) x 2 samples
    for engine, megatron in zip(result["engine"], result["megatron"]):
        assert len(engine) == 12
        assert max(abs(a - b) for a, b in zip(engine, megatron)) < 1e-4
