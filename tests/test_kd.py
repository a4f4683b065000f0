import hashlib
import json
import shutil

import pytest
import torch
import torch.nn as nn

import common
import machinery
import q1b_kd
import report
from common import Batches, StudentCNN, Students, kd_loss, sgd, teacher_resnet18, train_epoch, warmup_cosine
from conftest import one_line_error


def args(cifar_root, out, *extra):
    return ["--data", cifar_root, "--out", str(out), "--device", "cpu", "--epochs", "2", "--batch", "20",
            "--lr", "0.01", "--warmup", "0", *extra]


def test_students_in_lock_step_match_students_trained_alone(tmp_path, cifar_root, teacher_out, small_students):
    alone, together = tmp_path / "alone", tmp_path / "together"
    shutil.copytree(teacher_out, alone)
    shutil.copytree(teacher_out, together)
    q1b_kd.main(args(cifar_root, alone, "--T", "4", "--lam", "0.5", "--epochs", "1"))
    q1b_kd.main(args(cifar_root, together, "--sweep", "--sweep-T", "4", "8", "--sweep-lam", "0.5", "--epochs", "1"))
    a = json.load(open(alone / "kd" / "T4_lam0.5" / "history.json"))
    b = json.load(open(together / "kd" / "T4_lam0.5" / "history.json"))
    for ra, rb in zip(a, b):
        for k in ("train_loss", "test_loss", "train_acc", "test_acc", "lr", "test_agree", "test_kl", "test_ce"):
            assert abs(ra[k] - rb[k]) <= 1e-4 * max(1.0, abs(ra[k])), (k, ra[k], rb[k])
    wa = torch.load(alone / "kd" / "T4_lam0.5" / "model.pt", weights_only=True)
    wb = torch.load(together / "kd" / "T4_lam0.5" / "model.pt", weights_only=True)
    assert {v.dtype for v in wa.values() if v.is_floating_point()} == {torch.float16}  # kept in half the disk
    # within 1e-5 in float32, so at most one float16 step (2^-10 of the value) apart once rounded
    assert all(torch.allclose(wa[k].float(), wb[k].float(), rtol=2 ** -10, atol=1e-5) for k in wa)
    assert json.load(open(together / "kd" / "T8_lam0.5" / "config.json"))["T"] == 8
    report.main(["--out", str(together)])
    assert "| 4 | " in (together / "tables" / "kd_sweep.md").read_text()  # a sweep alone, without the table's students


class Spy(nn.Module):
    """Wraps a teacher and records what it was given and in which mode."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher, self.seen = teacher, []

    def forward(self, x):
        self.seen.append((x.clone(), self.teacher.training, torch.is_grad_enabled()))
        return self.teacher(x)


def test_soft_targets_come_from_the_teacher_in_eval_mode_without_grad_on_the_students_batch():
    teacher = teacher_resnet18(pretrained=False).eval().requires_grad_(False)
    spy = Spy(teacher)
    students = Students([StudentCNN(bn=True)])
    inputs = []
    students[0].register_forward_pre_hook(lambda m, a: inputs.append(a[0].clone()))
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    data = Batches(x, torch.arange(8) % 10, batch_size=4, shuffle=True, augment=True,
                   gen=torch.Generator().manual_seed(0))
    opt = sgd(students.parameters(), 0.01)
    train_epoch(students, q1b_kd.distill_loss(spy, [(4.0, 0.5)]), warmup_cosine(opt, 10, 0), data, machinery.Step(students, opt))
    assert len(spy.seen) == len(inputs) == 2
    for (tx, training, grad), sx in zip(spy.seen, inputs):
        assert torch.equal(tx, sx) and not training and not grad
    assert not torch.equal(inputs[0], inputs[1])


def test_the_group_loss_is_each_students_kd_loss():
    teacher = teacher_resnet18(pretrained=False).eval()
    students = Students([StudentCNN(bn=False), StudentCNN(bn=False)]).train()  # no BatchNorm, no dropout: deterministic
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    pairs = [(2.0, 0.3), (8.0, 1.0)]
    with torch.no_grad():
        losses, logits = q1b_kd.distill_loss(teacher, pairs)(students, x, y)  # a training batch: no fidelity
        t = teacher(x)
        for k, (T, lam) in enumerate(pairs):
            assert torch.allclose(losses[k], kd_loss(students[k](x), t, y, T, lam), rtol=1e-5, atol=1e-6)


def test_a_diverging_student_stops_alone_the_tables_say_so_and_the_exit_is_non_zero(tmp_path, cifar_root, teacher_out,
                                                                                     small_students,
                                                                                     monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(teacher_out, out)
    real, calls = common.kd_loss, []

    def kd_loss(s, t, y, T, lam):  # student T=8 turns NaN at its 5th training step: epoch 2, step 2 (3 per epoch)
        loss = real(s, t, y, T, lam)
        if T == 8 and torch.is_grad_enabled():
            calls.append(1)
            if len(calls) >= 5:
                loss = loss * float("nan")
        return loss
    monkeypatch.setattr(q1b_kd, "kd_loss", kd_loss)  # what distill_loss calls
    argv = args(cifar_root, out, "--sweep", "--sweep-T", "4", "8", "--sweep-lam", "0.5")
    with pytest.raises(SystemExit) as e:
        q1b_kd.main(argv)
    one_line_error(e, "1 student(s) diverged (T8_lam0.5 diverged at epoch 2, step 2)")
    assert json.load(open(out / "kd" / "T8_lam0.5" / "result.json"))["diverged"] == "diverged at epoch 2, step 2"
    assert not (out / "kd" / "T8_lam0.5" / "model.pt").exists()
    good = json.load(open(out / "kd" / "T4_lam0.5" / "result.json"))
    assert "diverged" not in good and (out / "kd" / "T4_lam0.5" / "model.pt").exists()
    report.main(["--out", str(out)])
    assert "| 8 | diverged at epoch 2, step 2 |" in (out / "tables" / "kd_sweep.md").read_text()
    assert not (out / "kd" / "sweep1" / "checkpoint.pt").exists()
    monkeypatch.setattr(q1b_kd, "kd_loss", real)
    with pytest.raises(SystemExit) as again:  # a rerun trains nothing and still says so
        q1b_kd.main(argv)
    assert str(again.value) == str(e.value)


def test_the_table_in_one_group_and_split_after_running_out_of_memory_gives_the_same_students(
        tmp_path, cifar_root, teacher_out, monkeypatch, capsys, small_students):
    one, split = tmp_path / "one", tmp_path / "split"
    shutil.copytree(teacher_out, one)
    shutil.copytree(teacher_out, split)
    q1b_kd.main(args(cifar_root, one, "--table", "--epochs", "1", "--group", "5"))  # the five students in one group
    real = common.train_epoch

    def small_gpu(model, *a, **kw):  # a card on which no more than 2 students fit: out of memory on the first step
        if len(model) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.25 GiB")
        return real(model, *a, **kw)
    monkeypatch.setattr(common, "train_epoch", small_gpu)
    capsys.readouterr()
    q1b_kd.main(args(cifar_root, split, "--table", "--epochs", "1"))  # GROUP empty: 10 on the CPU, then split
    printed = capsys.readouterr().out
    assert "out of GPU memory on the first step of 5 students in lock-step: starting again in groups of at most 3" \
           in printed and "of 3 students in lock-step: starting again in groups of at most 2" in printed
    assert printed.count("-- lock-step group of") == 2 + 3  # 5 and 3 ran out, then 2 + 1 and 2
    assert machinery.read_json(str(split / "kd" / "group.json"))["group"] == 2  # a rerun makes the same groups
    for _, T, lam in q1b_kd.TABLE:  # the same initial weights, data order and augmentation: the same students
        a, b = (json.load(open(o / "kd" / q1b_kd.name(T, lam) / "history.json"))[-1] for o in (one, split))
        for k in ("train_loss", "test_loss", "train_acc", "test_acc"):
            assert abs(a[k] - b[k]) <= 1e-4 * max(1.0, abs(a[k])), (T, lam, k, a[k], b[k])
    assert not list(split.glob("kd/*/checkpoint.pt"))
    q1b_kd.main(args(cifar_root, split, "--table", "--epochs", "1"))
    assert "every student asked for is finished" in capsys.readouterr().out


def test_a_lock_step_group_is_one_seeds_students_at_most_size_of_them():
    specs = [(T, 0.1, i) for T in (5.0, 10.0, 20.0) for i in range(3)]
    assert machinery.lockstep_groups(specs, 7) == [[(T, 0.1, i) for T in (5.0, 10.0, 20.0)] for i in range(3)]
    assert [len(g) for g in machinery.lockstep_groups(specs, 2)] == [2, 1, 2, 1, 2, 1]
    for size in (1, 2, 4):
        groups = machinery.lockstep_groups(specs, size)
        assert sorted(s for g in groups for s in g) == sorted(specs) and all(len({s[2] for s in g}) == 1 for g in groups)


def test_a_student_of_another_teacher_is_refused(tmp_path, cifar_root, teacher_out, small_students):
    out = tmp_path / "out"
    shutil.copytree(teacher_out, out)
    q1b_kd.main(args(cifar_root, out, "--T", "4", "--lam", "0.5"))
    sha = json.load(open(out / "kd" / "T4_lam0.5" / "config.json"))["teacher_sha256"]
    assert sha == hashlib.sha256((out / "teacher" / "model.pt").read_bytes()).hexdigest()
    state = torch.load(out / "teacher" / "model.pt", weights_only=True)
    state["fc.bias"] += 1  # another teacher
    torch.save(state, out / "teacher" / "model.pt")
    before = (out / "kd" / "T4_lam0.5" / "result.json").read_bytes()
    with pytest.raises(SystemExit) as e:
        q1b_kd.main(args(cifar_root, out, "--T", "4", "--lam", "0.5"))
    one_line_error(e, "out/kd/T4_lam0.5 was made with another teacher", f"sha256 {sha[:12]}")
    assert (out / "kd" / "T4_lam0.5" / "result.json").read_bytes() == before


def test_each_seed_trains_in_its_own_group_and_seed_0_as_if_alone(tmp_path, cifar_root, teacher_out, monkeypatch,
                                                                  small_students):
    alone, seeds = tmp_path / "alone", tmp_path / "seeds"
    shutil.copytree(teacher_out, alone)
    shutil.copytree(teacher_out, seeds)
    q1b_kd.main(args(cifar_root, alone, "--T", "4", "--lam", "0.5", "--epochs", "1"))
    calls = []
    real = q1b_kd.load_teacher
    monkeypatch.setattr(q1b_kd, "load_teacher", lambda *a: Spy(real(*a)).requires_grad_(False))
    monkeypatch.setattr(Spy, "forward", lambda self, x: calls.append(len(x)) or self.teacher(x))
    q1b_kd.main(args(cifar_root, seeds, "--T", "4", "--lam", "0.5", "--seeds", "3", "--epochs", "1"))
    assert not list((seeds / "kd").glob("*/checkpoint.pt"))  # the group, finished, keeps none
    # the cached logits of the train (60) and test (30) sets, then a group per seed: one forward of batch 20 per step
    assert calls == [60, 30] + [20] * 3 * 3  # 3 steps in the epoch
    a = json.load(open(alone / "kd" / "T4_lam0.5" / "history.json"))
    b = [json.load(open(seeds / "kd" / f"T4_lam0.5{s}" / "history.json")) for s in ("", "_seed1", "_seed2")]
    assert [r["test_loss"] for r in a] == pytest.approx([r["test_loss"] for r in b[0]], rel=1e-5)
    assert b[1] != b[0] and b[2] != b[1]  # other seeds: other weights, order and augmentation
    assert [json.load(open(seeds / "kd" / f"T4_lam0.5{s}" / "config.json"))["seed"] for s in ("", "_seed1", "_seed2")] == [0, 1, 2]


def test_the_group_that_fits_the_free_memory():
    # 2 students: 5 GB, 4 students: 9 GB: 2 GB a student, 1 GB fixed (the batch, workspaces)
    plan = machinery.plan_group(free=40e9, measured={2: 5e9, 4: 9e9}, floor=0.5e9)
    assert plan["group"] == int((0.8 * 40e9 - 1e9) / 2e9) == 15 and plan["per_student"] == 2e9 and plan["fixed"] == 1e9
    assert machinery.plan_group(free=1e9, measured={2: 5e9, 4: 9e9}, floor=0.5e9)["group"] == 1  # never below one


@pytest.mark.parametrize("measured", [{2: 2.0e9, 4: 2.0e9}, {2: 3.0e9, 4: 2.5e9}, {2: 2.0e9, 4: 2.0e9 + 1}],
                         ids=["zero", "negative", "one byte"])
def test_a_slope_that_measures_nothing_falls_back_on_the_arithmetic_floor(measured):
    """The old probe measured 1 and 2 students, the first paying cuDNN's trial workspaces: a tiny, zero or negative
    difference made a group of 10^11 students. The floor (weights, gradients, momentum, activations) bounds it."""
    plan = machinery.plan_group(free=130e9, measured=measured, floor=0.6e9)
    assert plan["per_student"] == 0.6e9 and plan["group"] * 0.6e9 + plan["fixed"] <= 0.8 * 130e9
    assert plan["group"] <= int(0.8 * 130e9 / 0.6e9)


def test_the_floor_is_weights_gradients_momentum_and_activations_by_arithmetic():
    student = StudentCNN(bn=True)
    params = sum(q.numel() for q in student.parameters())
    # outputs of every layer of one image: 3 convs, 3 BatchNorms, 3 ReLUs (as the convs), 3 pools, FC, ReLU, dropout, FC
    convs = [32 * 30 * 30, 64 * 29 * 29, 128 * 28 * 28]
    pools = [32 * 29 * 29, 64 * 28 * 28, 128 * 27 * 27]
    per_image = 3 * sum(convs) + sum(pools) + 500 * 3 + 10
    assert machinery.student_floor(student, 512, "bf16") == 12 * params + 2 * 512 * per_image
    assert machinery.student_floor(student, 512, "fp32") == 12 * params + 4 * 512 * per_image


class FakeCuda:
    """torch.cuda's memory readings, stubbed: each step of k students peaks at fixed + k * per bytes (plus a spike
    on the first call: cuDNN's trial workspaces), on a card with `free` bytes free."""

    def __init__(self, monkeypatch, free, per, fixed=1e9, spike=20e9):
        self.calls, self.allocated, self.peak = 0, 0, 0
        self.free, self.per, self.fixed, self.spike = free, per, fixed, spike
        for name, fn in (("empty_cache", lambda: None), ("memory_allocated", lambda d=None: 0),
                         ("reset_peak_memory_stats", lambda d=None: None), ("max_memory_allocated", self.max),
                         ("mem_get_info", lambda d=None: (self.free, 2 * self.free))):
            monkeypatch.setattr(torch.cuda, name, fn)
        real = machinery.student_memory

        def counted(make, k, *a):
            self.k = k
            self.calls += 1
            return real(make, k, *a)
        monkeypatch.setattr(machinery, "student_memory", counted)

    def max(self, d=None):
        return self.fixed + self.k * self.per + (self.spike if self.calls == 1 else 0)


@pytest.mark.parametrize("gb", [16, 24, 40, 80])
def test_group_sizing_with_a_first_call_spike_on_cards_of_16_to_80_gb(monkeypatch, tmp_path, gb):
    from conftest import SmallStudent
    fake = FakeCuda(monkeypatch, free=gb * 1e9, per=1.5e9)
    make = lambda k: Students([SmallStudent(bn=True) for _ in range(k)])  # noqa: E731
    sizing = machinery.measure_group(make, 8, "bf16", torch.device("cpu"))
    assert fake.calls == 3  # the warm-up step (its spike discarded), then 2 and 4 students
    assert sizing["measured"] == {"2": 1e9 + 3e9, "4": 1e9 + 6e9} and sizing["per_student"] == 1.5e9
    assert sizing["group"] == int((0.8 * gb * 1e9 - 1e9) / 1.5e9)
    assert sizing["group"] * 1.5e9 + 1e9 <= 0.8 * gb * 1e9 < (sizing["group"] + 1) * 1.5e9 + 1e9
    args = type("Args", (), {"group": 0, "out": str(tmp_path), "batch": 8, "precision": "bf16"})
    (tmp_path / "kd").mkdir()
    real = machinery.measure_group
    monkeypatch.setattr(machinery, "measure_group", lambda make, b, p, device: real(make, b, p, torch.device("cpu")))
    fake.calls = 0
    assert machinery.group_size(args, torch.device("cuda"), make) == sizing["group"]  # and kept for a rerun
    assert machinery.read_json(str(tmp_path / "kd" / "group.json"))["measured"] == sizing["measured"]


def test_student_memory_measures_the_peak_of_one_training_step_above_what_was_there(monkeypatch):
    readings = iter([7e9])
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: 2e9)  # the teacher and data, already there
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: next(readings))
    seen = []

    def make(k):
        from conftest import SmallStudent
        students = Students([SmallStudent(bn=True) for _ in range(k)])
        students[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
        return students
    assert machinery.student_memory(make, 3, 16, "fp32", torch.device("cpu")) == 5e9
    assert seen == [(16, 3, 32, 32)]  # one step at the batch size


def test_the_first_fc_trains_at_its_own_fraction_of_the_rate_in_a_group_and_alone():
    from common import student_groups
    group = Students([StudentCNN(bn=True), StudentCNN(bn=True)])
    groups = student_groups(group, 0.04, 0.1)
    assert [g["lr"] for g in groups] == pytest.approx([0.04, 0.004, 0.04, 0.004])  # two per student
    ids = lambda ps: {id(q) for q in ps}  # noqa: E731
    for k, (fast, slow) in enumerate(zip(groups[::2], groups[1::2])):
        assert ids(slow["params"]) == ids(group[k].classifier[0].parameters())
        assert ids(fast["params"]) | ids(slow["params"]) == ids(group[k].parameters())
        assert not ids(fast["params"]) & ids(slow["params"])
        assert sum(q.numel() for q in slow["params"]) == 93312 * 500 + 500
    one = student_groups(group[0], 0.04, 0.1)
    assert ids(one[1]["params"]) == ids(group[0].classifier[0].parameters())


def test_the_clip_asked_for_is_the_one_each_student_steps_with(tmp_path, cifar_root, teacher_out, small_students,
                                                               monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(teacher_out, out)
    clips, real = [], machinery.Step.__init__
    monkeypatch.setattr(machinery.Step, "__init__", lambda self, *a, **kw: clips.append(a[2:4]) or real(self, *a, **kw))
    q1b_kd.main(args(cifar_root, out, "--T", "4", "--lam", "0.5", "--epochs", "1", "--clip", "3"))
    assert clips == [("fp32", 3.0)]
