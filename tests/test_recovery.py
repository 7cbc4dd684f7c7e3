"""Recovery: LoRA / full / distillation on the Trainer, packing, the NaN guard, reload, CLI."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

from gqa_prune.cli import main
from gqa_prune.errors import GQAPruneError
from gqa_prune.models.checkpoint import load_pruned, save_pruned
from gqa_prune.recovery import (
    FinetuneConfig,
    PackedDataset,
    apply_lora,
    distillation_loss,
    finetune_,
    kl_to_teacher,
    lora_target_modules,
    pack_tokens,
    teacher_targets,
)

from conftest import prune_unevenly_, tiny_args, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def seqs():
    torch.manual_seed(3)
    return torch.randint(3, 128, (2, 24))


def repeated(seqs, times=4) -> PackedDataset:
    return PackedDataset(seqs.repeat(times, 1))


def fast(**overrides) -> FinetuneConfig:
    base = dict(batch_size=2, epochs=2, warmup_steps=0, scheduler="constant", seq_len=24)
    return FinetuneConfig(**{**base, **overrides})


@torch.no_grad()
def lm_loss(model, ids) -> float:
    return float(model(input_ids=ids, labels=ids).loss)


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class OnTrainEnd(TrainerCallback):
    """Run ``fn(trained_model)`` at the end of training (before LoRA is merged)."""

    def __init__(self, fn):
        self.fn = fn

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.fn(model)


# --------------------------------------------------------------------------- data


def test_packing_gives_full_seeded_windows_of_the_stream():
    stream = torch.arange(1000)
    packed = pack_tokens(stream, 64, num_sequences=10, seed=1)
    assert packed.shape == (10, 64)
    for row in packed:  # each row is one contiguous, aligned slice: no padding, no seams
        start = int(row[0])
        assert start % 64 == 0 and torch.equal(row, stream[start : start + 64])
    assert len({int(r[0]) for r in packed}) == 10
    assert torch.equal(packed, pack_tokens(stream, 64, num_sequences=10, seed=1))
    assert not torch.equal(packed, pack_tokens(stream, 64, num_sequences=10, seed=2))
    assert pack_tokens(stream, 64).shape == (15, 64)  # the 40-token tail is dropped
    assert FinetuneConfig(seq_len=64, num_samples=100, max_tokens=300).num_sequences == 4
    with pytest.raises(GQAPruneError, match="fewer than one sequence"):
        pack_tokens(torch.arange(10), 64)


# --------------------------------------------------------------------------- loss math


def test_kl_term_matches_its_definition_and_top_k_renormalises():
    torch.manual_seed(0)
    s, t = torch.randn(2, 6, 20), torch.randn(2, 6, 20)
    temp = 2.0
    log_q = F.log_softmax(s[:, :-1] / temp, -1)
    log_p = F.log_softmax(t[:, :-1] / temp, -1)
    expected = temp**2 * (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    torch.testing.assert_close(kl_to_teacher(s, teacher_targets(t, temp)), expected)
    torch.testing.assert_close(kl_to_teacher(s, teacher_targets(t, temp, top_k=20)), expected)
    assert float(kl_to_teacher(t, teacher_targets(t, temp))) == pytest.approx(0.0, abs=1e-6)

    top = teacher_targets(t, temp, top_k=3)
    assert top.log_probs.shape == (2, 5, 3)
    torch.testing.assert_close(top.log_probs.exp().sum(-1), torch.ones(2, 5))  # renormalised
    vals, idx = (t[:, :-1] / temp).topk(3, -1)
    p3 = F.softmax(vals, -1)
    manual = temp**2 * (p3 * (p3.log() - log_q.gather(-1, idx))).sum(-1).mean()
    torch.testing.assert_close(kl_to_teacher(s, top), manual)
    assert float(kl_to_teacher(s, top)) > 0


def test_ce_term_equals_the_models_own_loss(seqs):
    model = tiny_model()
    with torch.no_grad():
        out = model(input_ids=seqs, labels=seqs)
    terms = distillation_loss(out.logits, teacher_targets(out.logits, 1.0), seqs, alpha=0.0)
    torch.testing.assert_close(terms.loss, out.loss)
    assert float(terms.kl) == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("kind", ["llama4", "gemma3"])  # gemma3: q/k and sandwich norms
def test_lora_lowers_the_loss_merges_exactly_and_reloads(kind, seqs, tmp_path):
    model = tiny_model(kind)
    prune_unevenly_(model)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    captured = {}

    def peft_logits(peft_model):
        peft_model.eval()
        with torch.no_grad():
            captured["logits"] = peft_model(input_ids=seqs).logits

    before = lm_loss(model, seqs)
    result = finetune_(
        model,
        None,
        fast(method="lora", lr=1e-2, lora_dropout=0.1),
        dataset=repeated(seqs),
        callbacks=[OnTrainEnd(peft_logits)],
    )
    after = lm_loss(model, seqs)
    assert result.steps == 8 and result.tokens == 8 * 2 * 24
    assert after < before - 0.3, (before, after)
    # merged: plain modules, pruned shapes, same function as the peft model
    assert not any("lora" in n for n, _ in model.named_modules())
    assert {n: p.shape for n, p in model.named_parameters()} == shapes
    with torch.no_grad():
        merged = model(input_ids=seqs).logits
    torch.testing.assert_close(merged, captured["logits"], atol=1e-5, rtol=1e-5)
    # the recovered checkpoint reloads to the same logits
    reloaded, _ = load_pruned(save_pruned(model, None, tmp_path / "ft"), device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=seqs).logits, merged)


@pytest.mark.parametrize("targets", ["attention", "mlp"])
def test_lora_targets_decide_which_projections_change(targets, seqs):
    model = tiny_model("qwen2")
    names = lora_target_modules(model, targets)
    block = "self_attn" if targets == "attention" else "mlp"
    assert names and all(f".{block}." in n for n in names)
    assert len(names) == 3 * (4 if targets == "attention" else 3)  # 3 layers

    probe = copy.deepcopy(model)
    peft_model = apply_lora(probe, fast(lora_targets=targets))
    adapted = {
        n.removeprefix("base_model.model.")
        for n, m in peft_model.named_modules()
        if hasattr(m, "lora_A") and isinstance(m.lora_A, nn.ModuleDict) and m.lora_A
    }
    assert adapted == set(names)

    start = weights(model)
    finetune_(
        model,
        None,
        fast(method="lora", lr=1e-2, lora_targets=targets, epochs=1),
        dataset=repeated(seqs, 2),
    )
    changed = {n for n, w in weights(model).items() if not torch.equal(w, start[n])}
    assert changed == {f"{n}.weight" for n in names}


# --------------------------------------------------------------------------- full


def test_full_finetuning_changes_every_parameter(seqs):
    model = tiny_model("llama4")
    prune_unevenly_(model)
    start = weights(model)
    before = lm_loss(model, seqs)
    result = finetune_(model, None, fast(method="full", lr=1e-3), dataset=repeated(seqs))
    unchanged = [n for n, w in weights(model).items() if torch.equal(w, start[n])]
    assert unchanged == []
    assert result.trainable_params == sum(p.numel() for p in model.parameters())
    assert lm_loss(model, seqs) < before


def test_a_bf16_model_trains_on_fp32_master_weights(seqs):
    model = tiny_model("llama4").to(torch.bfloat16)
    seen = {}

    def dtypes(trained):
        seen["dtypes"] = {p.dtype for p in trained.parameters()}

    finetune_(
        model,
        None,
        fast(method="full", lr=1e-3, epochs=1),
        dataset=repeated(seqs, 2),
        callbacks=[OnTrainEnd(dtypes)],
    )
    assert seen["dtypes"] == {torch.float32}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# --------------------------------------------------------------------------- distill


@pytest.mark.parametrize("top_k", [None, 16])
def test_distillation_lowers_the_kl_to_the_frozen_teacher(top_k, seqs):
    teacher = tiny_model("llama4", seed=5)
    with torch.no_grad():  # a peaked teacher, like a trained model (a random one is near-uniform)
        teacher.lm_head.weight.mul_(10)
    student = copy.deepcopy(teacher)
    prune_unevenly_(student)
    teacher_start = weights(teacher)
    config = fast(
        method="distill",
        lr=1e-3,
        epochs=4,
        distill_alpha=1.0,
        distill_temperature=2.0,
        distill_top_k=top_k,
    )

    def kl() -> float:  # the distillation objective: KL at T (over the teacher's top-k)
        with torch.no_grad():
            targets = teacher_targets(teacher(input_ids=seqs).logits, 2.0, top_k)
            return float(kl_to_teacher(student(input_ids=seqs).logits, targets))

    before = kl()
    result = finetune_(student, None, config, teacher=teacher, dataset=repeated(seqs))
    assert kl() < 0.7 * before, (before, kl())
    assert all(torch.equal(w, teacher_start[n]) for n, w in weights(teacher).items())
    assert {"kl", "ce"} <= set(result.loss_history[0])
    assert result.loss_history[0]["loss"] == pytest.approx(result.loss_history[0]["kl"])


def test_distill_needs_a_teacher_and_other_methods_refuse_one(seqs):
    with pytest.raises(GQAPruneError, match="teacher"):
        finetune_(tiny_model(), None, fast(method="distill"), dataset=repeated(seqs))
    with pytest.raises(GQAPruneError, match="teacher"):
        finetune_(
            tiny_model(), None, fast(method="full"), teacher=tiny_model(), dataset=repeated(seqs)
        )


# --------------------------------------------------------------------------- NaN guard


class InjectInf(TrainerCallback):
    """Make optimizer step ``bad`` non-finite (its loss, or a weight after it); record the
    weights after step ``bad - 1``, the last good ones."""

    def __init__(self, model, bad: int, where: str):
        self.model, self.bad, self.where = model, bad, where
        self.hook = None
        self.good: dict[str, torch.Tensor] = {}

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.bad and self.where == "loss":
            head = self.model.get_output_embeddings()
            self.hook = head.register_forward_hook(lambda m, i, out: out * float("inf"))

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.bad - 1:
            self.good = weights(self.model)
        if state.global_step == self.bad and self.where == "weight":
            with torch.no_grad():
                self.model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")

    def on_train_end(self, args, state, control, **kwargs):
        if self.hook is not None:
            self.hook.remove()


@pytest.mark.parametrize("where", ["loss", "weight"])
def test_nan_guard_stops_at_the_step_and_keeps_the_last_good_weights(where, seqs, tmp_path):
    model = tiny_model("llama4")
    inject = InjectInf(model, bad=3, where=where)
    result = finetune_(
        model, None, fast(method="full", lr=1e-3), dataset=repeated(seqs), callbacks=[inject]
    )
    assert result.stopped_at_step == 3 and result.restored_step == 2 and result.steps == 2
    assert "step 3" in result.message
    assert len(result.loss_history) == 3  # no step after the bad one
    final = weights(model)
    assert all(torch.isfinite(w).all() for w in final.values())
    assert all(torch.equal(final[n], inject.good[n]) for n in final)
    reloaded, _ = load_pruned(save_pruned(model, None, tmp_path / "ft"), device="cpu")
    assert all(torch.isfinite(p).all() for p in reloaded.parameters())


# --------------------------------------------------------------------------- CLI


def test_cli_prune_then_distill_writes_the_recovered_model(tiny_run, capsys):
    rc = main(
        tiny_args(
            tiny_run,
            "--prune_mlp",
            "--pruning_ratio",
            "0.3",
            "--test_after_prune",
            "--finetune",
            "--finetune_method",
            "distill",
            "--finetune_samples",
            "8",
            "--finetune_seq_len",
            "32",
            "--finetune_lr",
            "1e-3",
            "--distill_top_k",
            "8",
            "--save_ckpt_log_name",
            "ft",
        )
    )
    assert rc == 0
    exp = tiny_run["logs"] / "ft"
    assert (exp / "finetune_loss.png").stat().st_size > 0
    summary = json.loads((exp / "summary.json").read_text())
    ft = summary["finetune"]
    assert ft["method"] == "distill" and ft["steps"] == 2 and ft["tokens"] == 8 * 32
    assert ft["stopped_at_step"] is None and ft["final_loss"] is not None
    assert summary["perplexity"]["after_finetune"]["num_tokens"] > 0
    model, tok = load_pruned(exp / "model_finetuned", device="cpu")
    assert tok is not None
    cfg = json.loads((exp / "model_finetuned" / "config.json").read_text())
    assert cfg["layer_intermediate_sizes"] == [la["mlp_size"] for la in summary["layers"]]
    assert "perplexity after_finetune" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--finetune_lr", "0"), "--finetune_lr"),
        (("--lora_dropout", "1.5"), "--lora_dropout"),
        (("--distill_alpha", "2"), "--distill_alpha"),
        (("--finetune_max_tokens", "10"), "--finetune_max_tokens"),
        (("--finetune_batch_size", "0"), "--finetune_batch_size"),
    ],
)
def test_cli_refuses_bad_recovery_flags(tiny_run, capsys, flags, message):
    assert main(tiny_args(tiny_run, "--finetune", *flags)) == 2
    assert message in capsys.readouterr().err
    assert not (tiny_run["logs"] / "gqa_prune_run").exists()


def test_standalone_command_recovers_a_saved_pruned_model(tiny_run, capsys):
    from gqa_prune.recovery.cli import main as finetune_main

    assert (
        main(tiny_args(tiny_run, "--prune_mlp", "--save_model", "--save_ckpt_log_name", "s")) == 0
    )
    exp = tiny_run["logs"] / "s"
    args = [
        "--model",
        str(exp / "model"),
        "--finetune_method",
        "lora",
        "--lora_targets",
        "mlp",
        "--data_dir",
        tiny_run["data"],
        "--finetune_samples",
        "8",
        "--finetune_seq_len",
        "32",
        "--device",
        "cpu",
        "--test_after_finetune",
        "--eval_seq_len",
        "32",
        "--eval_max_windows",
        "2",
    ]
    assert finetune_main(args) == 0
    record = json.loads((exp / "finetune.json").read_text())
    assert record["steps"] == 2 and record["perplexity_after_finetune"]["num_tokens"] > 0
    assert (exp / "finetune_loss.png").is_file()
    load_pruned(exp / "model_finetuned", device="cpu")
    assert finetune_main(args) == 2  # the output exists: refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err
