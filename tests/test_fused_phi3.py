"""Phi-3 / Phi-4-mini: fused ``qkv_proj`` / ``gate_up_proj`` go through every gqa-prune path.

A Phi-3 model with full rotary is a Llama model whose q/k/v (gate/up) weights are stacked
into one matrix. So its "Llama twin" (the same weights, split) must give the same logits,
and every step must give the same result on both: scores, layer importance, allocation,
slicing, compensation. The rest pins what only Phi-3 has: the fused layout in the saved
file, reload both ways, the KV cache with per-layer head counts, partial rotary, LoRA names,
streaming from fused files, and the GGUF refusal.
"""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from gqa_prune import AllocationConfig, GQAPruneError, prune_model_
from gqa_prune.analysis import compute_layer_importance
from gqa_prune.cli import main
from gqa_prune.importance import compute_unit_scores
from gqa_prune.models.adapters import get_adapter
from gqa_prune.models.checkpoint import load_pruned, save_pruned
from gqa_prune.models.fused import SplitLinear
from gqa_prune.plan import LayerPlan, PruningPlan
from gqa_prune.recovery import FinetuneConfig, PackedDataset, finetune_, lora_target_modules
from gqa_prune.slicing import apply_plan_
from gqa_prune.streaming import (
    LayerStreamer,
    StreamingConfig,
    load_model_offloaded,
    streaming_unit_scores,
)

from conftest import save_tiny_model_dir, tiny_args, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(3))
R, D = 3, 8  # tiny Phi-3: 6 Q / 2 KV heads, head_dim 8


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def llama_twin(phi):
    """A LlamaForCausalLM with the Phi-3 model's weights, q/k/v and gate/up split apart."""
    cfg = phi.config
    twin = LlamaForCausalLM(
        LlamaConfig(
            **{
                k: getattr(cfg, k)
                for k in (
                    "vocab_size",
                    "hidden_size",
                    "intermediate_size",
                    "num_hidden_layers",
                    "num_attention_heads",
                    "num_key_value_heads",
                    "max_position_embeddings",
                    "rms_norm_eps",
                    "tie_word_embeddings",
                )
            },
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    ).eval()
    q, kv, m = cfg.num_attention_heads * D, cfg.num_key_value_heads * D, cfg.intermediate_size
    state = {}
    for name, tensor in phi.state_dict().items():  # the fused layout, split or not
        if name.endswith("qkv_proj.weight"):
            stem = name.removesuffix("qkv_proj.weight")
            for part, rows in zip(("q", "k", "v"), tensor.split([q, kv, kv]), strict=True):
                state[f"{stem}{part}_proj.weight"] = rows
        elif name.endswith("gate_up_proj.weight"):
            stem = name.removesuffix("gate_up_proj.weight")
            for part, rows in zip(("gate", "up"), tensor.split([m, m]), strict=True):
                state[f"{stem}{part}_proj.weight"] = rows
        else:
            state[name] = tensor
    twin.load_state_dict(state, strict=not cfg.tie_word_embeddings)
    return twin


@pytest.fixture
def phi_and_twin():
    phi = tiny_model("phi3_tied")  # full rotary: exactly a Llama with stacked weights
    twin = llama_twin(phi)
    torch.testing.assert_close(logits(twin), logits(phi))
    return phi, twin


# ------------------------------------------------------------------ the Llama twin


@pytest.mark.parametrize("criterion", ["taylor", "taylor2", "magnitude", "wanda", "random"])
def test_every_criterion_scores_phi3_like_its_llama_twin(phi_and_twin, criterion):
    phi, twin = phi_and_twin
    got = compute_unit_scores(phi, IDS, criterion, batch_size=2, progress=False)
    expected = compute_unit_scores(twin, IDS, criterion, batch_size=2, progress=False)
    for a, b in zip(got.groups + got.channels, expected.groups + expected.channels, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["removal", "activation", "block_influence"])
def test_layer_importance_of_phi3_equals_its_llama_twin(phi_and_twin, method):
    phi, twin = phi_and_twin
    got = compute_layer_importance(phi, IDS, method, batch_size=2, progress=False)
    expected = compute_layer_importance(twin, IDS, method, batch_size=2, progress=False)
    torch.testing.assert_close(torch.tensor(got.scores), torch.tensor(expected.scores))


@pytest.mark.parametrize(
    ("compensation", "mode", "criterion"),
    [("lstsq", "layer", "taylor"), ("bias", "global", "wanda")],
)
def test_pruning_phi3_equals_pruning_its_llama_twin(phi_and_twin, compensation, mode, criterion):
    """Same scores -> same allocation and plan -> same sliced and refitted weights."""
    phi, twin = phi_and_twin
    kwargs = dict(
        layer_importance=[3.0, 1.0, 2.0],
        criterion=criterion,
        mode=mode,
        batch_size=2,
        progress=False,
        compensation=compensation,
    )
    config = AllocationConfig(pruning_ratio=0.3, prune_mlp=True)
    got = prune_model_(phi, IDS, config, **kwargs)
    expected = prune_model_(twin, IDS, config, **kwargs)
    assert got.plan == expected.plan
    assert any(len(lp.keep_kv_groups) < 2 for lp in got.plan.layers)  # groups really cut
    assert got.after.total_params == expected.after.total_params
    torch.testing.assert_close(logits(phi), logits(twin), rtol=1e-4, atol=1e-5)
    a_phi, a_twin = get_adapter(phi), get_adapter(twin)
    for layer_phi, layer_twin in zip(phi.model.layers, twin.model.layers, strict=True):
        pairs = zip(
            a_phi.prunable_projections(layer_phi),
            a_twin.prunable_projections(layer_twin),
            strict=True,
        )
        for p, t in pairs:
            torch.testing.assert_close(p.weight, t.weight, rtol=1e-4, atol=1e-5)
            assert (p.bias is None) == (t.bias is None)


# ------------------------------------------------------------- slicing and layout


def test_slicing_the_fused_rows_equals_zeroing_the_outputs():
    """Group 0 of layer 1 and MLP channels of layer 2 removed == o/down columns zeroed."""
    model = tiny_model("phi3")
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        zeroed.model.layers[1].self_attn.o_proj.weight[:, : R * D] = 0
        zeroed.model.layers[2].mlp.down_proj.weight[:, [0, 7, 50, 95]] = 0
    plan = PruningPlan(
        (
            LayerPlan(0, (0, 1), tuple(range(96))),
            LayerPlan(1, (1,), tuple(range(96))),
            LayerPlan(2, (0, 1), tuple(c for c in range(96) if c not in (0, 7, 50, 95))),
        ),
        R,
        D,
    )
    apply_plan_(model, plan)
    attn = model.model.layers[1].self_attn
    assert isinstance(attn.qkv_proj, SplitLinear) and attn.qkv_proj.out_features == 5 * D
    assert attn.num_key_value_heads == 1 and attn.config.num_attention_heads == R
    assert model.config.num_attention_heads == 6  # the shared config keeps the global count
    torch.testing.assert_close(logits(model), logits(zeroed), rtol=1e-5, atol=1e-5)


def test_saved_weights_keep_the_fused_layout_of_the_kept_rows(tmp_path):
    """qkv_proj rows = [kept Q; kept K; kept V], gate_up_proj rows = [kept gate; kept up]."""
    model = tiny_model("phi3")
    fused = {k: v.clone() for k, v in model.state_dict().items()}
    keep_ch = list(range(0, 96, 3))
    plan = PruningPlan(
        (
            LayerPlan(0, (1,), tuple(keep_ch)),
            LayerPlan(1, (0, 1), tuple(range(96))),
            LayerPlan(2, (0,), tuple(range(96))),
        ),
        R,
        D,
    )
    apply_plan_(model, plan)
    out = save_pruned(model, None, tmp_path / "p")
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        saved = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    assert set(saved) == set(fused)  # Phi-3's own tensor names, nothing split
    for i, g in ((0, 1), (2, 0)):
        qkv = fused[f"model.layers.{i}.self_attn.qkv_proj.weight"]
        q_rows = range(g * R * D, (g + 1) * R * D)
        k_rows = [6 * D + g * D + j for j in range(D)]
        v_rows = [8 * D + g * D + j for j in range(D)]
        torch.testing.assert_close(
            saved[f"model.layers.{i}.self_attn.qkv_proj.weight"],
            qkv[[*q_rows, *k_rows, *v_rows]],
            rtol=0,
            atol=0,
        )
    gate_up = fused["model.layers.0.mlp.gate_up_proj.weight"]
    expected = gate_up[[*keep_ch, *(96 + c for c in keep_ch)]]
    torch.testing.assert_close(saved["model.layers.0.mlp.gate_up_proj.weight"], expected)
    torch.testing.assert_close(
        saved["model.layers.1.self_attn.qkv_proj.weight"],
        fused["model.layers.1.self_attn.qkv_proj.weight"],
    )
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gqa_pruned_phi3"
    assert cfg["layer_num_key_value_heads"] == [1, 2, 1]
    assert cfg["layer_intermediate_sizes"] == [len(keep_ch), 96, 96]


def test_state_dict_round_trip_of_a_split_and_sliced_layer():
    """load_state_dict splits a fused state dict at the parts' current (pruned) sizes."""
    model = tiny_model("phi3")
    apply_plan_(
        model,
        PruningPlan(tuple(LayerPlan(i, (i % 2,), tuple(range(40))) for i in range(3)), R, D),
    )
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(logits(other), logits(model), rtol=0, atol=0)


# ----------------------------------------------------- reload, generate, removal


def uneven_plan(remove_attention: bool) -> PruningPlan:
    """Per-layer KV heads 2/1/1 (or 2/0/1: layer 1's attention removed) and MLP widths."""
    kv = [(0, 1), () if remove_attention else (1,), (0,)]
    return PruningPlan(
        tuple(LayerPlan(i, kv[i], tuple(range(0, 96, i + 1))) for i in range(3)), R, D
    )


@pytest.mark.parametrize("kind", ["phi3", "phi3_tied"])
@pytest.mark.parametrize("remove_attention", [False, True])
def test_pruned_phi3_reloads_both_ways_and_generates_with_the_cache(
    kind, remove_attention, tmp_path
):
    model = tiny_model(kind)
    apply_plan_(model, uneven_plan(remove_attention))
    expected = logits(model)
    out = save_pruned(model, None, tmp_path / "p")
    reloaded, _ = load_pruned(out, device="cpu")
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(remote).__module__.startswith("transformers_modules")
    prompt = IDS[:2, :6]
    for other in (model, reloaded, remote):
        torch.testing.assert_close(logits(other), expected, rtol=1e-5, atol=1e-5)
        gen = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
        cached = other.generate(prompt, use_cache=True, **gen)
        uncached = other.generate(prompt, use_cache=False, **gen)
        assert torch.equal(cached, uncached)
    if kind == "phi3_tied":
        assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    # the remote model is plain Phi-3 modules: fused projections at per-layer sizes
    assert remote.model.layers[2].self_attn.qkv_proj.weight.shape == ((R + 2) * D, 48)
    assert remote.model.layers[1].mlp.gate_up_proj.weight.shape == (2 * 48, 48)


def test_a_reloaded_pruned_phi3_prunes_again_like_the_in_memory_one(tmp_path):
    """The shipped (fused) model is split on first use and then prunes like the original."""
    model = tiny_model("phi3")
    apply_plan_(model, uneven_plan(False))
    reloaded, _ = load_pruned(save_pruned(model, None, tmp_path / "p"), device="cpu")
    assert isinstance(reloaded.model.layers[0].self_attn.qkv_proj, torch.nn.Linear)
    second = PruningPlan(
        tuple(LayerPlan(i, (0,), tuple(range(0, 96 // (i + 1), 2))) for i in range(3)), R, D
    )
    for m in (model, reloaded):
        apply_plan_(m, second)
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------- recovery


def test_lora_targets_the_fused_parts_merges_and_saves_fused(tmp_path):
    model = tiny_model("phi3")
    apply_plan_(model, uneven_plan(False))
    names = lora_target_modules(model, "all")
    assert "model.layers.0.self_attn.qkv_proj.q_proj" in names
    assert "model.layers.0.mlp.gate_up_proj.up_proj" in names
    assert len(names) == 3 * 7
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    seqs = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(4))
    config = FinetuneConfig(
        method="lora", lr=1e-2, batch_size=2, epochs=1, warmup_steps=0, seq_len=24
    )
    finetune_(model, None, config, dataset=PackedDataset(seqs.repeat(2, 1)))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}
    assert changed == {f"{n}.weight" for n in names}
    out = save_pruned(model, None, tmp_path / "ft")
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        assert not any("lora" in k or "q_proj" in k for k in fh.keys())  # noqa: SIM118
    reloaded, _ = load_pruned(out, device="cpu")
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("store", ["ram", "disk"])
def test_streaming_scores_and_pruning_equal_in_memory(store, tmp_path):
    dense = tiny_model("phi3")
    offload = str(tmp_path / "off") if store == "disk" else None
    streamer = LayerStreamer(
        copy.deepcopy(dense), StreamingConfig(device="cpu", offload_dir=offload)
    )
    expected = compute_unit_scores(dense, IDS, "wanda", batch_size=2, progress=False)
    got = streaming_unit_scores(streamer, IDS, "wanda", batch_size=2, progress=False)
    for a, b in zip(got.groups + got.channels, expected.groups + expected.channels, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    config = AllocationConfig(pruning_ratio=0.3, prune_mlp=True)
    kwargs = dict(layer_importance=[3.0, 1.0, 2.0], batch_size=2, progress=False)
    want = prune_model_(dense, IDS, config, **kwargs)
    have = prune_model_(streamer.model, IDS, config, streaming=streamer, **kwargs)
    assert have.plan == want.plan
    gathered = streamer.gather_("cpu")
    torch.testing.assert_close(logits(gathered), logits(dense), rtol=1e-4, atol=1e-5)


def test_offloaded_loading_of_a_fused_phi3_folder(tmp_path):
    """The layer files are cut from Phi-3's fused tensors and split on the way in."""
    folder = save_tiny_model_dir(tmp_path / "phi", "phi3_tied")
    dense = tiny_model("phi3_tied")
    model, _, streamer = load_model_offloaded(
        str(folder), "float32", StreamingConfig(device="cpu", offload_dir=str(tmp_path / "o"))
    )
    assert all(p.is_meta for p in streamer.layers.parameters())
    expected = compute_unit_scores(dense, IDS, "taylor", batch_size=2, progress=False)
    got = streaming_unit_scores(streamer, IDS, "taylor", batch_size=2, progress=False)
    for a, b in zip(got.groups + got.channels, expected.groups + expected.channels, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------- CLI


def test_cli_prunes_compensates_recovers_and_saves_a_phi3(tiny_run, tmp_path):
    """The whole command on a Phi-3 folder: scores, allocation, lstsq, LoRA, save, reload."""
    run = {**tiny_run, "model": str(save_tiny_model_dir(tmp_path / "phi", "phi3"))}
    argv = tiny_args(
        run,
        "--prune_mlp",
        "--pruning_ratio",
        "0.3",
        "--compensation_samples",
        "4",
        "--finetune",
        "--finetune_method",
        "lora",
        "--finetune_samples",
        "4",
        "--finetune_seq_len",
        "32",
        "--save_model",
        "--save_ckpt_log_name",
        "phi",
    )
    assert main(argv) == 0
    out = run["logs"] / "phi" / "model_finetuned"
    summary = json.loads((run["logs"] / "phi" / "summary.json").read_text())
    assert summary["finetune"]["steps"] > 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gqa_pruned_phi3" and min(cfg["layer_num_key_value_heads"]) >= 1
    reloaded, tok = load_pruned(out, device="cpu")
    assert tok is not None
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    torch.testing.assert_close(logits(remote), logits(reloaded), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- export


def test_gguf_export_refuses_a_pruned_phi3_in_one_line(tmp_path):
    from gqa_prune.export.gguf_export import export_gguf

    model = tiny_model("phi3")
    apply_plan_(model, uneven_plan(False))
    out = save_pruned(model, None, tmp_path / "p")
    with pytest.raises(GQAPruneError) as info:
        export_gguf(out, tmp_path / "p.gguf")
    assert "phi3" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "p.gguf").exists()


def test_a_fused_projection_that_does_not_split_is_a_user_error():
    model = tiny_model("phi3")
    attn = model.model.layers[0].self_attn
    attn.num_key_value_heads = 5  # 2 * 5 * 8 rows of k/v > the 80 rows of qkv_proj
    with pytest.raises(GQAPruneError, match="qkv_proj"):
        get_adapter(model).attention_projections(model.model.layers[0])
