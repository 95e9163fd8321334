"""Here: a device run's parts back into a run directory that ``guardproxy train --soup DIR`` exports, calibrates and
scores on the CPU (a soup of one run is that run). The word embeddings are the base's, rounded to fp16 as the device
had them.

    .venv/bin/python bench/gpu/recon.py FILES_DIR NAME OUT_DIR
"""

import json
import sys
import tarfile
from pathlib import Path

import torch
from safetensors.torch import load, load_file

from guardproxy.training.model import base_model_dir

FROZEN = "encoder.embeddings.word_embeddings.weight"

src, name, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
parts = sorted(src.glob(f"{name}.part*"), key=lambda p: int(p.suffix.removeprefix(".part")))
state = {k: v.float() if v.is_floating_point() else v for k, v in load(b"".join(p.read_bytes() for p in parts)).items()}
state[FROZEN] = load_file(base_model_dir() / "model.safetensors")["embeddings.word_embeddings.weight"].half().float()
out.mkdir(parents=True, exist_ok=True)
torch.save(state, out / "student.pt")
with tarfile.open(src / "meta.tar.gz") as tar:
    member = tar.extractfile(f"runs/{name}/train_summary.json")
    assert member is not None, f"no train_summary.json for {name} in meta.tar.gz"
    (out / "train_summary.json").write_text(json.dumps(json.loads(member.read())))
print(f"wrote {out}: {len(state)} tensors")
