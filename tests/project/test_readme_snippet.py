"""The README's Python snippet, run as written on a tiny loader: it must train correctly when copied.

It once lacked ``optimizer.zero_grad()``; ``local_step`` adds to ``.grad`` (as ``loss.backward()`` does), so
the copied loop trained on gradients summed over all steps. Here every step's gradient must be that
step's alone.
"""
from __future__ import annotations

import re

import torch

import timm_local
from tests.helpers import ROOT



def readme_training_snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    training = [b for b in blocks if "local_step" in b]
    assert len(training) == 1, "the README has one Python training snippet"
    return training[0]


def test_readme_snippet_steps_on_each_batch_gradient_alone() -> None:
    torch.manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(2)]
    namespace: dict = {"loader": batches}
    torch.manual_seed(1)
    exec(compile(readme_training_snippet(), "README.md", "exec"), namespace)
    lm = namespace["lm"]
    assert namespace["logits"].shape == (4, 10) and namespace["backbone"] is lm.backbone

    # the same two steps by hand, each gradient computed from zero
    torch.manual_seed(1)
    ref = timm_local.create_local_model("resnet32_cifar", method="auglocal", aux_depth=3, tau=0.5, num_classes=10)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for x, y in batches:
        for p in ref.parameters():
            p.grad = None
        ref.local_step(x, y)
        last_grads = [None if p.grad is None else p.grad.clone() for p in ref.parameters()]
        opt.step()
    for (name, p), g in zip(lm.named_parameters(), last_grads):
        assert (p.grad is None) == (g is None), name
        if g is not None:
            torch.testing.assert_close(p.grad, g, msg=name)  # the last step's gradient alone, not a sum
    for (name, p), q in zip(lm.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, msg=name)
