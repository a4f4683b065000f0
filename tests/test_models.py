import os

import pytest
import torch
import torch.nn as nn
import torchvision

import q1b_kd
from common import ContinualNet, StudentCNN, Students, features, kd_loss, teacher_resnet18
from conftest import one_line_error
from machinery import RESNET18_FILE, stride_changes


def convs(model):
    return [(n, m.kernel_size, m.padding) for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]


def test_teacher_keeps_resnet18s_layers_and_ends_at_8x8x512():
    teacher, ref = teacher_resnet18(pretrained=False), torchvision.models.resnet18()
    assert len(convs(teacher)) == 17 and convs(teacher) == convs(ref)  # same convolutions, kernels, paddings
    assert sum(isinstance(m, nn.MaxPool2d) for m in teacher.modules()) == 1
    strides = {n: m.stride for n, m in teacher.named_modules() if isinstance(m, (nn.Conv2d, nn.MaxPool2d))}
    ref_strides = {n: m.stride for n, m in ref.named_modules() if isinstance(m, (nn.Conv2d, nn.MaxPool2d))}
    assert sorted(n for n in strides if strides[n] != ref_strides[n]) == [
        "conv1", "layer4.0.conv1", "layer4.0.downsample.0", "maxpool"]
    x = torch.randn(2, 3, 32, 32)
    assert features(teacher.eval(), x).shape == (2, 512, 8, 8)
    assert teacher(x).shape == (2, 10)


def test_stride_table_measures_both_networks():
    rows = stride_changes(teacher_resnet18(pretrained=False), 32)
    assert [r[1] for r in rows if r[2]] == ["conv1", "maxpool", "layer4.0.conv1", "layer4.0.downsample.0"]
    stages = {r[1]: (r[5], r[6]) for r in rows if not r[2]}
    # original: 32 -> conv1 /2 -> pool /2 -> 8, 8, 4, 2, 1; changed: 32, 32, 32, 16, 8, 8
    assert stages == {"conv1": ("16x16x64", "32x32x64"), "maxpool": ("8x8x64", "32x32x64"),
                      "layer1": ("8x8x64", "32x32x64"), "layer2": ("4x4x128", "16x16x128"),
                      "layer3": ("2x2x256", "8x8x256"), "layer4": ("1x1x512", "8x8x512")}


def plant(tmp_path, state):
    folder = tmp_path / "torch_home" / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / RESNET18_FILE)


def test_planted_imagenet_weights_are_loaded_through_torchvisions_api(tmp_path):
    state = torchvision.models.resnet18().state_dict()
    state["conv1.weight"].fill_(0.125)
    state["layer3.1.bn2.running_var"].fill_(3.0)
    plant(tmp_path, state)
    teacher = teacher_resnet18(pretrained=True)
    assert torch.all(teacher.conv1.weight == 0.125)
    assert torch.all(teacher.layer3[1].bn2.running_var == 3.0)
    assert teacher.fc.out_features == 10  # the 1000-way ImageNet fc is replaced


def test_missing_imagenet_weights_offline_say_where_to_put_them():
    with pytest.raises(SystemExit) as e:
        teacher_resnet18(pretrained=True)
    one_line_error(e, RESNET18_FILE, os.path.join("hub", "checkpoints"), "PRETRAINED=0")


def test_corrupt_imagenet_weights_are_a_clear_error(tmp_path):
    plant(tmp_path, None)
    (tmp_path / "torch_home" / "hub" / "checkpoints" / RESNET18_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as e:
        teacher_resnet18(pretrained=True)
    one_line_error(e, "cannot read ImageNet weights")


def test_student_layer_shapes_and_parameter_count():
    s = StudentCNN(bn=False).eval()
    x = torch.randn(2, 3, 32, 32)
    pools, size = [], 32
    for k in (5, 3, 3):
        size = size + 2 * 1 - k + 1  # conv, stride 1, pad 1
        size = size - 2 + 1  # 2x2 max-pool, stride 1, pad 0
        pools.append(size)
    assert pools == [29, 28, 27]
    shapes = []
    for layer in s.features:
        x = layer(x)
        if isinstance(layer, nn.MaxPool2d):
            shapes.append(tuple(x.shape))
    assert shapes == [(2, 32, 29, 29), (2, 64, 28, 28), (2, 128, 27, 27)]
    assert s.classifier[0].in_features == 27 * 27 * 128 == 93312
    assert s(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    by_hand = (5 * 5 * 3 * 32 + 32) + (3 * 3 * 32 * 64 + 64) + (3 * 3 * 64 * 128 + 128) + (93312 * 500 + 500) + (500 * 10 + 10)
    assert by_hand == 46_756_294 == sum(p.numel() for p in s.parameters())
    bn = StudentCNN(bn=True, dropout=0.5)
    assert sum(p.numel() for p in bn.parameters()) == by_hand + 2 * (32 + 64 + 128)
    assert bn.classifier[2].p == 0.5


def test_students_stack_their_logits():
    group = Students([StudentCNN(), StudentCNN()]).eval()
    x = torch.randn(3, 3, 32, 32)
    out = group(x)
    assert out.shape == (2, 3, 10) and torch.allclose(out[1], group[1](x))


def test_a_stopped_student_is_not_run_and_its_logits_are_nan():
    calls = []
    small = [nn.Sequential(nn.Flatten(), nn.Linear(12, 10)) for _ in range(3)]
    for k, m in enumerate(small):
        m.register_forward_pre_hook(lambda mod, a, k=k: calls.append(k))
    group = Students(small)
    x = torch.randn(8, 3, 2, 2)
    group.stopped = frozenset({2})  # it diverged: NaN logits, never run
    out = group(x)
    assert calls == [0, 1] and out.shape == (3, 8, 10) and out[2].isnan().all()
    assert torch.equal(out[0], small[0](x).float()) and torch.equal(out[1], small[1](x).float())


def test_continual_net_has_two_heads_and_freezes_batchnorm_of_frozen_layers():
    net = ContinualNet(teacher_resnet18(pretrained=False), 100)
    old, new = net.eval()(torch.randn(2, 3, 32, 32))
    assert old.shape == (2, 10) and new.shape == (2, 100)
    net.requires_grad_(False)
    net.new.requires_grad_(True)
    net.train()
    assert not any(m.training for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    net.adapt_bn = True
    net.backbone.layer4.requires_grad_(True)
    net.train()
    assert {n for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d) and m.training} == {
        n for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d) and n.startswith("backbone.layer4")}
