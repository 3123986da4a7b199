"""Sequence packing: a packed row gives the losses, gradients and hidden states of the padded batch, and
attention never crosses sample boundaries (per-sample SDPA, and the flash varlen kwargs path)."""

import itertools

import numpy as np
import pytest
import torch
from transformers import AttentionInterface

from breen.data import collate, pack
from breen.model import BreenForCausalLM
from tests._tiny_models import forward_with_hidden, tiny_config, tiny_samples


def _samples(seed: int = 0) -> list[dict]:
    # six samples of different lengths and kinds: caption+image+targets, chat+image+targets, text-only
    return tiny_samples(seed=seed) + tiny_samples(seed=seed + 10)[::-1]


def _model(attn: str = "sdpa") -> BreenForCausalLM:
    torch.manual_seed(0)
    config = tiny_config()
    config._attn_implementation = attn
    return BreenForCausalLM(config).float()


def _loss_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("pad_to", [None, 8])
def test_packed_losses_and_gradients_equal_unpacked(pad_to):
    model, samples = _model(), _samples()
    padded = collate(samples, model.config.pad_token_id)
    packed = pack(samples, model.config.pad_token_id, pad_to_multiple_of=pad_to)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    lengths = [len(s["input_ids"]) for s in samples]
    assert packed["cu_seqlens"].tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist()
    ref, ref_grads = _loss_and_grads(model, padded)
    got, got_grads = _loss_and_grads(model, packed)
    for name in ("loss", "lm_loss", "align_loss_fine", "align_loss_coarse"):
        assert getattr(got, name).item() == pytest.approx(getattr(ref, name).item(), abs=1e-5), name
    assert ref.align_loss_fine.item() > 0.01 and ref.lm_loss.item() > 0.1  # both parts really computed
    assert ref_grads.keys() == got_grads.keys()
    for n, g in ref_grads.items():
        torch.testing.assert_close(got_grads[n], g, atol=1e-5, rtol=1e-4, msg=n)


def test_packed_hidden_states_equal_per_sample_and_do_not_see_neighbours():
    model, samples = _model(), _samples()
    packed = pack(samples, model.config.pad_token_id, pad_to_multiple_of=16)
    cu = packed["cu_seqlens"].tolist()
    with torch.no_grad():
        h = forward_with_hidden(model, **packed)[1][0]
        for i, s in enumerate(samples):  # each sample alone: same states (positions restart, no leakage)
            alone = forward_with_hidden(model, **collate([s], model.config.pad_token_id))[1][0]
            torch.testing.assert_close(h[cu[i] : cu[i + 1]], alone, atol=1e-5, rtol=1e-4)
        # change every token of sample 0: nothing after it moves
        changed = {k: v.clone() for k, v in packed.items()}
        text = changed["input_ids"][0, : cu[1]] >= 0
        changed["input_ids"][0, : cu[1]][text] = (changed["input_ids"][0, : cu[1]][text] + 7) % 300
        changed["pixel_values"][0] = 255 - changed["pixel_values"][0]
        h2 = forward_with_hidden(model, **changed)[1][0]
    assert not torch.allclose(h2[: cu[1]], h[: cu[1]])
    torch.testing.assert_close(h2[cu[1] :], h[cu[1] :], atol=0, rtol=0)


def test_sample_start_is_not_predicted_from_the_previous_sample():
    model, samples = _model(), _samples()[:2]
    packed = pack(samples, model.config.pad_token_id)
    start = int(packed["cu_seqlens"][1])
    with torch.no_grad():
        base = model(**packed).lm_loss
        relabelled = {**packed, "labels": packed["labels"].clone()}
        relabelled["labels"][0, start] = 5  # would be predicted from sample 0's last token if it leaked
        assert model(**relabelled).lm_loss.item() == pytest.approx(base.item(), abs=0)


def _reference_varlen(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A CPU stand-in for flash-attention's varlen kernel: reads transformers' cu_seq_lens_* kwargs."""
    assert attention_mask is None, "the varlen path must not build a mask"
    cu = kwargs["cu_seq_lens_q"].tolist()
    assert kwargs["cu_seq_lens_k"].tolist() == cu and kwargs["max_length_q"] == max(np.diff(cu))
    rep = module.num_key_value_groups
    key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    parts = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling
        )
        for a, b in itertools.pairwise(cu)
    ]
    return torch.cat(parts, dim=2).transpose(1, 2), None


def test_flash_varlen_kwargs_path_gives_the_same_losses():
    AttentionInterface.register("flash_attention_cpu_reference", _reference_varlen)
    model, samples = _model(), _samples()
    with torch.no_grad():
        ref = model(**collate(samples, model.config.pad_token_id))
        model.config._attn_implementation = "flash_attention_cpu_reference"  # a "flash_attention*" name
        got = model(**pack(samples, model.config.pad_token_id, pad_to_multiple_of=8))
    assert got.loss.item() == pytest.approx(ref.loss.item(), abs=1e-5)
    assert got.align_loss_fine.item() == pytest.approx(ref.align_loss_fine.item(), abs=1e-5)


def test_packed_batch_errors_name_the_problem():
    model, samples = _model(), _samples()[:2]
    packed = pack(samples, model.config.pad_token_id)
    two_rows = {
        **packed,
        "input_ids": packed["input_ids"].repeat(2, 1),
        "labels": packed["labels"].repeat(2, 1),
    }
    with pytest.raises(ValueError, match="one row"):
        model(**two_rows)
    with pytest.raises(ValueError, match="attention_mask"):
        model(**packed, attention_mask=torch.ones_like(packed["input_ids"]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(**{**packed, "cu_seqlens": torch.tensor([0, 5, 3], dtype=torch.int32)})
    with pytest.raises(ValueError, match="query sentinels"):  # a boundary cutting a query block
        cu = packed["cu_seqlens"].clone()
        first_query = int(torch.nonzero(packed["input_ids"][0] < -250)[0])
        cu[1] = first_query + 10
        model(**{**packed, "cu_seqlens": cu})


def test_unknown_keywords_raise_instead_of_being_dropped():
    # a misspelt cu_seqlens used to vanish into **kwargs and run the packed row as one sample
    model, samples = _model(), _samples()[:2]
    packed = pack(samples, model.config.pad_token_id)
    misspelt = {k: v for k, v in packed.items() if k != "cu_seqlens"} | {"cu_seqlen": packed["cu_seqlens"]}
    with pytest.raises(TypeError, match="'cu_seqlen'"):
        model(**misspelt)
    for removed in ("num_items_in_batch", "inputs_embeds", "return_logits", "output_attentions"):
        with pytest.raises(TypeError, match=f"'{removed}'"):
            model(**packed, **{removed: 1})
    with pytest.raises(ValueError, match="return_dict"):
        model(**packed, return_dict=False)
    with torch.no_grad():  # the correctly spelt key still gives the padded batch's losses
        ref = model(**collate(samples, model.config.pad_token_id))
        got = model(**packed)
    for name in ("lm_loss", "align_loss_fine", "align_loss_coarse"):
        assert getattr(got, name).item() == pytest.approx(getattr(ref, name).item(), abs=1e-5), name


def test_pack_wastes_only_the_alignment_tail():
    samples = _samples()
    total = sum(len(s["input_ids"]) for s in samples)
    packed = pack(samples, pad_token_id=0, pad_to_multiple_of=64, return_tensors="np")
    padded = collate(samples, pad_token_id=0, return_tensors="np")
    assert packed["input_ids"].shape[1] - total < 64
    assert padded["input_ids"].size - total > packed["input_ids"].shape[1] - total  # padding did waste more
