"""GGUF export checked in llama.cpp: pruned SmolLM2-135M, PyTorch vs llama.cpp logits and PPL.

Prunes the built-in SmolLM2-135M (default 25%, uneven per-layer heads and MLP widths, no
compensation, few calibration samples: the point is the export, not the pruning quality),
saves it, exports it as f32 / f16 / q8_0 GGUF, and runs WikiText-2 test windows through
both runtimes with the same token ids. Prints one row per output type: file size, max/mean
absolute logit difference (over every position and vocabulary entry), top-1 agreement,
and perplexity from PyTorch and from llama.cpp. Needs llama-cpp-python
(scripts/install_llama_cpp.sh).

    .venv/bin/python bench/bench_gguf_llamacpp.py --data_dir ../shared/data

With ``--spm_vocab``, checks the SentencePiece-style tokenizer export on a real vocabulary
instead: llama.cpp's ``models/ggml-vocab-llama-spm.gguf`` (Llama-2's 32k pieces and scores,
with ``.inp``/``.out`` test texts and Hugging Face ids; in the llama-cpp-python source
package under ``vendor/llama.cpp/models``) becomes a Llama-2-style ``tokenizer.json`` (merges
ordered by piece score, as transformers converts SentencePiece), which is exported and
tokenized by llama.cpp:

    .venv/bin/python bench/bench_gguf_llamacpp.py --data_dir ../shared/data \
        --spm_vocab /path/to/llama.cpp/models/ggml-vocab-llama-spm.gguf
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gqa_prune import (
    AllocationConfig,
    export_gguf,
    load_model,
    load_pruned,
    load_text,
    prune_model_,
    sample_calibration,
    save_pruned,
    tokenize_text,
)
from gqa_prune.export.llamacpp import (
    compare_logits,
    llama_cpp_logits,
    llama_cpp_tokenize,
    perplexity_of_logits,
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default=None, help="folder with the WikiText-2 copies")
    p.add_argument("--pruning_ratio", type=float, default=0.25)
    p.add_argument("--calibration_samples", type=int, default=8)
    p.add_argument("--windows", type=int, default=16, help="WikiText-2 test windows")
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--outtypes", default="f32,f16,q8_0")
    p.add_argument("--work_dir", default=None, help="keep the checkpoint and GGUF files here")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--spm_vocab", default=None, help="llama.cpp's ggml-vocab-llama-spm.gguf")
    return p.parse_args()


def check_spm_vocab(vocab_gguf: Path, data_dir: str | None, work: Path) -> None:
    """llama.cpp's tokenization of an exported SentencePiece-style tokenizer vs Hugging Face."""
    import gguf
    from tokenizers import Tokenizer, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    from gqa_prune.export.gguf_tokenizer import read_tokenizer

    fields = {k: f.contents() for k, f in gguf.GGUFReader(vocab_gguf).fields.items()}
    pieces = fields["tokenizer.ggml.tokens"]
    scores = dict(zip(pieces, fields["tokenizer.ggml.scores"]))
    not_normal = [t for t, ty in zip(pieces, fields["tokenizer.ggml.token_type"]) if ty != 1]
    vocab = {t: i for i, t in enumerate(pieces)}
    merges = generate_merges(vocab, scores, skip_tokens=not_normal)
    bpe = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    space = "\u2581"  # Llama-2's tokenizer.json: Prepend + Replace normalizers, BOS added
    bpe.normalizer = normalizers.Sequence(
        [normalizers.Prepend(space), normalizers.Replace(" ", space)]
    )
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    folder = work / "spm-tokenizer"
    hf.save_pretrained(folder)
    out = folder / "vocab.gguf"  # a vocab-only file: the tokenizer needs no tensors
    writer = gguf.GGUFWriter(out, arch="llama")
    writer.add_block_count(1)
    writer.add_embedding_length(fields["llama.embedding_length"])
    writer.add_head_count(fields["llama.attention.head_count"])
    read_tokenizer(folder, len(pieces)).write_to(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    inp = Path(f"{vocab_gguf}.inp").read_text(encoding="utf-8")
    texts = inp.split("\n__ggml_vocab_test__\n")[:-1]
    lines = Path(f"{vocab_gguf}.out").read_text().split("\n")
    reference = [[int(x) for x in line.split()] for line in lines[: len(texts)]]
    hf_ok = sum(hf(t, add_special_tokens=False)["input_ids"] == r for t, r in zip(texts, reference))
    cpp_ok = sum(llama_cpp_tokenize(out, t) == r for t, r in zip(texts, reference))
    print(f"{vocab_gguf.name}: {len(pieces)} tokens, {len(merges)} merges")
    print(f"rebuilt HF tokenizer == reference HF ids: {hf_ok}/{len(texts)} texts")
    print(f"llama.cpp on the exported file == reference HF ids: {cpp_ok}/{len(texts)} texts")
    if data_dir:
        text = load_text("wikitext2", "eval", data_dir)[:200_000]
        ids = hf(text, add_special_tokens=False)["input_ids"]
        same = llama_cpp_tokenize(out, text) == ids
        print(f"WikiText-2 test, first 200,000 characters ({len(ids)} tokens): same ids {same}")


def prune_and_save(args: argparse.Namespace, out_dir: Path) -> Path:
    model, tok = load_model("smollm2-135m", device="cpu", dtype="float32")
    calib_tokens = tokenize_text(tok, load_text("wikitext2", "calibration", args.data_dir))
    calib = sample_calibration(calib_tokens, args.calibration_samples, 64, seed=0)
    config = AllocationConfig(pruning_ratio=args.pruning_ratio, alpha=2.0, distribution=(1, 9))
    prune_model_(model, calib, config, compensation="none", progress=False)
    return save_pruned(model, tok, out_dir, overwrite=True)


def main() -> None:
    args = parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_gguf_"))
    if args.spm_vocab:
        check_spm_vocab(Path(args.spm_vocab), args.data_dir, work)
        return
    t0 = time.perf_counter()
    ckpt = prune_and_save(args, work / "model")
    cfg = json.loads((ckpt / "config.json").read_text())
    ratio = cfg["num_attention_heads"] // cfg["num_key_value_heads"]
    print(f"pruned in {time.perf_counter() - t0:.0f} s -> {ckpt}")
    print("Q heads per layer:", [kv * ratio for kv in cfg["layer_num_key_value_heads"]])
    print("MLP width per layer:", cfg["layer_intermediate_sizes"])

    model, tok = load_pruned(ckpt, dtype="float32", device="cpu")
    text = load_text("wikitext2", "eval", args.data_dir)
    ids = tokenize_text(tok, text)
    n = args.seq_len
    windows = [ids[i * n : (i + 1) * n].tolist() for i in range(args.windows)]
    with torch.no_grad():
        ref = [model(torch.tensor([w])).logits[0].float().numpy() for w in windows]
    ref_ppl = perplexity_of_logits(ref, windows)

    rows = []
    for outtype in args.outtypes.split(","):
        path = export_gguf(ckpt, work / f"model-{outtype}.gguf", outtype, overwrite=True)
        got = llama_cpp_logits(path, windows)
        cmp = compare_logits(np.concatenate(ref), np.concatenate(got))
        rows.append(
            {
                "outtype": outtype,
                "size_mib": path.stat().st_size / 2**20,
                **cmp.to_dict(),
                "ppl_torch": ref_ppl,
                "ppl_llama_cpp": perplexity_of_logits(got, windows),
            }
        )
    sample = text[:20000]
    same_tokens = (
        llama_cpp_tokenize(path, sample) == tok(sample, add_special_tokens=False)["input_ids"]
    )

    print(
        f"\nSmolLM2-135M pruned {args.pruning_ratio:.0%}, {args.windows} WikiText-2 test windows "
        f"x {n} tokens, llama.cpp KV cache f32"
    )
    print(
        "| outtype | size (MiB) | max abs diff | mean abs diff | logit std | top-1 agree "
        "| PPL PyTorch | PPL llama.cpp |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['outtype']} | {r['size_mib']:.1f} | {r['max_abs']:.4f} | {r['mean_abs']:.5f} "
            f"| {r['ref_std']:.2f} | {r['top1_agreement']:.4f} | {r['ppl_torch']:.3f} "
            f"| {r['ppl_llama_cpp']:.3f} |"
        )
    print(f"llama.cpp tokenizer == HF tokenizer on the first 20,000 characters: {same_tokens}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "same_tokens": same_tokens}, indent=2))


if __name__ == "__main__":
    main()
