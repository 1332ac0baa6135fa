"""DeepLabV3 / ResNet: shapes of the six maps, pre-ReLU maps, MiB init, pretrained loading."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lskd.models import DeepLabV3, DistBatchNorm2d, ResNet, build_resnet, convert_sync_batchnorm, load_pretrained


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _expected_sizes(size: int, os_: int):
    # stem conv s2 then maxpool s2: ceil twice; each strided stage halves (ceil)
    s4 = _ceil_div(_ceil_div(size, 2), 2)
    s8 = _ceil_div(s4, 2)
    s16 = _ceil_div(s8, 2) if os_ == 16 else s8
    return [s4, s8, s16, s16, s16, s16]


@pytest.mark.parametrize("backbone,channels", [("tiny", [16, 32, 64, 128]), ("resnet18", [64, 128, 256, 512])])
@pytest.mark.parametrize("os_", [16, 8])
def test_six_maps_shapes(backbone, channels, os_):
    model = DeepLabV3(backbone, [4, 2], output_stride=os_)
    aspp = 64 if backbone == "tiny" else 256
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    sizes = _expected_sizes(64, os_)
    want_c = channels + [aspp, 6]
    assert len(out.maps) == 6
    for m, c, s in zip(out.maps, want_c, sizes):
        assert tuple(m.shape) == (2, c, s, s)
    assert out.maps[5] is out.logits
    assert tuple(out.logits.shape) == (2, 6, 64 // os_, 64 // os_)


def test_odd_input_size():
    out = DeepLabV3("tiny", [3]).eval()(torch.randn(1, 3, 33, 33))
    assert [m.shape[-1] for m in out.maps] == _expected_sizes(33, 16)


@pytest.mark.parametrize("backbone", ["resnet50", "resnet101"])
def test_big_backbones_construct(backbone):
    model = DeepLabV3(backbone, [16])
    assert model.backbone.channels == [256, 512, 1024, 2048]
    assert len(model.backbone.layer3) == (6 if backbone == "resnet50" else 23)
    assert model.aspp_channels == 256
    rates = [b[0].dilation[0] for b in model.aspp.branches[1:]]
    assert rates == [6, 12, 18]
    if backbone == "resnet101":
        with torch.no_grad():
            out = model.eval()(torch.randn(1, 3, 33, 33))
        assert [tuple(m.shape[1:2]) for m in out.maps] == [(256,), (512,), (1024,), (2048,), (256,), (16,)]
        assert out.logits.shape[-1] == 3


def test_aspp_rates_and_dilation_os8():
    model = DeepLabV3("resnet18", [3], output_stride=8)
    assert [b[0].dilation[0] for b in model.aspp.branches[1:]] == [12, 24, 36]
    bb = model.backbone
    assert bb.layer3[0].conv1.stride == (1, 1) and bb.layer3[0].conv1.dilation == (1, 1)
    assert bb.layer3[1].conv1.dilation == (2, 2)
    assert bb.layer4[0].conv1.dilation == (2, 2)  # first block of a stage: previous dilation
    assert bb.layer4[1].conv1.dilation == (4, 4)
    os16 = build_resnet("resnet18", 16)
    assert os16.layer3[0].conv1.stride == (2, 2) and os16.layer4[1].conv1.dilation == (2, 2)


def test_stage_maps_are_pre_relu():
    model = DeepLabV3("tiny", [3])
    out = model(torch.randn(2, 3, 64, 64))
    for m in out.maps[:4]:
        assert m.min() < 0  # taken before the final ReLU
    assert out.maps[4].min() >= 0  # ASPP output after its ReLU
    # the pre-ReLU maps are intact (the next stage sees relu of them, computed out of place)
    maps, feat = model.backbone(torch.randn(2, 3, 64, 64))
    assert torch.equal(feat, torch.relu(maps[3]))


def test_add_step_mib_balanced_init():
    torch.manual_seed(0)
    model = DeepLabV3("tiny", [4]).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        before = torch.softmax(model(x).logits, dim=1)
        b_bg = model.classifiers[0].bias[0].item()
        n_new = 3
        new = model.add_step(n_new)
        after = torch.softmax(model(x).logits, dim=1)
    assert model.classes_per_step == [4, 3] and model.num_classes == 7
    assert math.isclose(new.bias[0].item(), b_bg - math.log(n_new + 1), rel_tol=1e-6)
    assert math.isclose(model.classifiers[0].bias[0].item(), b_bg - math.log(n_new + 1), rel_tol=1e-6)
    assert torch.equal(new.weight, model.classifiers[0].weight[0:1].expand_as(new.weight))
    # old classes unchanged, background split evenly between bg and the n_new new classes
    torch.testing.assert_close(after[:, 1:4], before[:, 1:4], atol=1e-6, rtol=1e-5)
    for c in [0, 4, 5, 6]:
        torch.testing.assert_close(after[:, c], before[:, 0] / (n_new + 1), atol=1e-6, rtol=1e-5)
    assert new.weight.requires_grad


def test_add_step_unbalanced_and_errors():
    model = DeepLabV3("tiny", [3])
    b = model.classifiers[0].bias[0].item()
    model.add_step(2, balanced=False)
    assert model.classifiers[0].bias[0].item() == b
    with pytest.raises(ValueError):
        model.add_step(0)
    with pytest.raises(ValueError, match="backbone"):
        DeepLabV3("resnet34", [3])
    with pytest.raises(ValueError, match="output_stride"):
        DeepLabV3("tiny", [3], output_stride=4)


def test_freeze_keeps_eval_and_no_grad():
    model = DeepLabV3("tiny", [3]).freeze()
    model.train()
    assert not model.training and not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    new = model.add_step(1)
    assert not new.weight.requires_grad and not new.bias.requires_grad


def test_convert_sync_batchnorm_on_the_cpu():
    """CPU models get DistBatchNorm2d, in place, with the same parameter tensors and state-dict
    keys; without a process group (or in eval) it is plain BatchNorm."""
    torch.manual_seed(0)
    model = DeepLabV3("tiny", [3])
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    ref = model(x).logits
    same = convert_sync_batchnorm(model)
    assert same is model
    kinds = {type(m) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert kinds == {DistBatchNorm2d}
    assert all(p is params[n] for n, p in model.named_parameters()) and list(model.state_dict()) == keys
    torch.testing.assert_close(model(x).logits, ref, rtol=0, atol=0)  # training mode, no process group


def _dist_bn_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = convert_sync_batchnorm(DeepLabV3("tiny", [3, 2]))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 32, 32, generator=g)
    target = torch.randn(6, 5, 2, 2, generator=g)  # logits at output stride 16
    part = slice(rank * 3, (rank + 1) * 3)  # this rank's half of the global batch
    out = model(x[part]).logits
    loss = ((out - target[part]) ** 2).mean()  # each rank's mean; DDP averages the gradients
    loss.backward()
    grads = []
    for p in model.parameters():
        g_ = p.grad if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g_)
        grads.append(g_ / world)
    torch.save({"out": out.detach(), "grads": grads, "state": model.state_dict()}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_dist_batchnorm_two_ranks_match_one_process(tmp_path):
    """2 gloo ranks on the CPU, each with half the global batch, DistBatchNorm2d: the outputs, the
    averaged gradients and the running statistics equal one process with the whole batch and
    plain BatchNorm, up to floating-point order (what DDP + SyncBatchNorm promise on GPUs)."""
    import torch.multiprocessing as mp

    mp.spawn(_dist_bn_worker, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    model = DeepLabV3("tiny", [3, 2])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 32, 32, generator=g)
    target = torch.randn(6, 5, 2, 2, generator=g)  # logits at output stride 16
    out = model(x).logits
    ((out - target) ** 2).mean().backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), out.detach(), rtol=1e-4, atol=1e-5)
    for r in ranks:
        for (name, p), gr in zip(model.named_parameters(), r["grads"]):
            torch.testing.assert_close(gr, p.grad, rtol=1e-3, atol=1e-6, msg=lambda m: f"{name}: {m}")
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                torch.testing.assert_close(r["state"][k], v, rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")
            else:
                assert torch.equal(r["state"][k], v), k


# -- pretrained weights ------------------------------------------------------------------------

TORCHVISION_KEYS_R18 = [
    "conv1.weight",
    "bn1.weight",
    "bn1.bias",
    "bn1.running_mean",
    "bn1.running_var",
    "layer1.0.conv1.weight",
    "layer1.1.bn2.running_var",
    "layer2.0.downsample.0.weight",
    "layer2.0.downsample.1.weight",
    "layer4.1.conv2.weight",
]
TORCHVISION_KEYS_R50 = [
    "layer1.0.conv3.weight",
    "layer1.0.bn3.bias",
    "layer1.0.downsample.0.weight",
    "layer4.2.bn3.running_mean",
]


def _torchvision_like_state(backbone: ResNet, with_tracking: bool) -> dict:
    """A state dict in torchvision's format: our keys (== torchvision's) plus fc.*."""
    state = {k: torch.randn_like(v) if v.is_floating_point() else v.clone() for k, v in backbone.state_dict().items()}
    if not with_tracking:
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"] = torch.randn(1000, backbone.channels[3])
    state["fc.bias"] = torch.randn(1000)
    return state


def test_torchvision_key_names():
    keys18 = set(build_resnet("resnet18").state_dict())
    keys50 = set(build_resnet("resnet50").state_dict())
    assert set(TORCHVISION_KEYS_R18) <= keys18
    assert set(TORCHVISION_KEYS_R50) <= keys50
    assert not any(k.startswith("fc.") for k in keys18)


@pytest.mark.parametrize("with_tracking", [True, False])
def test_load_pretrained_roundtrip(tmp_path, with_tracking):
    src = build_resnet("resnet18")
    state = _torchvision_like_state(src, with_tracking)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    model = DeepLabV3("resnet18", [3], pretrained=str(path))
    own = model.backbone.state_dict()
    for k, v in state.items():
        if not k.startswith("fc."):
            assert torch.equal(own[k], v), k
    # also directly on a backbone, and with a DataParallel-style prefix
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, tmp_path / "wrapped.pth")
    other = load_pretrained(build_resnet("resnet18"), tmp_path / "wrapped.pth")
    assert torch.equal(other.conv1.weight, state["conv1.weight"])


def test_load_pretrained_mismatch_errors(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(_torchvision_like_state(build_resnet("resnet18"), True), path)
    with pytest.raises(ValueError) as err:
        load_pretrained(DeepLabV3("resnet50", [3]), path)  # ResNet-18 file, ResNet-50 model
    msg = str(err.value)
    assert "r18.pth" in msg and "missing keys" in msg and "layer1.0.conv3.weight" in msg
    path50 = tmp_path / "r50.pth"
    torch.save(_torchvision_like_state(build_resnet("resnet50"), True), path50)
    with pytest.raises(ValueError) as err:
        load_pretrained(build_resnet("resnet18"), path50)
    assert "unexpected keys" in str(err.value) and "layer1.0.bn3.bias" in str(err.value)
    with pytest.raises(ValueError, match="shape mismatches"):
        load_pretrained(DeepLabV3("tiny", [3]), path)
    with pytest.raises(FileNotFoundError):
        load_pretrained(DeepLabV3("tiny", [3]), tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        load_pretrained(DeepLabV3("tiny", [3]), bad)
