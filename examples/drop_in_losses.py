"""The fused LSKD losses inside an ordinary training loop (runnable on CPU or GPU).

A small frozen "teacher" and a "student" network see the same batch; the
student is trained on cross-entropy plus the three LSKD distillation terms on
its intermediate feature maps:

  * pod_distill (Local POD) on an early map,
  * pod_distill with MD masks (md_masks from three teacher passes) on a later map,
  * sop_distill (second-order context pooling, MCD) on the last feature map.

It prints the loss terms per iteration and the time of the distillation
losses (forward + backward) with the fused backend against the reference.

    python examples/drop_in_losses.py [--iters 20] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

import lskd


class TinySegNet(nn.Module):
    """Three conv stages and a 1x1 classifier; returns (logits, [feature maps])."""

    def __init__(self, num_classes: int = 6, width: int = 64) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, 2, 1), nn.BatchNorm2d(2 * width), nn.ReLU())
        self.stage3 = nn.Sequential(nn.Conv2d(2 * width, 4 * width, 3, 1, 1), nn.BatchNorm2d(4 * width))
        self.classifier = nn.Conv2d(4 * width, num_classes, 1)

    def forward(self, x: torch.Tensor):
        f1 = self.stage1(x)
        f2 = self.stage2(f1)
        f3 = self.stage3(f2)
        logits = self.classifier(F.relu(f3))
        return logits, [f1, f2, f3]


def distillation(student_feats, teacher_feats, masks, backend: str) -> dict:
    """The LSKD-style terms, each returned separately (weights applied by the caller)."""
    spatial, channel = masks
    return {
        "pod": lskd.pod_distill(student_feats[0], teacher_feats[0], backend=backend),
        "md": lskd.pod_distill(
            student_feats[1], teacher_feats[1], spatial_mask=spatial[1], channel_mask=channel[1], backend=backend
        ),
        "mcd": lskd.sop_distill(
            student_feats[2], teacher_feats[2], spatial_mask=spatial[2], channel_mask=channel[2], backend=backend
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=20, help="training iterations (default 20)")
    parser.add_argument("--batch", type=int, default=8, help="images per batch (default 8)")
    parser.add_argument("--size", type=int, default=96, help="image side in pixels (default 96)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    old_classes, num_classes = 4, 6

    teacher = TinySegNet(num_classes).to(device).eval()
    student = copy.deepcopy(teacher).train()
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    print(f"lskd {lskd.__version__}: backends on {device}: {lskd.available_backends(device)}")

    timings = {"auto": [], "reference": []}
    for it in range(args.iters):
        images = torch.randn(args.batch, 3, args.size, args.size, device=device)
        labels = torch.randint(0, num_classes, (args.batch, args.size, args.size), device=device)
        with torch.no_grad():
            # Three teacher passes as one batch: the image, background/old erased, new erased.
            erased_bg = images * (labels >= old_classes)[:, None]
            erased_new = images * (labels < old_classes)[:, None]
            _, t_all = teacher(torch.cat([images, erased_bg, erased_new]))
            t_feats = [f[: args.batch] for f in t_all]
            masks = ([None] * 3, [None] * 3)
            for i in (1, 2):
                a, cb, dn = t_all[i].chunk(3)
                masks[0][i], masks[1][i] = lskd.md_masks(a, cb, dn, labels, old_classes)
        logits, s_feats = student(images)
        ce = F.cross_entropy(F.interpolate(logits, size=labels.shape[-2:], mode="bilinear"), labels)

        for backend in ("reference", "auto"):  # time both; train with "auto"
            detached = [f.detach().requires_grad_() for f in s_feats]
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            terms = distillation(detached, t_feats, masks, backend)
            sum(terms.values()).backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            timings[backend].append(time.perf_counter() - t0)

        terms = distillation(s_feats, t_feats, masks, "auto")
        loss = ce + 0.01 * terms["pod"] + 0.01 * terms["md"] + 0.005 * terms["mcd"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if it % 5 == 0 or it == args.iters - 1:
            parts = "  ".join(f"{k} {v.item():.4f}" for k, v in terms.items())
            print(f"iter {it:3d}  ce {ce.item():.4f}  {parts}")

    med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in timings.items()}
    print(
        f"distillation fwd+bwd per iteration (median): reference {med['reference']:.2f} ms, "
        f"fused ({lskd.ops._backends.resolve_backend('pod_distill', 'auto', device)}) {med['auto']:.2f} ms, "
        f"speed-up {med['reference'] / med['auto']:.1f}x"
    )


if __name__ == "__main__":
    main()
