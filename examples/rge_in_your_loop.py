"""LSKD's dynamic weights (RGE, docs/MATHEMATICS.md §4.1) inside a plain training loop.

A frozen teacher and a student with one more class; the nine LSKD terms come from
``lskd.methods.LSKD`` (any dict of named scalar losses works); RGE updates one weight per term
from per-term gradients on the layer each term acts on, and renormalises them every epoch.

    python examples/rge_in_your_loop.py
"""

import torch

from lskd.methods import LSKD, StepContext
from lskd.models import DeepLabV3
from lskd.weighting import RGE


def main() -> None:
    torch.manual_seed(0)
    teacher = DeepLabV3("tiny", [3]).freeze()  # background + 2 old classes
    student = DeepLabV3("tiny", [3])
    student.load_state_dict(teacher.state_dict())
    student.add_step(1)  # one new class
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)

    method = LSKD()
    ctx = StepContext(step=1, old_classes=3, new_classes=1)
    method.labeler.thresholds = torch.full((3,), 0.9)  # PLOP's entropy thresholds (prepare_step on real data)
    rge = RGE(lr=0.05)  # its own SGD on the weights; or put rge.parameters() in your optimiser
    rge.begin_step(method.term_names(ctx), new_classes=ctx.new_classes, old_classes=ctx.old_classes)

    for epoch in range(3):
        for _ in range(4):
            images = torch.randn(4, 3, 48, 48)
            labels = torch.randint(0, 4, (4, 48, 48))
            t_out, bctx = method.teacher_forward(teacher, images, labels, ctx)  # no grad
            terms = method.terms(images, labels, student(images), t_out, bctx)  # name -> scalar
            total = rge.total(terms)  # sum_i w_i * term_i
            rge.update(student, terms)  # per-term gradients, while the graph is alive
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            rge.after_step()
        rge.end_epoch(epoch)  # w <- T w / sum(w)
        weights = ", ".join(f"{k} {v:.3f}" for k, v in rge.weights().items())
        print(f"epoch {epoch}: total {float(total.detach()):.4f} | weights {weights}")


if __name__ == "__main__":
    main()
