"""Whole attention blocks removed (``--allow_attention_removal``): a layer with 0 KV heads."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from gqa_prune.allocation import AllocationConfig
from gqa_prune.compensation import apply_plan_sequential_
from gqa_prune.errors import GQAPruneError
from gqa_prune.importance import compute_unit_scores
from gqa_prune.models.adapters import get_adapter
from gqa_prune.models.checkpoint import load_pruned, save_pruned
from gqa_prune.pipeline import prune_model_
from gqa_prune.plan import LayerPlan, PruningPlan
from gqa_prune.slicing import apply_plan_, prune_attention_by_gqa_groups

from conftest import tiny_model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def plan_removing(model, removed_layer: int, mlp_step: int = 1) -> PruningPlan:
    """Keep everything except the attention of ``removed_layer`` (and every mlp_step-th channel)."""
    geom = get_adapter(model).geometry(model)
    layers = tuple(
        LayerPlan(
            i,
            () if i == removed_layer else tuple(range(geom.kv_heads[i])),
            tuple(range(0, geom.intermediate_sizes[i], mlp_step)),
        )
        for i in range(geom.num_layers)
    )
    return PruningPlan(layers, geom.queries_per_kv, geom.head_dim)


@pytest.mark.parametrize(
    "kind, overrides",
    [
        ("llama4", {}),
        ("qwen2", {}),
        ("mha", {}),
        ("mistral", {}),
        ("qwen3", {}),
        ("llama3", {"attention_bias": True}),
        ("gemma3", {}),  # the zero output still goes through post_attention_layernorm
        ("gemma2", {"attention_bias": True}),  # ... and so does the kept o_proj bias
    ],
)
def test_removal_equals_zeroing_every_o_proj_column(kind, overrides, batch):
    model = tiny_model(kind, **overrides)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        zeroed.model.layers[1].self_attn.o_proj.weight.zero_()  # its bias (if any) stays
    prune_attention_by_gqa_groups(model.model.layers[1], [], get_adapter(model), allow_removal=True)
    assert not get_adapter(model).has_attention(model.model.layers[1])
    torch.testing.assert_close(logits(model, batch), logits(zeroed, batch))
    n_removed = sum(p.numel() for p in zeroed.parameters()) - sum(
        p.numel() for p in model.parameters()
    )
    attn = zeroed.model.layers[1].self_attn
    o_bias = 0 if attn.o_proj.bias is None else attn.o_proj.bias.numel()
    # every parameter of the block goes (q/k/v/o, biases, Qwen3's q_norm/k_norm) but the
    # o_proj bias, which the removed block keeps adding
    assert n_removed == sum(p.numel() for p in attn.parameters()) - o_bias


def test_empty_group_list_needs_permission():
    model = tiny_model("llama4")
    with pytest.raises(GQAPruneError, match="--allow_attention_removal"):
        prune_attention_by_gqa_groups(model.model.layers[0], [])


def test_removed_block_saves_reloads_and_generates(kind, batch, tmp_path):
    model = tiny_model(kind)
    after = apply_plan_(model, plan_removing(model, 1, mlp_step=2))
    assert after.kv_heads[1] == 0 and after.kv_heads[0] > 0
    assert model.config.layer_num_key_value_heads[1] == 0
    expected = logits(model, batch)
    out = save_pruned(model, None, tmp_path / "ckpt")
    reloaded, _ = load_pruned(out, device="cpu")
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    for other in (reloaded, remote):
        assert not get_adapter(other).has_attention(other.model.layers[1])
        torch.testing.assert_close(logits(other, batch), expected)
        # the removed layer still advances the KV cache: cached greedy decoding equals
        # decoding that recomputes everything
        with_cache = other.generate(
            batch[:1], max_new_tokens=5, min_new_tokens=5, do_sample=False, use_cache=True
        )
        no_cache = other.generate(
            batch[:1], max_new_tokens=5, min_new_tokens=5, do_sample=False, use_cache=False
        )
        assert torch.equal(with_cache, no_cache)


@pytest.mark.parametrize("kind", ["llama4", "gemma3"])  # gemma3: layer 0 slides (window 6)
def test_removing_layer_zero_keeps_cache_length_right(kind, batch):
    """The cache length is read from layer 0, so layer 0 must record its tokens even headless."""
    model = tiny_model(kind)
    apply_plan_(model, plan_removing(model, 0))
    # step-by-step decoding with a cache and no position ids (positions come from the cache)
    with torch.no_grad():
        full = model(input_ids=batch).logits
        prefix = model(input_ids=batch[:, :-2], use_cache=True)
        assert prefix.past_key_values.get_seq_length() == batch.shape[1] - 2
        step = model(input_ids=batch[:, -2:], cache=prefix.past_key_values).logits
    torch.testing.assert_close(step, full[:, -2:])
    with_cache = model.generate(
        batch[:1], max_new_tokens=5, min_new_tokens=5, do_sample=False, use_cache=True
    )
    no_cache = model.generate(
        batch[:1], max_new_tokens=5, min_new_tokens=5, do_sample=False, use_cache=False
    )
    assert torch.equal(with_cache, no_cache)


@pytest.mark.parametrize("criterion", ["taylor", "taylor2", "magnitude", "wanda", "random"])
def test_criteria_score_a_model_with_a_removed_block(criterion, batch):
    model = tiny_model("llama4")
    apply_plan_(model, plan_removing(model, 1))
    scores = compute_unit_scores(model, batch, criterion, "sum", 1, 0, False)
    assert scores.groups[1].shape == (0,)
    assert scores.groups[0].shape == (2,) and torch.isfinite(scores.groups[0]).all()
    assert all(c.shape == (96,) for c in scores.channels)


@pytest.mark.parametrize("compensation", ["lstsq", "bias"])
def test_sequential_compensation_removes_a_block(compensation, batch):
    model = tiny_model("llama3")
    reference = copy.deepcopy(model)
    outputs = []  # the original attention output of layer 1 on the calibration batch
    hook = reference.model.layers[1].self_attn.o_proj.register_forward_hook(
        lambda m, i, o: outputs.append(o.detach())
    )
    logits(reference, batch)
    hook.remove()
    apply_plan_sequential_(model, plan_removing(model, 1), batch, compensation, 0.1, 2, False)
    removed = model.model.layers[1].self_attn
    assert not get_adapter(model).has_attention(model.model.layers[1])
    if compensation == "bias":
        # FLAP: the removed block keeps the mean of what it used to add
        mean = torch.cat(outputs).reshape(-1, outputs[0].shape[-1]).mean(0)
        torch.testing.assert_close(removed.bias.detach(), mean, rtol=1e-4, atol=1e-5)
        assert model.config.layer_output_bias is True
    else:
        assert removed.bias is None
    assert torch.isfinite(logits(model, batch)).all()


def test_prune_model_with_attention_removal_and_repruning(batch, tmp_path):
    model = tiny_model("llama4", num_hidden_layers=4)
    geom = get_adapter(model).geometry(model)
    # 6 of the 8 groups: with importance rising by layer, layer 0 loses all of its groups
    ratio = 6 * geom.params_per_group / geom.total_params
    config = AllocationConfig(ratio, alpha=6.0, allow_attention_removal=True, prune_mlp=False)
    outcome = prune_model_(
        model, batch, config, layer_importance=[0.0, 1.0, 2.0, 3.0], progress=False
    )
    assert 0 in outcome.after.kv_heads
    assert outcome.after.kv_heads[0] == 0
    assert torch.isfinite(logits(model, batch)).all()
    # a model with a removed block can be pruned again, then saved and reloaded
    again = prune_model_(model, batch, AllocationConfig(0.05, prune_mlp=True), progress=False)
    assert again.after.kv_heads[0] == 0
    out = save_pruned(model, None, tmp_path / "ckpt")
    reloaded, _ = load_pruned(out, device="cpu")
    torch.testing.assert_close(logits(reloaded, batch), logits(model, batch))


def test_allocation_flag_reaches_the_allocator():
    from gqa_prune.cli import build_parser
    from gqa_prune.config import RunConfig
    from gqa_prune.runner import allocation_config

    args = vars(build_parser().parse_args(["--allow_attention_removal"]))
    known = {k: v for k, v in args.items() if k in RunConfig.__dataclass_fields__}
    assert allocation_config(RunConfig(**known)).allow_attention_removal is True
    assert allocation_config(RunConfig()).allow_attention_removal is False
