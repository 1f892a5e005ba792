"""One fresh process per variant: the host time of the first micro-batch body packing on a
CUDA device (after the casts and copies serving launches anyway), new (copies) vs old
(torch.cat). Usage: python3 tools/device/pack_probe.py {new,old}."""

import sys
import time

import torch

from attention.metadata import AttentionMetadata
from attention.transport import StageInputs, meta_bytes, pack_meta

dev = torch.device("cuda")
meta = AttentionMetadata(
    slot_mapping=torch.arange(5, dtype=torch.int64, device=dev),
    block_tables=torch.zeros(2, 3, dtype=torch.int32, device=dev),
    seq_lens=torch.tensor([3, 42], dtype=torch.int32, device=dev),
    query_start_loc=torch.tensor([0, 3, 5], dtype=torch.int64, device=dev),
    max_query_len=3,
    max_seq_len=42,
)
x = StageInputs(None, None, torch.arange(5, device=dev), meta, torch.tensor([2, 4], device=dev))
x.meta.query_start_loc.int()  # the cast serving launches anyway
torch.cuda.synchronize()
t0 = time.perf_counter()
if sys.argv[1] == "new":
    packed = pack_meta(x)
else:
    m = x.meta
    fields = (x.positions, m.slot_mapping, x.logits_indices, m.block_tables, m.seq_lens)
    parts = [t.contiguous().view(torch.uint8).reshape(-1) for t in fields]
    parts.append(m.query_start_loc.int().view(torch.uint8))
    packed = torch.cat(parts)
first = time.perf_counter() - t0
torch.cuda.synchronize()
t0 = time.perf_counter()
pack_meta(x)
second = time.perf_counter() - t0
assert packed.numel() == meta_bytes(x.header())
print(f"{sys.argv[1]}: first packing {first * 1e3:.2f} ms of host time, next {second * 1e3:.3f} ms")
