"""The training step (pipeline.train.step): accumulation, non-finite losses and gradients, GradScaler."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from _train_helpers import make_prepared, tiny_cfg
from pipeline import cache, distributed, train
from pipeline.errors import PipelineError
from pipeline.graph import Graph
from pipeline.losses import BceDiceLoss
from pipeline.precision import autocast_factory
from pipeline.train import build
from pipeline.train.plan import Inputs
from pipeline.train.step import NonFiniteGuard, Stepper, train_epoch


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("prep") / "p1")


# ---------------------------------------------------------------------------- accumulation

class TinyNet(nn.Module):
    """BatchNorm-free segmentation net: a sample's output does not depend on its batch."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                  nn.GELU(), nn.Conv2d(8, 1, 1))

    def forward(self, x):
        return self.body(x)


class GradSpy(torch.optim.SGD):
    """SGD that records the gradients it is asked to step with."""

    def __init__(self, params, lr: float = 0.0):
        super().__init__(params, lr=lr)
        self.seen = []

    def step(self, closure=None):
        self.seen.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


def _batches(n_images: int, size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(0, 256, (n_images, 16, 24, 3), generator=g, dtype=torch.uint8)
    mask = (torch.rand(n_images, 16, 24, generator=g) > 0.6).to(torch.uint8)
    return [(img[i:i + size], mask[i:i + size], torch.arange(i, min(i + size, n_images)))
            for i in range(0, n_images, size)]


def _epoch(model, batches, loss_fn, opt, sched=None, scaler=None, *, precision="fp32", accum=1, grad_clip=0.0,
           max_nonfinite=10):
    """One step.train_epoch on the CPU, batches at their own size."""
    cpu = torch.device("cpu")
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    s = Stepper(model, opt, sched, scaler, NonFiniteGuard(max_nonfinite, distributed.Dist()),
                autocast_factory(cpu, precision), cpu, accum_steps=accum, grad_clip=grad_clip)
    return train_epoch(s, batches, loss_fn, Inputs(cpu))


def _grads(batches, accum: int, seed: int = 0, loss_fn=None, max_nonfinite: int = 10):
    torch.manual_seed(seed)
    model = TinyNet().to(memory_format=torch.channels_last)
    opt = GradSpy(model.parameters())
    res = _epoch(model, batches, loss_fn or BceDiceLoss(1.0, 1.0), opt, accum=accum, max_nonfinite=max_nonfinite)
    return opt.seen, res


def test_accumulation_matches_one_big_batch():
    """4 micro-batches of 2 with accum_steps=4 give the gradients of one batch of 8."""
    small, res = _grads(_batches(8, 2), accum=4)
    big, _ = _grads(_batches(8, 8), accum=1)
    assert len(small) == len(big) == 1 and res.updates == 1
    for a, b in zip(small[0], big[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in big[0])


def test_partial_last_group_steps_with_its_own_size():
    """5 micro-batches with accum_steps=4: 2 updates; the second is the 5th batch alone, unscaled."""
    batches = _batches(10, 2)
    seen, res = _grads(batches, accum=4)
    assert len(seen) == 2 and res.updates == 2 and res.images == 10
    alone, _ = _grads(batches[4:], accum=1)
    # lr=0, so the model is unchanged between steps: the last group's gradient is batch 5's own.
    for a, b in zip(seen[1], alone[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    first, _ = _grads(_batches(10, 8)[:1], accum=1)   # the same first 8 images as one batch
    for a, b in zip(seen[0], first[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- non-finite losses

class NanAt(BceDiceLoss):
    """BCE + Dice that returns NaN on the chosen calls (0-based)."""

    def __init__(self, bad):
        super().__init__()
        self.bad, self.calls = set(bad), 0

    def forward(self, logits, target):
        loss = super().forward(logits, target)
        i, self.calls = self.calls, self.calls + 1
        return loss * float("nan") if (i in self.bad or -1 in self.bad) else loss


def test_nonfinite_loss_skips_its_group_and_is_counted():
    batches = _batches(12, 2)          # 6 micro-batches, accum 2 -> 3 groups
    seen, res = _grads(batches, accum=2, loss_fn=NanAt({2}))
    # Group 2 (batches 2, 3) is dropped whole: batch 3 is not even computed.
    assert res.nonfinite == 1 and res.updates == 2 and len(seen) == 2
    assert all(torch.isfinite(g).all() for step in seen for g in step)
    assert math.isfinite(res.loss)


def test_persistent_nonfinite_loss_stops_with_a_clear_error():
    with pytest.raises(PipelineError, match="non-finite for 3 batches in a row"):
        _grads(_batches(12, 2), accum=1, loss_fn=NanAt({-1}), max_nonfinite=3)


def test_persistent_nonfinite_stops_the_fold(prepared, tmp_path, monkeypatch):
    monkeypatch.setattr(build, "BceDiceLoss", lambda *a: NanAt({-1}))
    cfg = tiny_cfg(tmp_path, **{"train.max_nonfinite": 2})
    with pytest.raises(PipelineError, match="fold 0 epoch 1: loss was non-finite for 2 batches"):
        train.run(cfg, Graph(cfg, prepared=prepared))
    assert not cache.is_complete(Graph(cfg, prepared=prepared).fold_dir(0))


class NanGrad(torch.autograd.Function):
    """Identity forward; NaN gradient backward: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


class NanGradNet(TinyNet):
    """TinyNet whose chosen forward calls (0-based; -1 = all) give NaN gradients."""

    def __init__(self, bad):
        super().__init__()
        self.bad, self.calls = set(bad), 0

    def forward(self, x):
        y = self.body(x)
        i, self.calls = self.calls, self.calls + 1
        return NanGrad.apply(y) if (i in self.bad or -1 in self.bad) else y


def _nan_grad_epoch(bad, *, accum=1, grad_clip=0.0, precision="bf16", loss_fn=None, max_nonfinite=10,
                    n_images=8, scheduler=False):
    torch.manual_seed(0)
    model = NanGradNet(bad)
    opt = GradSpy(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1)) if scheduler else None
    fp16 = precision == "fp16"
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, enabled=fp16)
    res = _epoch(model, _batches(n_images, 2), loss_fn or BceDiceLoss(), opt, sched, scaler, precision=precision,
                 accum=accum, grad_clip=grad_clip, max_nonfinite=max_nonfinite)
    return model, opt, res, scaler


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_nonfinite_gradient_with_finite_loss_skips_its_step(precision, grad_clip):
    """No GradScaler (bf16/fp32): NaN gradients from a finite loss must not reach the weights."""
    model, opt, res, _ = _nan_grad_epoch({1}, grad_clip=grad_clip, precision=precision)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert res.nonfinite == 1 and res.updates == 3 and len(opt.seen) == 3
    assert all(torch.isfinite(g).all() for step in opt.seen for g in step)
    assert math.isfinite(res.loss)          # the loss itself was finite and is averaged in


def test_persistent_nonfinite_gradients_stop_with_a_clear_error():
    with pytest.raises(PipelineError, match=r"gradients were non-finite \(with a finite loss\) for 3 batches in a row"):
        _nan_grad_epoch({-1}, max_nonfinite=3)


def test_nonfinite_losses_and_gradients_count_together_until_an_update():
    """Calls 0, 2: NaN loss; 1, 3: NaN gradients; no update between them -> 4 in a row."""
    with pytest.raises(PipelineError, match="gradients were non-finite .* for 4 batches in a row"):
        _nan_grad_epoch({1, 3}, loss_fn=NanAt({0, 2}), max_nonfinite=4, n_images=12)
    model, opt, res, _ = _nan_grad_epoch({1, 3}, loss_fn=NanAt({0, 2}), max_nonfinite=5, n_images=12)
    assert res.nonfinite == 4 and res.updates == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fp16_scaler_skips_nonfinite_gradients_and_they_are_not_updates():
    """fp16 + GradScaler: the scaler skips the NaN step itself (not counted as non-finite), but the
    epoch reports only applied updates and the lr of the last applied one."""
    for clip in (0.0, 1.0):
        model, opt, res, scaler = _nan_grad_epoch({3}, grad_clip=clip, precision="fp16", scheduler=True)
        assert res.updates == 3 and len(opt.seen) == 3 and res.nonfinite == 0
        assert scaler.get_scale() == 2.0 ** 11                        # the scaler backed off once
        assert res.lr == pytest.approx(0.1 / 3)                    # update 3's rate, not the skipped 4th's
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fp16_grad_scaler_unscales_before_clipping():
    """fp16 autocast + an enabled GradScaler (the CUDA path, here on CPU): the optimizer sees true
    gradients, clipped to grad_clip after unscaling (clipping scaled ones would leave ~clip/scale)."""
    batches = _batches(4, 4)
    ref, _ = _grads(batches, accum=1)
    torch.manual_seed(0)
    model = TinyNet()
    opt = GradSpy(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    _epoch(model, batches, BceDiceLoss(), opt, None, scaler, precision="fp16", grad_clip=0.0)
    for a, b in zip(opt.seen[0], ref[0]):
        torch.testing.assert_close(a, b, rtol=0.05, atol=2e-3)
    ref_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in ref[0]]))
    clip = float(ref_norm) / 4
    opt.seen.clear()
    _epoch(model, batches, BceDiceLoss(), opt, None, scaler, precision="fp16", grad_clip=clip)
    got = torch.linalg.vector_norm(torch.stack([g.norm() for g in opt.seen[0]]))
    assert float(got) == pytest.approx(clip, rel=0.02)
