"""The paper preset's code path, rehearsed offline on a CPU: small local stand-ins for every model and data
source it reads from the hub, in the same formats, so the same loaders and the same training code run.

    bash run_rehearsal.sh runs/rehearsal      # this, then stages 1-4 on 2 ranks (gloo) and the evaluation

`python rehearsal.py DIR` writes
    DIR/models/stella      a Qwen2 with Stella v5's shape scaled down (random weights), both the student and a
                           Stella-like teacher: a sentence-transformers folder whose modules.json loads its
                           2_Dense_16 module, with 2_Dense_32 and 2_Dense_64 beside it (Stella: 1024 ... 8192)
    DIR/models/nv_embed    a Mistral (NV-Embed-v2's base) scaled down, mean pooling that leaves the prompt out,
                           a 32-d Dense module and Normalize (NV-Embed-v2: 4096-d)
    DIR/sources/jasper/data/*.parquet   real English text (the toy recipe) in the format of the authors' released
                           distillation texts (infgrad/jasper_text_distill_dataset: parquet, a "text" column)
    DIR/sources/infinity-mm/*.tar   drawn image-caption pairs in Infinity-MM's webdataset layout
    DIR/preset.json        {"base": "paper", ...}: the paper preset pointed at these, sizes scaled down

The target is 32 + 64 = 96 wide (paper: 4096 + 8192 = 12288), the max length 512 as in the paper; stage 4 pools
the 6 x 6 = 36 patch tokens to 20 image tokens without weights, as the release pools 729 to 300.
"""

import argparse
import io
import json
import tarfile
from pathlib import Path

import torch

import data
import toy_data

# Stella v5 (Qwen2-1.5B): hidden 1536, 28 layers, 12 heads, 2 key-value heads, MLP 8960; here about 1/24 wide
STELLA_SHAPE = dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=384, max_position_embeddings=1024)
NV_EMBED_SHAPE = dict(model_type="mistral", hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=160, max_position_embeddings=1024)
STELLA_WIDTHS, STELLA_DEFAULT, NV_EMBED_WIDTH = (16, 32, 64), 16, 32


# Qwen2's tokenizer pipeline (transformers' Qwen2Tokenizer): NFC, this split, then bytes as characters
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def qwen2_style_tokenizer(folder: Path, vocab_size: int = 4096) -> int:
    """A byte-level BPE tokenizer with Qwen2's pipeline, trained on the toy text (no Qwen vocabulary ships
    offline), saved so that transformers 4.x and 5.x load it alike. Returns its vocabulary size."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    documents, queries = toy_data.toy_sources(seed=0)
    tokenizer.train_from_iterator(documents + queries, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    saved = json.loads(tokenizer.to_str())
    # tokenizers 0.19's form of the merges
    saved["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in saved["model"]["merges"]]
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "tokenizer.json", saved)
    write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "unk_token": None, "model_max_length": 32768, "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"]})
    return tokenizer.get_vocab_size()


def encoder_folder(folder: Path, shape: dict, seed: int) -> Path:
    """A transformers model of this shape with random weights and a Qwen2-style tokenizer."""
    from transformers import MODEL_MAPPING, AutoConfig
    vocab_size = qwen2_style_tokenizer(folder)
    config = AutoConfig.for_model(**shape, vocab_size=vocab_size, pad_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    MODEL_MAPPING[type(config)](config).save_pretrained(folder)
    return folder


def sentence_transformer_folder(folder: Path, hidden: int, dense_widths: tuple[int, ...], default: int | None,
                                normalize: bool, include_prompt: bool = True, seed: int = 0) -> Path:
    """Make the transformers model in `folder` a sentence-transformers model: mean pooling, one Dense module per
    width (2_Dense_{width}: random weights, identity activation) of which modules.json loads `default`, then
    Normalize if asked. This is the layout of Stella v5's repository, written in the file formats it uses
    (sentence-transformers 2.x), which every version reads."""
    from safetensors.torch import save_file
    torch.manual_seed(seed)
    (folder / "1_Pooling").mkdir(parents=True, exist_ok=True)
    modes = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")
    write_json(folder / "1_Pooling" / "config.json", {"word_embedding_dimension": hidden,
                                                      "include_prompt": include_prompt,
                                                      **{f"pooling_mode_{m}": m == "mean_tokens" for m in modes}})
    for width in dense_widths:
        dense = folder / f"2_Dense_{width}"
        dense.mkdir(exist_ok=True)
        write_json(dense / "config.json", {"in_features": hidden, "out_features": width, "bias": True,
                                           "activation_function": "torch.nn.modules.linear.Identity"})
        linear = torch.nn.Linear(hidden, width)
        weights = {f"linear.{k}": v.detach().contiguous() for k, v in linear.state_dict().items()}
        save_file(weights, dense / "model.safetensors")
        torch.save(weights, dense / "pytorch_model.bin")  # what sentence-transformers 2.x reads
    modules = [("Transformer", ""), ("Pooling", "1_Pooling")]
    modules += [("Dense", f"2_Dense_{default}")] if default else []
    modules += [("Normalize", "3_Normalize")] if normalize else []
    write_json(folder / "modules.json", [{"idx": k, "name": str(k), "path": path,
                                          "type": f"sentence_transformers.models.{kind}"}
                                         for k, (kind, path) in enumerate(modules)])
    write_json(folder / "sentence_bert_config.json", {"max_seq_length": 512, "do_lower_case": False})
    return folder


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def stella_like(folder: Path, widths: tuple[int, ...] = STELLA_WIDTHS, default: int = STELLA_DEFAULT) -> Path:
    """A Stella-v5-shaped teacher folder whose default module gives `default`-d vectors, wider ones beside it."""
    encoder_folder(folder, STELLA_SHAPE, seed=1)
    return sentence_transformer_folder(folder, STELLA_SHAPE["hidden_size"], widths, default, normalize=False)


def nv_embed_like(folder: Path, width: int = NV_EMBED_WIDTH) -> Path:
    encoder_folder(folder, NV_EMBED_SHAPE, seed=2)
    return sentence_transformer_folder(folder, NV_EMBED_SHAPE["hidden_size"], (width,), width, normalize=True,
                                       include_prompt=False, seed=2)


def webdataset_tar(path: Path, pairs) -> Path:
    """Image-caption pairs as a tar in Infinity-MM's layout: NNNNN.png + NNNNN.json whose conversation's model
    turn ("gpt") is the caption."""
    with tarfile.open(path, "w") as tar:
        for k, (image, caption) in enumerate(pairs):
            png = io.BytesIO()
            image.save(png, "PNG")
            record = {"id": str(k), "source": "rehearsal", "image": f"/images/{k}.png",
                      "conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                                        {"from": "gpt", "value": caption}]}
            for name, payload in ((f"{k:05d}.png", png.getvalue()), (f"{k:05d}.json", json.dumps(record).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


def write_sources(folder: Path, n_texts: int, n_pairs: int, image_size: int) -> None:
    """Real text in the format of the authors' released texts, and drawn image-caption pairs in Infinity-MM's."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    texts = [text for text, _ in toy_data.toy_corpus(n_texts, seed=0)]
    (folder / "jasper" / "data").mkdir(parents=True, exist_ok=True)
    for part, rows in enumerate((texts[:n_texts // 2], texts[n_texts // 2:])):
        pq.write_table(pa.table({"text": rows}), folder / "jasper" / "data" / f"train-{part:05d}-of-00002.parquet")
    (folder / "infinity-mm").mkdir(parents=True, exist_ok=True)
    scenes = toy_data.ShapeScenes(n_pairs, seed=0, size=image_size)
    webdataset_tar(folder / "infinity-mm" / "00000.tar", (scenes[i] for i in range(n_pairs)))


def make(out: Path) -> Path:
    """Every stand-in and DIR/preset.json; returns the preset file."""
    models, sources = out / "models", out / "sources"
    stella, nv_embed = stella_like(models / "stella"), nv_embed_like(models / "nv_embed")
    vision = dict(model_type="siglip_vision_model", image_size=48, patch_size=8, hidden_size=32,
                  intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)  # a 6 x 6 patch grid
    write_sources(sources, n_texts=240, n_pairs=120, image_size=vision["image_size"])
    preset = {"base": "paper", "student": str(stella),
              "teachers": [{"name": "nv_embed_v2", "model": str(nv_embed), "dim": NV_EMBED_WIDTH,
                            "prompts": data.STELLA_PROMPTS, "append_eos": True},
                           {"name": "stella", "model": str(stella), "dim": max(STELLA_WIDTHS),
                            "prompts": data.STELLA_PROMPTS}],
              "corpus": f"jasper:{sources / 'jasper'}", "n_texts": 240, "heldout": 48, "mrl_dims": [48, 24, 12],
              "stages": {str(s): {"batch_size": 16, "steps": 4, "schedule_steps": None} for s in (1, 2, 3, 4)},
              "loss_batches": 4,  # on 2 ranks: each computes 2 loss batches a step, accumulated
              "checkpoint_every": 2, "log_every": 1, "forward_chunk": 4, "teacher_batch": 16, "chunk_rows": 64,
              "vision_encoder": vision, "image_tokens": 20, "captions": str(sources / "infinity-mm"),
              "n_pairs": 120, "heldout_pairs": 40}
    path = out / "preset.json"
    path.write_text(json.dumps(preset, indent=2) + "\n")
    return path


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    print(make(ap.parse_args().out))
