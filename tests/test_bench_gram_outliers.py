"""bench/bench_gram_outliers.py measures where a refit's Gram energy comes from."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_gram_outliers import gram_energy  # noqa: E402

from conftest import tiny_model  # noqa: E402


def _energies(model, ids):
    return {(r.layer, r.name): r for r in gram_energy(model, ids, batch_size=2)}


def test_a_massive_first_token_channel_shows_in_layer_and_projection():
    model = tiny_model()
    ids = torch.randint(
        0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0)
    )
    plain = _energies(model, ids)
    down = model.model.layers[1].mlp.down_proj

    def sink(module, args):  # channel 3 of the first position carries a massive activation
        x = args[0].clone()
        x[:, 0, 3] = 1e3
        return (x,)

    handle = down.register_forward_pre_hook(sink, prepend=True)
    try:
        hot = _energies(model, ids)
    finally:
        handle.remove()
    r = hot[(1, "down_proj")]
    assert r.first > 0.99 and r.top > 0.99 and r.mean_over_median > 10
    # plain random weights: the first position holds about its share of 16 positions
    p = plain[(1, "down_proj")]
    assert p.first < 0.3 and p.top < 0.5 and p.mean_over_median < 10
    # the other projection of that layer, and the layer below, do not see it
    assert abs(hot[(1, "o_proj")].first - plain[(1, "o_proj")].first) < 1e-9
    assert abs(hot[(0, "down_proj")].first - plain[(0, "down_proj")].first) < 1e-9
