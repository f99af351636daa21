#!/usr/bin/env bash
# Everything lpq can check only on a CUDA machine, in one command:
#   1. the GPU tests (the Triton kernel tests on CUDA tensors, and every @pytest.mark.gpu test);
#   2. Triton kernel time / torch.clone time per format (plain, scaled, scaled + statistics), side by side;
#   3. a tiny PTQ (`lpq ptq`, tiny-llama saved with save_pretrained, model.device_map: cuda) and a
#      tiny HiF8 QAT run (`lpq train`, which trains on the GPU whenever one is visible);
#   4. the quantized attention bench on the GPU (tiled, fused and materialized, 12 heads as Wan2.1-1.3B).
# Usage: scripts/gpu_check.sh [work dir]   (default: a fresh temporary folder). Needs a CUDA build of
# torch 2.13.0 in .venv (scripts/setup.sh installs the CPU wheel) and `pip install triton`.
# Runs every step even when one fails, then exits non-zero naming the failed steps; without a usable
# GPU it stops before doing anything.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
WORK="${1:-$(mktemp -d -t lpq-gpu-check-XXXXXX)}"
mkdir -p "$WORK"

"$PY" - <<'EOF' || exit 1
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(f"gpu_check: FAILED: no CUDA device is usable (torch {torch.__version__}, built for CUDA "
             f"{torch.version.cuda}); this check needs a GPU and a CUDA build of torch")
try:
    import triton
except ImportError:
    sys.exit("gpu_check: FAILED: triton is not installed (pip install triton, or scripts/setup.sh dev)")
print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"triton {triton.__version__}")
EOF
if [ -n "${TRITON_INTERPRET:-}" ] && [ "${TRITON_INTERPRET}" != "0" ]; then
  echo "gpu_check: FAILED: TRITON_INTERPRET is set; unset it to run the compiled kernels" >&2
  exit 1
fi

FAILED=()
check() {   # check NAME: record a failed step (the exit status of the command just run)
  local rc=$?
  if [ $rc -ne 0 ]; then FAILED+=("$1 (exit $rc)"); echo "gpu_check: step '$1' FAILED (exit $rc)" >&2; fi
}

echo "== 1. GPU tests"
"$PY" -m pytest -q -p no:cacheprovider tests/kernels; check "kernel tests on cuda"
"$PY" -m pytest -q -p no:cacheprovider -m gpu tests; check "gpu-marked tests"

echo "== 2. kernel time / torch.clone time (64 Mi elements, same process, CUDA events)"
"$PY" - <<'EOF'
import torch

from lpq.formats import FORMATS, fake_quant
from lpq.formats.api import fake_quant_scaled, fake_quant_stats


def ms(fn, reps=20):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


for dtype in (torch.bfloat16, torch.float32):
    x = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    clone = ms(lambda: x.clone())
    print(f"{str(dtype):15s} torch.clone {clone:.3f} ms = 1.00")
    for fmt in FORMATS:
        plain = ms(lambda: fake_quant(x, fmt))
        scaled = ms(lambda: fake_quant_scaled(x, fmt, 2.0 ** -3))
        stats = ms(lambda: fake_quant_stats(x, fmt, 2.0 ** -3, counts=True))
        ref = ms(lambda: fake_quant(x, fmt, backend="ref"), reps=3)
        print(f"{str(dtype):15s} {fmt:14s} kernel {plain / clone:5.2f}  scaled {scaled / clone:5.2f}  "
              f"scaled+stats {stats / clone:5.2f}  (PyTorch reference {ref / clone:6.1f})  x clone")
EOF
check "kernel timings"

echo "== 3. tiny PTQ and QAT on cuda (in $WORK)"
"$PY" - "$WORK" <<'EOF'
import json
import random
import sys
from pathlib import Path

import yaml

from lpq.models.tiny import build_tiny

work = Path(sys.argv[1])
tiny = build_tiny("tiny-llama")
tiny.model.save_pretrained(work / "tiny-llama")
tiny.tokenizer.save_pretrained(work / "tiny-llama")
rng = random.Random(0)
words = [" ".join(f"w{rng.randrange(50)}" for _ in range(200)) for _ in range(24)]
(work / "calib.txt").write_text("\n".join(words))
(work / "corpus.jsonl").write_text("".join(json.dumps({"text": w}) + "\n" for w in words))
ptq = {"model": {"id": str(work / "tiny-llama"), "device_map": "cuda"}, "quant": {"format": "hif4"},
       "calibration": {"text_file": str(work / "calib.txt"), "num_sequences": 2, "seq_len": 16, "batch_size": 2},
       "algorithms": [{"name": "hadamard"}, {"name": "gptq"}], "protect": {"blocks": [1]},
       "evaluation": {"wikitext2": str(work / "calib.txt"), "windows": 1, "kl_windows": 1, "seq_len": 16}}
(work / "ptq.yaml").write_text(yaml.safe_dump(ptq))
role = {"format": "hif8", "scaling": "delayed", "history_len": 4}
train = {"model": {"id": "tiny-llama"},
         "quant": {"weight": {"format": "hif8", "scaling": "current"}, "input": role, "grad": role,
                   "attention": {"q": role, "k": role, "v": dict(role, axis=-2), "p": role}},
         "train": {"output_dir": str(work / "qat"), "steps": 3, "batch_size": 2, "lr": 1e-3, "bf16_warmup_steps": 1,
                   "stats_every": 1, "lr_warmup_steps": 1, "reference_run": False},
         "data": {"paths": [str(work / "corpus.jsonl")], "seq_len": 32, "eval_blocks": 4}}
(work / "qat.yaml").write_text(yaml.safe_dump(train))
EOF
check "tiny model and recipes"
"$PY" -m lpq.cli ptq --config "$WORK/ptq.yaml" --out "$WORK/ptq" && "$PY" - "$WORK/ptq/report.json" <<'EOF'
import json
import sys

r = json.load(open(sys.argv[1]))
print(f"tiny PTQ on cuda: wall {r['wall_s']:.1f} s, quantized {json.dumps(r['quantized'])}")
EOF
check "tiny PTQ on cuda"
"$PY" -m lpq.cli train --config "$WORK/qat.yaml" --only hif8 --no-resume && ls "$WORK/qat"
check "tiny QAT on cuda"

echo "== 4. attention bench on cuda (12 heads: one Wan2.1-1.3B attention call)"
"$PY" scripts/bench_attention.py --device cuda --heads 12 --tiled 8192 16384 32760 --fused 8192 16384 32760 \
  --materialized 4096 8192 16384
check "attention bench on cuda"

if [ ${#FAILED[@]} -ne 0 ]; then
  printf 'gpu_check: FAILED steps: %s\n' "${FAILED[*]}" >&2
  exit 1
fi
echo "gpu_check: all steps passed (work dir $WORK)"
