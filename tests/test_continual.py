import copy
import json
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import q2_continual as q2
from common import (Batches, ContinualNet, _prototypes, _samples, cross_entropy, evaluate, fit, load_cifar10, sgd,
                    soft_cross_entropy, teacher_resnet18, warmup_cosine, write_synthetic_cifar)


def run(out, cifar_root, faces_root, *extra):
    q2.main(["--data", cifar_root, "--out", str(out), "--device", "cpu", "--faces", faces_root, "--subjects", "5",
             "--per-subject", "10", "--train-per-subject", "8", "--face-size", "32", "--epochs", "2", "--batch", "10",
             "--lwf-warmup", "1", *extra])


@pytest.fixture
def out(tmp_path, teacher_out):
    shutil.copytree(teacher_out, tmp_path / "out")
    return tmp_path / "out"


def test_feature_extraction_changes_no_backbone_tensor_and_keeps_the_old_task_exactly(out, cifar_root, faces_root):
    run(out, cifar_root, faces_root, "--methods", "fe")
    teacher = torch.load(out / "teacher" / "model.pt", weights_only=True)
    net = torch.load(out / "continual" / "fe" / "model.pt", weights_only=True)
    for k, v in teacher.items():  # every weight and every BatchNorm buffer, bit for bit
        assert torch.equal(v, net["old." + k[3:]] if k.startswith("fc.") else net["backbone." + k]), k
    r = json.load(open(out / "continual" / "fe" / "result.json"))
    t = json.load(open(out / "teacher" / "result.json"))
    assert r["old_test_acc"] == r["old_test_acc_before"] == t["test_acc"]
    assert r["old_train_acc"] == r["old_train_acc_before"] == t["train_acc"]
    h = json.load(open(out / "continual" / "fe" / "history.json"))
    assert [e["old_test_acc"] for e in h] == [t["test_acc"]] * 2
    split = json.load(open(out / "continual" / "fe" / "split.json"))
    assert len(split["train"]) == 40 and len(split["test"]) == 10


def test_fine_tuning_changes_only_the_chosen_layers(out, cifar_root, faces_root):
    run(out, cifar_root, faces_root, "--methods", "ft", "--ft-layers", "conv5_2:10")
    teacher = torch.load(out / "teacher" / "model.pt", weights_only=True)
    net = torch.load(out / "continual" / "ft" / "model.pt", weights_only=True)
    params = dict(teacher_resnet18(pretrained=False).named_parameters())
    for k, v in teacher.items():
        after = net["old." + k[3:]] if k.startswith("fc.") else net["backbone." + k]
        if k.startswith("layer4.1.") and k in params:
            assert not torch.equal(v, after), k  # trained
        else:
            assert torch.equal(v, after), k  # frozen; BatchNorm statistics frozen too
    table = (out / "tables" / "finetune_layers.md").read_text()
    assert "| conv5_2 | layer4.1 | 10% of the original (0.001) |" in table  # the teacher ran at lr 0.01


def test_fine_tuning_learning_rates_are_what_was_asked():
    args = q2.parse(["--ft-layers", "conv5_x:10 conv1:1"])
    net, groups, _ = q2.build("ft", teacher_resnet18(pretrained=False), args, 0.1)
    assert [g["lr"] for g in groups] == pytest.approx([0.1, 0.01, 0.001])
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(groups[1]["params"]) == ids(net.backbone.layer4.parameters())
    assert ids(groups[2]["params"]) == ids([net.backbone.conv1.weight, net.backbone.bn1.weight, net.backbone.bn1.bias])
    trainable = ids(p for p in net.parameters() if p.requires_grad)
    assert trainable == ids(groups[0]["params"]) | ids(groups[1]["params"]) | ids(groups[2]["params"])


def test_lwf_targets_are_the_original_networks_outputs_on_the_batch():
    torch.manual_seed(0)
    teacher = teacher_resnet18(pretrained=False).eval()
    state = copy.deepcopy(teacher.state_dict())
    net, _, _ = q2.build("lwf", teacher, q2.parse([]), 0.1)
    with torch.no_grad():
        net.backbone.layer4[1].conv2.weight.mul_(1.5)  # the network has moved away from the original
    net.eval()
    original = teacher_resnet18(pretrained=False)
    original.load_state_dict(state)
    original.eval()
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 100, (6,))
    with torch.no_grad():
        loss, _ = q2.lwf_loss(copy.deepcopy(teacher).eval(), 2.0, 1.0)(net, x, y)
        old, new = net(x)
        expected = F.cross_entropy(new, y) + soft_cross_entropy(old, original(x), 2.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert soft_cross_entropy(old, original(x), 2.0) > soft_cross_entropy(original(x), original(x), 2.0)


class Small(nn.Module):
    """A teacher-shaped network (features + .fc) small enough to train here in seconds."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.body(x))


def test_lwf_keeps_more_of_the_old_task_than_fine_tuning_all_layers_at_the_same_rate(tmp_path):
    torch.manual_seed(0)
    write_synthetic_cifar(str(tmp_path / "old"), n_train=400, n_test=200)
    cifar = load_cifar10(str(tmp_path / "old"), torch.device("cpu"))
    old_test = Batches(*cifar["test"], batch_size=256)
    teacher, gen = Small(), torch.Generator().manual_seed(0)
    train = Batches(*cifar["train"], batch_size=32, shuffle=True, augment=True, gen=gen)
    opt = sgd(teacher.parameters(), 0.05)
    fit(teacher, cross_entropy, opt, warmup_cosine(opt, 8 * len(train), 0), train, {}, 8,
        str(tmp_path / "teacher"), {}, gen)
    before = evaluate(ContinualNet(copy.deepcopy(teacher), 10), q2.old_task, old_test)[1]
    assert before > 60
    g = torch.Generator().manual_seed(1)  # the new task: 10 other patterns
    labels = torch.arange(300) % 10
    faces = (_samples(_prototypes(10, 32, seed=7), labels, g), labels)
    after = {}
    for lam in (0.0, 1.0):  # lambda_o = 0 is fine-tuning every layer, with the same warm-up and rates
        args = q2.parse(["--subjects", "10", "--lwf-lr", "100", "--lwf-warmup", "1", "--lwf-lambda", str(lam),
                         "--epochs", "6"])
        net, groups, on_epoch = q2.build("lwf", teacher, args, 0.05)
        gen = torch.Generator().manual_seed(0)
        train = Batches(*faces, batch_size=32, shuffle=True, augment=True, gen=gen)
        opt = sgd(groups, 0.05)
        fit(net, q2.lwf_loss(copy.deepcopy(teacher).eval(), 2.0, lam), opt, warmup_cosine(opt, 6 * len(train), 0),
            train, {}, 6, str(tmp_path / f"lwf{lam}"), {}, gen, on_epoch=on_epoch)
        after[lam] = evaluate(net, q2.old_task, old_test)[1]
    print("old-task accuracy before", before, "after", after)
    assert after[1.0] > after[0.0] + 5, (before, after)


def test_a_continual_run_of_another_teacher_is_refused(out, cifar_root, faces_root):
    run(out, cifar_root, faces_root, "--methods", "fe")
    state = torch.load(out / "teacher" / "model.pt", weights_only=True)
    state["fc.bias"] += 1
    torch.save(state, out / "teacher" / "model.pt")
    with pytest.raises(SystemExit) as e:
        run(out, cifar_root, faces_root, "--methods", "fe")
    assert "continual/fe was made with another teacher" in str(e.value)
