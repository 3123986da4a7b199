"""Alignment loss: zero at the target, a hand-computed value, the position shift, and the loss total."""

import math

import pytest
import torch

from breen.config import QUERY_TOKEN_ID
from breen.model import BreenForCausalLM, cosine_alignment_loss
from tests._tiny_models import forward_with_hidden, tiny_batch, tiny_config


def test_cosine_loss_hand_computed():
    pred = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # [1, 2, 2]
    target = torch.tensor([[[3.0, 0.0], [1.0, 1.0]]])
    # cosines: 1 and 1/sqrt(2)
    assert cosine_alignment_loss(pred, target).item() == pytest.approx(
        1 - (1 + 1 / math.sqrt(2)) / 2, abs=1e-6
    )
    assert cosine_alignment_loss(target, target).item() == pytest.approx(0.0, abs=1e-6)


def _batch_and_model(**overrides):
    torch.manual_seed(0)
    model = BreenForCausalLM(tiny_config(**overrides))
    return tiny_batch(model.config), model


@pytest.mark.parametrize("shift", [0, 1])
def test_loss_is_zero_when_hidden_states_equal_projected_targets(shift):
    batch, model = _batch_and_model(align_position_shift=shift)
    ids = batch["input_ids"]
    hidden = torch.randn(*ids.shape, model.config.hidden_size)
    with torch.no_grad():
        targets = model.align_head(torch.cat([batch["fine"], batch["coarse"]], dim=1))  # [B, 100, H]
    for row in range(2):  # rows 0 and 1 carry a query block and targets
        pos = torch.nonzero(ids[row] == QUERY_TOKEN_ID).view(-1) - shift
        hidden[row, pos] = targets[row]
    fine, coarse = model.alignment_losses(hidden, ids, batch["fine"], batch["coarse"], batch["align_mask"])
    assert fine.item() == pytest.approx(0.0, abs=1e-5) and coarse.item() == pytest.approx(0.0, abs=1e-5)
    # the other shift setting pairs the wrong positions
    model.config.align_position_shift = 1 - shift
    fine, _ = model.alignment_losses(hidden, ids, batch["fine"], batch["coarse"], batch["align_mask"])
    assert fine.item() > 0.1


def test_loss_matches_hand_computation_on_model_states():
    batch, model = _batch_and_model()
    out, h = forward_with_hidden(model, **batch)
    h = h.detach()
    rows = []
    for row in range(2):
        pos = torch.nonzero(batch["input_ids"][row] == QUERY_TOKEN_ID).view(-1) - 1  # released shift
        targets = model.align_head(torch.cat([batch["fine"][row], batch["coarse"][row]])).detach()
        rows.append(torch.nn.functional.cosine_similarity(h[row, pos], targets, dim=-1))  # [100]
    cos = torch.stack(rows)  # [2, 100]
    assert out.align_loss_fine.item() == pytest.approx(1 - cos[:, :64].mean().item(), abs=1e-5)
    assert out.align_loss_coarse.item() == pytest.approx(1 - cos[:, 64:].mean().item(), abs=1e-5)
    total = out.lm_loss + model.config.align_loss_weight * (out.align_loss_fine + out.align_loss_coarse)
    assert out.loss.item() == pytest.approx(total.item(), rel=1e-6)


def test_rows_without_targets_are_skipped_and_weight_applies():
    batch, model = _batch_and_model(align_loss_weight=0.5)
    full = model(**batch)
    only_first = dict(batch, align_mask=torch.tensor([True, False, False]))
    part = model(**only_first)
    assert part.align_loss_fine.item() != pytest.approx(full.align_loss_fine.item())
    assert part.loss.item() == pytest.approx(
        (part.lm_loss + 0.5 * (part.align_loss_fine + part.align_loss_coarse)).item(), rel=1e-6
    )
    none = model(**dict(batch, align_mask=torch.zeros(3, dtype=torch.bool)))
    assert none.align_loss_fine.item() == 0.0 and none.loss.item() == pytest.approx(none.lm_loss.item())
    with pytest.raises(ValueError, match="without a query block"):
        model(**dict(batch, align_mask=torch.ones(3, dtype=torch.bool)))


def test_no_targets_means_lm_loss_only():
    batch, model = _batch_and_model()
    out = model(**{k: v for k, v in batch.items() if k not in ("fine", "coarse", "align_mask")})
    assert out.align_loss_fine is None and out.loss.item() == pytest.approx(out.lm_loss.item())
    assert out.logits is None  # labels given: the LM head ran on supervised positions only
