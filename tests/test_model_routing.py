"""Modality routing: each expert sees only its own tokens, and gradients follow the routing."""

import torch

from breen.config import IMAGE_TOKEN_ID, QUERY_TOKEN_ID
from breen.model import BreenForCausalLM, ExpertRouting, ModalityExperts
from tests._tiny_models import forward_with_hidden, tiny_batch, tiny_config


def _grad_norm(module):
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_each_expert_computes_only_on_its_tokens():
    torch.manual_seed(0)
    experts = ModalityExperts(tiny_config())
    seen = {}
    experts.text_expert.register_forward_hook(lambda m, i, o: seen.__setitem__("text", i[0].shape[0]))
    experts.image_expert.register_forward_hook(lambda m, i, o: seen.__setitem__("image", i[0].shape[0]))
    x = torch.randn(2, 7, 64)
    image_mask = torch.zeros(2, 7, dtype=torch.bool)
    image_mask[0, :3] = True
    image_mask[1, 2:4] = True
    out = experts(x, ExpertRouting.from_mask(image_mask))
    assert seen == {"text": 14 - 5, "image": 5}
    # per-token formula
    gate = experts.image_expert_gate
    want = torch.sigmoid(gate(x[0, 0])) * experts.image_expert(x[0, 0])
    assert torch.allclose(out[0, 0], want, atol=1e-6)
    want = torch.sigmoid(experts.text_expert_gate(x[1, 0])) * experts.text_expert(x[1, 0])
    assert torch.allclose(out[1, 0], want, atol=1e-6)


def test_block_gradients_follow_routing():
    torch.manual_seed(0)
    experts = ModalityExperts(tiny_config())
    x = torch.randn(2, 7, 64)
    image_mask = torch.rand(2, 7) < 0.5
    routing = ExpertRouting.from_mask(image_mask)
    experts(x, routing)[~image_mask].pow(2).sum().backward()  # loss on text tokens only
    assert _grad_norm(experts.image_expert) == 0 and _grad_norm(experts.image_expert_gate) == 0
    assert _grad_norm(experts.text_expert) > 0
    experts.zero_grad()
    experts(x, routing)[image_mask].pow(2).sum().backward()  # loss on image/query tokens only
    assert _grad_norm(experts.text_expert) == 0 and _grad_norm(experts.text_expert_gate) == 0
    assert _grad_norm(experts.image_expert) > 0


def test_model_text_loss_never_reaches_image_experts_on_text_only_batch():
    torch.manual_seed(0)
    model = BreenForCausalLM(tiny_config())
    batch = tiny_batch()
    text_only = {k: batch[k][2:] for k in ("input_ids", "attention_mask", "labels")}
    model(**text_only).loss.backward()
    for layer in model.model.layers:
        assert _grad_norm(layer.mlp.image_expert) == 0 and _grad_norm(layer.mlp.image_expert_gate) == 0
        assert _grad_norm(layer.mlp.text_expert) > 0


def test_model_image_and_query_states_never_reach_text_experts():
    # plain layout [image][queries][caption]: image/query positions only attend to image/query positions
    torch.manual_seed(0)
    model = BreenForCausalLM(tiny_config())
    batch = tiny_batch()
    row = {k: batch[k][:1] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid")}
    _, hidden = forward_with_hidden(model, **row, use_cache=False)
    visual = (row["input_ids"] == IMAGE_TOKEN_ID) | (row["input_ids"] == QUERY_TOKEN_ID)
    hidden[visual].pow(2).sum().backward()
    for layer in model.model.layers:
        assert _grad_norm(layer.mlp.text_expert) == 0 and _grad_norm(layer.mlp.text_expert_gate) == 0
        assert _grad_norm(layer.mlp.image_expert) > 0
    assert _grad_norm(model.patch_embed) > 0 and model.queries.grad.abs().sum() > 0


def test_full_batch_backward_touches_every_trainable_parameter():
    # both experts and the patch embedding always run (ZeRO-3 needs the same modules on every rank)
    torch.manual_seed(0)
    model = BreenForCausalLM(tiny_config())
    batch = tiny_batch()
    text_only = {k: batch[k][2:] for k in ("input_ids", "attention_mask", "labels")}
    model(**text_only).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n != "queries" and "align" not in n)
