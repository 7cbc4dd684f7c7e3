"""The layer-wise backward (one decoder layer at a time) equals an ordinary model backward
(the gradients at each layer's output: tests/test_sensitivity.py)."""

import pytest
import torch

from gqa_prune import GQAPruneError
from gqa_prune.analysis.decoder_stack import OutputHead
from gqa_prune.analysis.layer_backward import layerwise_backward
from gqa_prune.compensation import ResidentLayers

from conftest import tiny_model

IDS = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(3))


def _mean_nll(model):
    head = OutputHead(model)

    def loss(hidden, ids):
        logits = head(hidden[:, :-1]).float()
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
        )

    return loss


@pytest.mark.parametrize("kind", ["llama4", "gemma3"])
def test_parameter_and_output_gradients_equal_a_model_backward(kind):
    model = tiny_model(kind, seed=2).float().eval()
    walk = ResidentLayers(model)
    batches = list(IDS.split(2))
    layers = walk.adapter.decoder_layers(model)

    def params(layer):
        q = walk.adapter.attention_projections(layer)[0]
        return [q.weight, walk.adapter.mlp_projections(layer)[2].weight]

    got: dict[int, list[torch.Tensor]] = {}
    outputs: dict[int, list[torch.Tensor]] = {}

    def at_params(i, layer, asked, grads):
        assert [id(p) for p in asked] == [id(p) for p in params(layer)]
        if i in got:
            got[i] = [a + g for a, g in zip(got[i], grads, strict=True)]
        else:
            got[i] = list(grads)

    def at_output(i, grads):
        outputs[i] = [g.clone() for g in grads]

    flags = [p.requires_grad for p in model.parameters()]
    layerwise_backward(walk, batches, _mean_nll(model), at_output, params, at_params)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert sorted(got) == list(range(len(layers))) == sorted(outputs)

    # reference: the model's own loss (the same mean NLL), one ordinary backward per batch
    model.zero_grad(set_to_none=True)
    for ids in batches:
        model(input_ids=ids, labels=ids).loss.backward()
    for i, layer in enumerate(layers):
        for mine, param in zip(got[i], params(layer), strict=True):
            torch.testing.assert_close(mine, param.grad, rtol=1e-4, atol=1e-6)
    model.zero_grad(set_to_none=True)
    # output gradients: the last layer's is the head's, the first's reaches the embeddings
    assert all(g.shape == (2, 12, model.config.hidden_size) for g in outputs[0])
    assert not torch.equal(outputs[0][0], outputs[len(layers) - 1][0])


def test_a_non_finite_loss_names_the_caller():
    model = tiny_model("llama4", seed=2).float().eval()

    def loss(hidden, ids):
        return hidden.sum() * float("nan")

    with pytest.raises(GQAPruneError, match="my scores: calibration loss is nan at batch 0"):
        layerwise_backward(ResidentLayers(model), [IDS], loss, what="my scores")
