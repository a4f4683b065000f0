"""Result folders as the scripts write them, with invented numbers: the report's tests read them, and so can a
reader: `python tests/fakes.py OUT` writes each regime of REGIMES into OUT/<regime>/ and makes its report there.
Nothing here is a result."""
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import q1a_teacher as q1a  # noqa: E402
import q1b_kd as q1b  # noqa: E402
import q2_continual as q2  # noqa: E402

SPREAD = {"fe": 0.6, "ft": 1.2, "lwf": 0.7, "joint": 0.5, "ft-all": 1.5, "lam0": 1.0}  # of the seeds
METHOD_ACC = {"fe": (93.0, 60.0), "ft": (40.0, 80.0), "lwf": (75.0, 70.0), "joint": (91.0, 78.0), "ft-all": (30.0, 82.0),
              "lam0": (35.0, 81.0)}


def write_run(folder, config, history, result):
    os.makedirs(folder, exist_ok=True)
    for name, obj in (("config", config), ("history", history), ("result", result)):
        with open(os.path.join(folder, f"{name}.json"), "w") as f:
            json.dump(obj, f)


def rise(start, end, e, epochs):
    """From `start` at epoch 0 to `end` at the last, most of the way in the first epochs."""
    return end - (end - start) * (1 - e / epochs) ** 2


def ce(a, chance=10.0):
    """A cross-entropy that an accuracy of a% allows: -ln of a mean true-class probability of 0.85 a + 0.15 chance
    (ln 1/chance at chance; never below (1 - a) ln 2, what the misclassified images alone cost)."""
    return -math.log((0.85 * max(a, chance) + 0.15 * chance) / 100)


def history(epochs, acc, train=None, chance=10.0, extra=lambda e: {}):
    """Epoch 0 (before training, at `chance`, its loss ln(1 / chance)) to `epochs`, ending at the result's test
    accuracy `acc` and training accuracy `train`, each loss falling with its accuracy (ce); the lr's cosine at 0
    after the last."""
    train = acc + 3 if train is None else train
    return [{"epoch": e, "lr": 0.1 * (1 - e / epochs), "train_loss": ce(rise(chance, train, e, epochs), chance),
             "test_loss": ce(rise(chance, acc, e, epochs), chance), "train_acc": rise(chance, train, e, epochs),
             "test_acc": rise(chance, acc, e, epochs), **extra(e)} for e in range(epochs + 1)]


def soft_targets(teacher, Ts=(1, 5, 10, 20), label=3):
    """What common.soft_target_summary records, from one made-up logit vector, flatter for a weaker teacher: top and
    true class (the true class at most what a teacher right on teacher% of the images allows), entropy."""
    logits = [v * teacher / 95 for v in (0.0, 1.0, 2.0, 7.0, 1.5, 5.0, 0.5, 1.0, 0.0, 0.5)]  # a cat: the dog next
    out = {"label": label}
    for T in Ts:
        z = [math.exp(v / T) for v in logits]
        p = [v / sum(z) for v in z]
        out[f"{T:g}"] = {"top": max(p), "true": p[label] * (0.5 + teacher / 200),
                         "entropy": -sum(q * math.log(q) for q in p) / math.log(10), "example": p}
    return out


def fake_out(out, seeds=2, epochs=3, teacher=94.0, student=lambda k, i: 60.0 + 2 * k + 1.5 * i, methods=None,
             gap=lambda k: 10.0, agree=lambda k, acc: acc + 2, n_test=10000, n_train=50000, before=None, sweep=True):
    """A finished teacher, the KD table's five students, a 2x2 sweep and the five Q2 methods with LwF at λo = 0 (100
    subjects), each with `seeds` seeds, as the scripts write them: configs from the scripts' own defaults.
    `student(k, i)`: the test accuracy of student k of the table, seed i (default: KD students a few points above
    λ = 0, seeds 1.5 points apart); `gap(k)`: its training minus test accuracy; `agree(k, acc)`: its agreement with
    the teacher; `methods`: {method or "lam0": (old-task, new-task test accuracy)} (seed i adds i times SPREAD to both; feature extraction keeps
    the old task at `before`, the teacher's as Q2 measures it: default its test accuracy)."""
    before, device = teacher if before is None else before, "cuda" if seeds > 1 else "cpu"
    t = vars(q1a.parse(["--epochs", str(epochs)])) | {"precision": "fp32"}
    for k in ("data", "out", "device"):
        t.pop(k)
    write_run(f"{out}/teacher", t, history(epochs, teacher, teacher + 3.25), {
        "train_acc": teacher + 3.25, "test_acc": teacher, "train_loss": 0.1, "test_loss": 0.2, "epochs": epochs, "device": device,
        "cifar10_source": "official", "train_images": n_train, "test_images": n_test})
    with open(f"{out}/teacher/model.pt", "wb") as f:
        f.write(f"weights of a {teacher}% teacher".encode())
    kd = vars(q1b.parse(["--epochs", str(epochs)]))
    shared = {k: kd[k] for k in ("epochs", "lr", "fc1_lr", "batch", "momentum", "wd", "warmup", "clip", "bn", "dropout",
                                 "augment", "seed")} | {"precision": "fp32", "teacher_sha256": "ab" * 32}
    accs = {}
    for k, (label, T, lam) in enumerate(q1b.TABLE):
        for i in range(seeds):
            acc = student(k, i)
            accs.setdefault(label, []).append(acc)
            fid = {"test_ce": ce(acc), "test_agree": agree(k, acc), "test_kl": (100 - agree(k, acc)) / 40}
            h = history(epochs, acc, acc + gap(k), extra=lambda e: {
                "test_ce": ce(rise(10, acc, e, epochs)), "test_agree": rise(10, fid["test_agree"], e, epochs),
                "test_kl": rise(2.0, fid["test_kl"], e, epochs)})
            for r in h:  # the KL form q1b_kd.py records: (1 - lam) CE + lam T^2 KL, the soft term falling to 0.3
                r |= {key: (1 - lam) * r[key] + lam * (0.3 + 1.7 * (1 - r["epoch"] / epochs) ** 2)
                      for key in ("train_loss", "test_loss")}
            write_run(f"{out}/kd/{q1b.name(T, lam, i)}", shared | {"T": T, "lam": lam, "seed": i}, h,
                      {"train_acc": acc + gap(k), "test_acc": acc, "train_loss": 0.5, "test_loss": 0.6, "T": T, "lam": lam,
                       "seed": i, "epochs": epochs, "device": device} | fid)
    with open(f"{out}/kd/soft_targets.json", "w") as f:  # as q1b_kd.py records them (common.soft_target_summary)
        json.dump(soft_targets(teacher), f)
    if sweep:
        cells = sweep if isinstance(sweep, tuple) else (66.25, 71.5, 64.0, 69.75)
        with open(f"{out}/kd/sweep.json", "w") as f:
            json.dump({"T": [2.0, 8.0], "lam": [0.5, 0.9], "seeds": 1}, f)
        for (T, lam), acc in zip(((2.0, 0.5), (2.0, 0.9), (8.0, 0.5), (8.0, 0.9)), cells):
            write_run(f"{out}/kd/{q1b.name(T, lam)}", shared | {"T": T, "lam": lam, "seed": 0},
                      history(epochs, acc, acc + 5, extra=lambda e: {"test_ce": ce(rise(10, acc, e, epochs))}),
                      {"train_acc": acc + 5, "test_acc": acc, "train_loss": 0.5, "test_loss": 0.6, "T": T, "lam": lam,
                       "seed": 0, "epochs": epochs, "device": device})
    args = q2.parse(["--epochs", str(epochs), "--lwf-warmup", "1", "--faces", "/somewhere/faces"])
    args.precision, args.teacher_sha256 = "fp32", "ab" * 32
    for key, m, lam in [(m, m, 1.0) for m in q2.METHODS] + [("lwf_lam0", "lwf", 0.0)]:
        old, new = (methods or METHOD_ACC)[m if key != "lwf_lam0" else "lam0"]
        w = args.lwf_warmup if m in ("lwf", "joint") else 0  # its warm-up: the old task untouched
        sd = SPREAD[m if key != "lwf_lam0" else "lam0"]  # seed i adds i times this to both tasks
        for i in range(seeds):
            o = before if m == "fe" else old + sd * i
            curve = lambda e: before if e <= w else rise(before, o, e - w, epochs - w)  # noqa: E731
            write_run(q2.run_dir(args, key, i).replace(args.out, str(out)), q2.method_config(m, args, 0.1, i, lam),
                      history(epochs, new + sd * i, new + 10, chance=100 / args.subjects, extra=lambda e: {
                          "old_test_acc": curve(e), "old_train_acc": curve(e) + 3.25,
                          "old_test_loss": ce(curve(e)), "old_train_loss": ce(curve(e) + 3.25)}),
                      {"old_train_acc": o + 3.25, "old_test_acc": o, "new_train_acc": new + 10 + sd * i / 2, "new_test_acc": new + sd * i,
                       "old_train_acc_before": before + 3.25, "old_test_acc_before": before, "seed": i, "epochs": epochs,
                       "device": device, "faces_source": "DigiFace-1M"})
    return accs



# Invented regimes, each of 3 seeds on full-size test sets unless said: (students' test accuracy by table row,
# λ = 0 first; Q2 methods' (old, new) test accuracy), and what the report must find in them.
REGIMES = {
    "expected": dict(teacher=95.0, students=[80.0, 78.0, 81.8, 82.3, 82.0], gap=[8.0, 4.0, 5.0, 5.0, 5.0],
                     methods={"fe": (93.0, 60.0), "ft": (70.0, 75.0), "lwf": (85.0, 72.0), "joint": (91.0, 74.0),
                              "ft-all": (40.0, 78.0), "lam0": (60.0, 76.0)}),
    "kd-below": dict(teacher=95.0, students=[80.0, 76.0, 77.0, 77.5, 77.2], gap=[8.0, 8.0, 8.0, 8.0, 8.0],
                     methods={"fe": (93.0, 60.0), "ft": (70.0, 75.0), "lwf": (85.0, 72.0), "joint": (91.0, 74.0),
                              "ft-all": (40.0, 78.0), "lam0": (60.0, 76.0)}),
    "joint-low": dict(teacher=95.0, students=[80.0, 78.0, 81.8, 82.3, 82.0], gap=[8.0, 4.0, 5.0, 5.0, 5.0],
                      methods={"fe": (95.0, 60.0), "ft": (94.6, 62.0), "lwf": (85.0, 72.0), "joint": (50.0, 74.0),
                               "ft-all": (40.0, 78.0), "lam0": (60.0, 76.0)}),
    "small-noisy": dict(teacher=70.0, students=[52.0, 50.0, 52.5, 51.5, 53.0], gap=[4.0, 3.0, 4.0, 4.5, 4.0],
                        seeds=1, n_test=2000, n_train=5000,
                        methods={"fe": (70.0, 35.0), "ft": (69.5, 38.0), "lwf": (70.0, 37.0), "joint": (69.5, 38.5),
                                 "ft-all": (69.0, 39.0), "lam0": (69.5, 38.0)}),
    "all-fail": dict(teacher=60.0, students=[70.0, 78.0, 66.0, 65.0, 64.0], gap=[4.0, 9.0, 9.0, 9.0, 9.0],
                     agree=[70.0, 60.0, 60.0, 60.0, 60.0],
                     methods={"fe": (60.0, 70.0), "ft": (60.3, 60.0), "lwf": (40.0, 62.0), "joint": (30.0, 60.0),
                              "ft-all": (59.5, 61.0), "lam0": (50.0, 64.0)}),
}


def regime(out, name):
    """Write the regime `name` of REGIMES into `out`."""
    r = REGIMES[name]
    fake_out(out, seeds=r.get("seeds", 3), epochs=8, teacher=r["teacher"], student=lambda k, i: r["students"][k] + (0.2 + 0.1 * k) * i,
             methods=r["methods"], gap=lambda k: r["gap"][k], sweep=tuple(r["students"][0] + d for d in (-1, 0.5, -2, -0.2)), n_test=r.get("n_test", 10000), n_train=r.get("n_train", 50000),
             agree=(lambda k, a: r["agree"][k]) if "agree" in r else  # within 100 - |teacher - student| of the test images
             (lambda k, a: a + (100 - r["teacher"]) / 2 + (k > 1) * min(1.0, 0.3 * (100 - r["teacher"]))))


if __name__ == "__main__":
    import report
    for name in REGIMES:
        folder = os.path.join(sys.argv[1], name)
        regime(folder, name)
        report.main(["--out", folder])
