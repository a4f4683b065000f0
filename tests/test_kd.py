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
        for k in ("train_loss", "test_loss", "train_acc", "test_acc", "lr"):
            if rb[k] is None:  # the sweep measures the training set at its last epoch only
                assert k.startswith("train") and rb is not b[-1]
                continue
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
    train_epoch(students, q1b_kd.distill_loss(spy, [(4.0, 0.5)]), opt, warmup_cosine(opt, 10, 0), data)
    assert len(spy.seen) == len(inputs) == 2
    for (tx, training, grad), sx in zip(spy.seen, inputs):
        assert torch.equal(tx, sx) and not training and not grad
    assert not torch.equal(inputs[0], inputs[1])


def test_the_group_loss_is_each_students_kd_loss():
    teacher = teacher_resnet18(pretrained=False).eval()
    students = Students([StudentCNN(), StudentCNN()]).eval()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    pairs = [(2.0, 0.3), (8.0, 1.0)]
    with torch.no_grad():
        losses, logits = q1b_kd.distill_loss(teacher, pairs)(students, x, y)
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
        a, b = (json.load(open(o / "kd" / q1b_kd.name(T, lam) / "history.json"))[0] for o in (one, split))
        for k in ("train_loss", "test_loss", "train_acc", "test_acc"):
            assert abs(a[k] - b[k]) <= 1e-4 * max(1.0, abs(a[k])), (T, lam, k, a[k], b[k])
    assert not list(split.glob("kd/*/checkpoint.pt"))
    q1b_kd.main(args(cifar_root, split, "--table", "--epochs", "1"))
    assert "every student asked for is finished" in capsys.readouterr().out


def test_lock_step_groups_keep_each_students_seeds_together_where_they_fit():
    specs = [(T, 0.1, i) for T in (5.0, 10.0, 20.0) for i in range(3)]
    groups = machinery.lockstep_groups(specs, 7)
    assert [[s[:2] for s in g] for g in groups] == [[(5.0, 0.1)] * 3 + [(10.0, 0.1)] * 3, [(20.0, 0.1)] * 3]
    assert [len(g) for g in machinery.lockstep_groups(specs, 2)] == [2, 1, 2, 1, 2, 1]  # a student's seeds split
    assert sorted(s for g in machinery.lockstep_groups(specs, 4) for s in g) == sorted(specs)


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


def test_seeds_train_in_lock_step_with_one_teacher_pass_per_step_and_seed_0_as_if_alone(tmp_path, cifar_root,
                                                                                        teacher_out, monkeypatch,
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
    # the cached logits of the train (60) and test (30) sets, then one forward of 3 seeds x batch 20 per step
    assert calls == [60, 30] + [60] * 3  # 3 steps in the epoch
    a = json.load(open(alone / "kd" / "T4_lam0.5" / "history.json"))
    b = [json.load(open(seeds / "kd" / f"T4_lam0.5{s}" / "history.json")) for s in ("", "_seed1", "_seed2")]
    assert [r["test_loss"] for r in a] == pytest.approx([r["test_loss"] for r in b[0]], rel=1e-5)
    assert b[1] != b[0] and b[2] != b[1]  # other seeds: other weights, order and augmentation
    assert [json.load(open(seeds / "kd" / f"T4_lam0.5{s}" / "config.json"))["seed"] for s in ("", "_seed1", "_seed2")] == [0, 1, 2]


def test_the_group_that_fits_the_free_memory():
    # 1 student: 3 GB (1 GB of it shared: the step's fixed part); 2 students: 5 GB: 2 GB per student
    assert machinery.fit_group(free=40e9, one=3e9, two=5e9) == int((0.8 * 40e9 - 1e9) / 2e9) == 15
    assert machinery.fit_group(free=1e9, one=3e9, two=5e9) == 1  # never below one


def test_the_first_fc_trains_at_its_own_fraction_of_the_rate_in_a_group_and_alone():
    from common import student_groups
    group = Students([StudentCNN(bn=True), StudentCNN(bn=True)])
    fast, slow = student_groups(group, 0.04, 0.1)
    assert slow["lr"] == pytest.approx(0.004) and fast["lr"] == 0.04
    ids = lambda ps: {id(q) for q in ps}  # noqa: E731
    assert ids(slow["params"]) == ids([m.classifier[0].weight for m in group] + [m.classifier[0].bias for m in group])
    assert ids(fast["params"]) | ids(slow["params"]) == ids(group.parameters())
    assert not ids(fast["params"]) & ids(slow["params"])
    assert sum(q.numel() for q in slow["params"]) == 2 * (93312 * 500 + 500)
    one = student_groups(group[0], 0.04, 0.1)
    assert ids(one[1]["params"]) == ids(group[0].classifier[0].parameters())
