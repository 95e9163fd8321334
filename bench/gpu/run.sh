#!/usr/bin/env bash
# On the device: train SEEDS (one init seed) side by side on the GPU, average them, and leave the soup's and seed 0's
# weights plus every run's log and summary under $OUT. A dry run here: DEVICE=cpu STEPS=3 SEEDS="0 1" PY=.venv/bin/python
set -u
DEVICE=${DEVICE:-cuda}; STEPS=${STEPS:-900}; SEEDS=${SEEDS:-"0 1 2 3 4 5 6 7"}; PY=${PY:-python3}
VERSION=${VERSION:-2.9.0}; W=${W:-/tmp/gpuwork}
rm -rf "$W"; mkdir -p "$W/data" "$W/site" "$W/runs" "$W/logs"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
tar xJf .gpu/data.tar.xz -C "$W/data" || exit 1
$PY bench/gpu/prep_base.py .gpu/base "$W/site" || exit 1
export PYTHONPATH="$W/site:$PWD"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
date
for s in $SEEDS; do
  $PY -m guardproxy.cli train --train-only --device "$DEVICE" --layers 6 --max-steps "$STEPS" --seed "$s" --init-seed 0 \
    --split-seed 0 --threads 2 --model-version "$VERSION-s$s" --data "$W/data" --out "$W/runs/s$s" > "$W/logs/s$s.log" 2>&1 &
done
wait
date
for s in $SEEDS; do echo "== s$s"; tail -c 600 "$W/logs/s$s.log" | tr '\r' '\n' | tail -3; done
$PY -m guardproxy.cli train --train-only --soup $(for s in $SEEDS; do echo "$W/runs/s$s"; done) --layers 6 \
  --split-seed 0 --model-version "$VERSION" --data "$W/data" --out "$W/runs/soup" > "$W/logs/soup.log" 2>&1
tail -2 "$W/logs/soup.log"
$PY bench/gpu/pack.py "$W/runs/soup" soup "$OUT"
$PY bench/gpu/pack.py "$W/runs/s0" s0 "$OUT"
(cd "$W" && tar czf "$OUT/meta.tar.gz" logs runs/*/train_summary.json)
ls -la "$OUT"; date
