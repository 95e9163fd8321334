#!/usr/bin/env bash
# Here, before a device run: what the lent GPU machine needs beside the repo, in the ignored folder .gpu/ (carry it).
# The device tool sends at most 64 MiB: the base weights go in fp16 (xz), the shared data as one xz tarball, and
# models/guard-v1/model.onnx and bench/results/ must be moved out of the tree for the call (bench/gpu/README.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data}
PY=${PY:-.venv/bin/python}
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo /.gpu/ >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/base
BASE=$($PY -c "from guardproxy.training.model import base_model_dir; print(base_model_dir())")
(cd "$BASE" && cp -r config.json tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt modules.json \
    sentence_bert_config.json config_sentence_transformers.json 1_Pooling "$OLDPWD/.gpu/base/")
$PY - "$BASE/model.safetensors" <<'PY'
import lzma, sys
from safetensors.torch import load_file, save
weights = load_file(sys.argv[1])
half = save({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in weights.items()})
open(".gpu/base/model16.safetensors.xz", "wb").write(lzma.compress(half, preset=9))
PY
(cd "$DATA" && tar cf - prompts responses/phtest responses/harmbench_classifier_val.jsonl \
    conversations/safemtdata_attack600.jsonl conversations/mtbench101.jsonl baselines | xz -T2 -9) > .gpu/data.tar.xz
du -sh .gpu/*
