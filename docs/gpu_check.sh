#!/usr/bin/env bash
# The first run on a GPU: the teacher and the KD table on real CIFAR-10 at the default epochs, and Q2 on
# synthetic faces, with no internet; each step's wall time and accuracy go to OUT/gpu_check.md.
#
#   bash docs/gpu_check.sh [ZIP] [VAR=value ...]
#
# ZIP (default ../shared/data/cifar10-jpeg.zip): the JPEG copy of CIFAR-10, written as DATA/cifar-10-batches-py
# (real images, not the official files); with no zip, DATA must hold CIFAR-10 already. No internet means no
# ImageNet weights (PRETRAINED=0) and no DigiFace-1M (100 synthetic subjects of 50 images, 64x64).
# SEEDS=1 and no sweep: the teacher, five students and five Q2 methods fit in about 10 minutes on an
# H100-class card (an estimate until this has run on one). Variables: OUT (out/gpu), DATA (data/gpu), and any
# of make's as arguments (PRECISION=fp16, GROUP=5, EPOCHS=1, ...), passed to every step.
set -euo pipefail
cd "$(dirname "$0")/.."
ZIP=../shared/data/cifar10-jpeg.zip
if [ $# -gt 0 ] && [[ "$1" != *=* ]]; then ZIP=$1; shift; fi  # the rest: make's VAR=value
OUT=${OUT:-out/gpu} DATA=${DATA:-data/gpu}
VARS=(OUT="$OUT" DATA="$DATA" PRETRAINED=0 SEEDS=1 FACES="$DATA/faces")
if [ -n "${PYTHON:-}" ]; then VARS+=(PYTHON="$PYTHON"); else PYTHON=.venv/bin/python; fi
make -s deps "${VARS[@]}"
mkdir -p "$OUT" "$DATA"
[ -e "$DATA/cifar-10-batches-py/test_batch" ] || "$PYTHON" ../shared/tools/cifar10_from_jpeg.py "$DATA" --zip "$ZIP"
[ -d "$DATA/faces" ] || "$PYTHON" -c "import common; common.write_synthetic_faces('$DATA/faces', subjects=100, per_subject=50, size=64)"
: > "$OUT/gpu_check.log"
: > "$OUT/gpu_check.times"
for step in teacher kd-table continual report; do
  start=$(date +%s)
  make --no-print-directory "$step" "${VARS[@]}" "$@" 2>&1 | tee -a "$OUT/gpu_check.log"
  echo "$step $(( $(date +%s) - start ))" >> "$OUT/gpu_check.times"
done
"$PYTHON" - "$OUT" <<'EOF'
import glob, json, os, sys
import torch
out = sys.argv[1]
times = dict(line.split() for line in open(os.path.join(out, "gpu_check.times")))
acc = lambda p: json.load(open(p))  # noqa: E731
rows = [f"| teacher | {float(times['teacher']):.0f} s | test {acc(f'{out}/teacher/result.json')['test_acc']:.2f}% |"]
kd = sorted(glob.glob(f"{out}/kd/*/result.json"))
rows.append(f"| kd-table | {float(times['kd-table']):.0f} s | " + ", ".join(
    f"{os.path.basename(os.path.dirname(p))} {acc(p)['test_acc']:.2f}%" for p in kd) + " |")
q2 = sorted(glob.glob(f"{out}/continual/*/result.json"))
rows.append(f"| continual | {float(times['continual']):.0f} s | " + ", ".join(
    f"{os.path.basename(os.path.dirname(p))} old {acc(p)['old_test_acc']:.2f}% new {acc(p)['new_test_acc']:.2f}%"
    for p in q2) + " |")
rows.append(f"| report | {float(times['report']):.0f} s | |")
card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
cfg = json.load(open(f"{out}/teacher/config.json"))
t = acc(f"{out}/teacher/result.json")
data = {"official": "CIFAR-10", "other": "CIFAR-10 images, not the official files",
        "synthetic": "synthetic CIFAR-10"}[t.get("cifar10_source", "official")]
subjects = json.load(open(q2[0].replace("result.json", "config.json")))["subjects"] if q2 else 0
text = (f"### gpu_check on {card}, {cfg['precision']}, torch {torch.__version__}\n\n{data} "
        f"({t['train_images']:,} training, {t['test_images']:,} test images), teacher from "
        f"{'ImageNet' if cfg['pretrained'] else 'random'} weights, {cfg['epochs']} epochs, SEEDS=1, "
        f"{subjects} synthetic face subjects.\n\n"
        "| step | wall time | test accuracy |\n|---|---|---|\n" + "\n".join(rows) + "\n")
open(os.path.join(out, "gpu_check.md"), "w").write(text)
print(text)
EOF
