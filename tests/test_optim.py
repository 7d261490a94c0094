"""The learning-rate schedule equals PyTorch's CosineAnnealingWarmRestarts, epoch by epoch."""

import numpy as np
import pytest
from fresh_process import run_in_fresh_process

from clef_jax.optim import cosine_warm_restarts

CASES = [(10, 2), (3, 1), (2, 3)]  # (T_0 epochs, T_mult)
EPOCHS = 160


def torch_epoch_lrs(cases: list[tuple[int, int]], epochs: int
                    ) -> dict[tuple[int, int], list[float]]:
    """PyTorch's learning rate at the start of each epoch, per case. A torch optimiser
    imports torch._dynamo (and so triton), hence a fresh process (see fresh_process.py)."""
    import torch

    out = {}
    for t0, t_mult in cases:
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
        ref = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            opt, T_0=t0, T_mult=t_mult, eta_min=1e-6
        )
        lrs = []
        for _ in range(epochs):
            lrs.append(opt.param_groups[0]["lr"])
            ref.step()
        out[(t0, t_mult)] = lrs
    return out


@pytest.fixture(scope="module")
def torch_lrs() -> dict[tuple[int, int], list[float]]:
    return run_in_fresh_process(torch_epoch_lrs, CASES, EPOCHS)


@pytest.mark.parametrize("t0,t_mult", CASES)
def test_matches_torch_scheduler_stepped_per_epoch(torch_lrs, t0, t_mult):
    steps_per_epoch = 7
    ours = cosine_warm_restarts(
        1e-4, steps_per_epoch=steps_per_epoch, t0_epochs=t0, t_mult=t_mult, eta_min=1e-6
    )
    assert len(torch_lrs[(t0, t_mult)]) == EPOCHS
    for epoch, expected in enumerate(torch_lrs[(t0, t_mult)]):
        got = [float(ours(epoch * steps_per_epoch + k)) for k in (0, steps_per_epoch - 1)]
        np.testing.assert_allclose(got, expected, rtol=2e-5, err_msg=f"epoch {epoch}")


def test_step_interval_moves_within_an_epoch_and_warmup_scales():
    per_step = cosine_warm_restarts(1.0, steps_per_epoch=10, t0_epochs=1, interval="step")
    assert float(per_step(0)) == pytest.approx(1.0)
    assert float(per_step(5)) == pytest.approx(0.5, abs=1e-6)
    warm = cosine_warm_restarts(1.0, steps_per_epoch=10, t0_epochs=5, warmup_steps=4)
    assert float(warm(0)) == pytest.approx(0.25)
    assert float(warm(3)) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(steps_per_epoch=0, t0_epochs=1), "steps_per_epoch"),
        (dict(steps_per_epoch=1, t0_epochs=0), "t0_epochs"),
        (dict(steps_per_epoch=1, t0_epochs=1, t_mult=0.5), "t_mult"),
        (dict(steps_per_epoch=1, t0_epochs=1, interval="hour"), "interval"),
    ],
)
def test_bad_settings_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cosine_warm_restarts(1e-3, **kwargs)
