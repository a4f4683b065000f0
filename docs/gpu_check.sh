#!/usr/bin/env bash
# The first run on a GPU: the teacher and the KD table on real CIFAR-10 at the default epochs, and Q2 on
# synthetic faces, with no internet. OUT/gpu_check.md sets what ran against what `make plan` said it would:
# each step's wall time against the plan's estimate, the peak GPU memory against the plan's, the lock-step
# group sizes chosen against the plan's, host syncs per training step (torch.cuda.set_sync_debug_mode) at each
# precision, the precision used, and each step's accuracy.
#
#   bash docs/gpu_check.sh [ZIP] [VAR=value ...]
#
# ZIP (default ../shared/data/cifar10-jpeg.zip): the JPEG copy of CIFAR-10, written as DATA/cifar-10-batches-py
# (real images, not the official files); with no zip, DATA must hold CIFAR-10 already. No internet means no
# ImageNet weights (PRETRAINED=0) and no DigiFace-1M (100 synthetic subjects of 50 images, 64x64).
# SEEDS=1 and no sweep: the teacher, five students and five Q2 methods fit in about 10 minutes on an
# H100-class card (an estimate: no GPU has run this yet). Variables: OUT (out/gpu), DATA (data/gpu), and any
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
[ -d "$DATA/faces" ] || "$PYTHON" -c "import files; files.write_synthetic_faces('$DATA/faces', subjects=100, per_subject=50, size=64)"
: > "$OUT/gpu_check.log"
: > "$OUT/gpu_check.times"
make --no-print-directory plan "${VARS[@]}" "$@" 2>&1 | tee -a "$OUT/gpu_check.log"  # OUT/plan.json, before anything trains

# Host syncs per training step: a lock-step group of 3 students and the teacher, 5 steps to warm up, 10 counted.
"$PYTHON" - "$OUT" <<'SYNCS'
import json, os, sys, warnings
import torch
import common, machinery as M, q1b_kd
out, device, syncs = sys.argv[1], torch.device("cuda"), {}
teacher = M.prepare(common.teacher_resnet18(pretrained=False), device).eval()
x = torch.randint(0, 255, (15 * 512, 3, 32, 32), dtype=torch.uint8, device=device)
y = torch.randint(0, 10, (15 * 512,), device=device)
part = lambda a, b: common.Batches(x[a * 512:b * 512], y[a * 512:b * 512], batch_size=512, shuffle=True,  # noqa: E731
                                   augment=True, gen=torch.Generator(device).manual_seed(0))
for precision in ("bf16", "fp16", "fp32"):
    students = M.prepare(common.Students([common.StudentCNN(bn=True) for _ in range(3)]), device)
    opt = common.sgd(common.student_groups(students, 0.02, 0.1), 0.02)
    sched, step = common.warmup_cosine(opt, 100, 10), M.Step(students, opt, precision, clip=5.0)
    loss = q1b_kd.distill_loss(teacher, [(20.0, 0.1), (10.0, 0.5), (20.0, 1.0)])
    common.train_epoch(students, loss, sched, part(0, 5), step)  # warm-up: cuDNN's choices, the allocator
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        common.train_epoch(students, loss, sched, part(5, 15), step)
        torch.cuda.set_sync_debug_mode("default")
    syncs[precision] = sum("synchroniz" in str(w.message) for w in seen) / 10
    del students, opt, step
json.dump(syncs, open(os.path.join(out, "gpu_check.syncs.json"), "w"))
print("host syncs per training step:", syncs)
SYNCS

for step in teacher kd-table continual report; do
  start=$(date +%s)
  make --no-print-directory "$step" "${VARS[@]}" "$@" 2>&1 | tee -a "$OUT/gpu_check.log"
  echo "$step $(( $(date +%s) - start ))" >> "$OUT/gpu_check.times"
done

"$PYTHON" - "$OUT" <<'SUMMARY'
import glob, json, os, sys
import torch
out = sys.argv[1]
times = dict(line.split() for line in open(os.path.join(out, "gpu_check.times")))
acc = lambda p: json.load(open(p))  # noqa: E731
plan, syncs = acc(f"{out}/plan.json"), acc(f"{out}/gpu_check.syncs.json")
kd = sorted(glob.glob(f"{out}/kd/*/result.json"))
q2 = sorted(glob.glob(f"{out}/continual/*/result.json"))
runs = {"teacher": [f"{out}/teacher/result.json"], "kd-table": kd, "continual": q2}
gib = lambda b: f"{b / 2 ** 30:.1f} GiB" if b else "-"  # noqa: E731
group = acc(f"{out}/kd/group.json") if os.path.exists(f"{out}/kd/group.json") else {}
used = {"teacher": "", "continual": "",
        "kd-table": f"up to {group.get('group', '?')}" + (f" ({group['reason']})" if "reason" in group else "")}
planned = {"teacher": "", "continual": "", "kd-table": "+".join(map(str, plan["groups"]["kd-table"]))}
what = {"teacher": lambda r: f"test {r['test_acc']:.2f}%",
        "kd-table": lambda r: f"T {r['T']:g} λ {r['lam']:g}: {r['test_acc']:.2f}%",
        "continual": lambda r: f"old {r['old_test_acc']:.1f}% new {r['new_test_acc']:.1f}%"}
rows = [f"| {s} | {plan['seconds'][s]:.0f} s | {float(times[s]):.0f} s | {gib(plan['peak_bytes'].get(s, 0))} | "
        f"{gib(max(acc(p).get('peak_gpu_bytes', 0) for p in runs[s]))} | {planned[s]} | {used[s]} | "
        + ", ".join(what[s](acc(p)) for p in runs[s]) + " |" for s in ("teacher", "kd-table", "continual")]
rows.append(f"| report | | {float(times['report']):.0f} s | | | | | |")
card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
cfg = json.load(open(f"{out}/teacher/config.json"))
t = acc(f"{out}/teacher/result.json")
data = {"official": "CIFAR-10", "other": "CIFAR-10 images, not the official files",
        "synthetic": "synthetic CIFAR-10"}[t.get("cifar10_source", "official")]
subjects = json.load(open(q2[0].replace("result.json", "config.json")))["subjects"] if q2 else 0
text = (f"### gpu_check on {card}, {cfg['precision']}, torch {torch.__version__}\n\n{data} "
        f"({t['train_images']:,} training, {t['test_images']:,} test images), teacher from "
        f"{'ImageNet' if cfg['pretrained'] else 'random'} weights, {cfg['epochs']} epochs, SEEDS=1, "
        f"{subjects} synthetic face subjects. make plan's probe (images/s): "
        + ", ".join(f"{k} {v:,.0f}" for k, v in plan["images_per_s"].items()) + ". Host syncs per training step of a "
        "lock-step group (3 students and the teacher): " + ", ".join(f"{k} {v:g}" for k, v in syncs.items())
        + ".\n\n| step | planned time | wall time | planned peak memory | peak memory | planned groups | groups used | "
        "accuracy |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
open(os.path.join(out, "gpu_check.md"), "w").write(text)
print(text)
SUMMARY
