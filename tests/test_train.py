"""jobs.train, the workers' step loop, in units: the learning-rate schedule, what counts as a fault,
the first-step error crossing process boundaries. The stages trained end to end: test_train_e2e.py."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from jobs import train


# ============================================================================= jobs.train: schedule
@pytest.mark.parametrize(
    ("warmup_ratio", "min_lr_ratio"), [(0.03, 0.0), (0.1, 0.0), (0.1, 0.1), (0.0, 0.0), (0.2, 0.25)]
)
def test_lr_factor_matches_transformers_cosine_with_warmup(warmup_ratio, min_lr_ratio):
    import torch
    from transformers import get_cosine_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

    total = 50
    warmup = math.ceil(warmup_ratio * total)  # as transformers' TrainingArguments.get_warmup_steps
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    if min_lr_ratio:
        sched = get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, min_lr_rate=min_lr_ratio)
    else:
        sched = get_cosine_schedule_with_warmup(opt, warmup, total)
    ours, theirs = [], []
    for step in range(total):
        theirs.append(opt.param_groups[0]["lr"])
        ours.append(train.lr_factor(step, total, warmup_ratio, min_lr_ratio))
        opt.step()
        sched.step()
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)
    rising, falling = ours[: warmup + 1], ours[warmup:]
    assert ours[0] == (0.0 if warmup else 1.0)
    assert all(a < b for a, b in itertools.pairwise(rising)) and rising[-1] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(falling))  # cosine decay
    assert min_lr_ratio <= ours[-1] < min_lr_ratio + 0.01
    assert train.lr_factor(total, total, warmup_ratio, min_lr_ratio) == pytest.approx(min_lr_ratio)


# ============================================================================= jobs.train: failures
def test_faults_are_lost_workers_and_broken_collectives_not_bugs():
    import ray.exceptions
    import torch.distributed as dist

    assert train.is_fault(ray.exceptions.ActorDiedError())
    assert train.is_fault(dist.DistBackendError("gloo: Connection closed by peer"))
    try:  # the step loop re-raises a collective failure as something else: its cause still counts
        try:
            raise dist.DistNetworkError("peer gone")
        except dist.DistNetworkError as err:
            raise RuntimeError("all_reduce failed") from err
    except RuntimeError as wrapped:
        assert train.is_fault(wrapped)
    assert not train.is_fault(TypeError("unexpected keyword argument 'cache'"))
    assert not train.is_fault(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x64 and 32x64)"))


def test_first_step_error_survives_pickling_with_its_traceback():
    import pickle

    err = train.FirstStepError("rank 0: TypeError: boom", "Traceback (most recent call last):\n  ...")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, train.FirstStepError) and str(back) == "rank 0: TypeError: boom"
    assert back.trace.startswith("Traceback")


