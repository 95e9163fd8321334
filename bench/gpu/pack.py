"""On the device: a run's fine-tuned weights (all but the frozen word embeddings) in fp16, cut into parts small
enough for the device tool's files (16 MiB each).

    python3 bench/gpu/pack.py RUN_DIR NAME OUT
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save

FROZEN = "encoder.embeddings.word_embeddings.weight"  # never trained (guardproxy.training.loop.train)
PART = 15 * 1024 * 1024

run, name, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
state = torch.load(run / "student.pt", map_location="cpu", weights_only=True)
blob = save({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items() if k != FROZEN})
for i in range(0, len(blob), PART):
    (out / f"{name}.part{i // PART}").write_bytes(blob[i : i + PART])
print(f"{name}: {len(blob)} bytes", file=sys.stderr)
