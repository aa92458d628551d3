"""Saving and loading a Jasper (jasper.py): one folder that jasper.Jasper.from_pretrained loads exactly and that
sentence-transformers also loads as a text embedding model.

    FOLDER/text/                 the language model and its tokenizer (a transformers folder)
    FOLDER/vision/               the vision encoder and its preprocessing, once stage 4 has added them
    FOLDER/jasper.safetensors    the FC heads, and the pooler's weights where it has any
    FOLDER/jasper_config.json    jasper.JasperConfig, with text/ and vision/ as the encoders
    FOLDER/modules.json, 1_Pooling/, 2_Dense_{width}/ (one per head), 3_Normalize/,
    FOLDER/config_sentence_transformers.json      text -> mean pooling -> FC1 -> normalize, and the prompts
"""

import json
from dataclasses import asdict, replace
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

import jasper


def save(model: jasper.Jasper, path: str | Path, prompts: dict[str, str] | None = None) -> None:
    """Write `model` to `path` (layout above); `prompts` (e.g. {"query": ...}) go to the sentence-transformers
    config, where encode(..., prompt_name="query") finds them."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.text.save_pretrained(path / "text")
    if model.vision is not None:
        model.vision.save_pretrained(path / "vision")
    own = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith(("text.", "vision."))}
    save_file(own, path / "jasper.safetensors")
    config = replace(model.config, text_encoder="text", vision_encoder=None if model.vision is None else "vision")
    (path / "jasper_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    save_sentence_transformer_modules(model, path, prompts or {})


def save_sentence_transformer_modules(model: jasper.Jasper, path: Path, prompts: dict[str, str]) -> None:
    """Make `path` loadable as `SentenceTransformer(path)`: text/ (the encoder; its tokenizer goes there too) ->
    mean pooling -> FC1 as a Dense layer -> normalize, the pipeline of Jasper.embed_text and forward. Every head is
    saved as 2_Dense_{width}, the way the released Stella ships its widths; another head replaces module 2:
    `st[2] = Dense.load(f"{path}/2_Dense_256")`."""
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
    saved = {"1_Pooling": Pooling(model.text.config.hidden_size, "mean"), "3_Normalize": Normalize()}
    for width, head in model.heads.items():
        saved[f"2_Dense_{width}"] = Dense(head.in_features, head.out_features, activation_function=nn.Identity())
        saved[f"2_Dense_{width}"].linear.load_state_dict(head.state_dict())
    for folder, module in saved.items():
        (path / folder).mkdir(exist_ok=True)
        module.save(str(path / folder))
    modules = [(Transformer, "text"), (Pooling, "1_Pooling"), (Dense, f"2_Dense_{model.config.head_dims[0]}"),
               (Normalize, "3_Normalize")]
    (path / "modules.json").write_text(json.dumps(
        [{"idx": k, "name": str(k), "path": folder, "type": f"{module.__module__}.{module.__qualname__}"}
         for k, (module, folder) in enumerate(modules)], indent=2) + "\n")
    (path / "config_sentence_transformers.json").write_text(json.dumps(
        {"model_type": "SentenceTransformer", "prompts": prompts, "default_prompt_name": None,
         "similarity_fn_name": "cosine"}, indent=2) + "\n")


def load(path: str | Path) -> jasper.Jasper:
    """The model `save` wrote to `path`, exactly."""
    path = Path(path)
    if not (path / "jasper_config.json").is_file():
        raise FileNotFoundError(f"{path} has no jasper_config.json; is it a Jasper.save_pretrained folder?")
    fields = json.loads((path / "jasper_config.json").read_text())
    fields["text_encoder"] = str(path / fields["text_encoder"])
    if fields["vision_encoder"] is not None:
        fields["vision_encoder"] = str(path / fields["vision_encoder"])
    model = jasper.Jasper(jasper.JasperConfig(**fields))
    missing, unexpected = model.load_state_dict(load_file(path / "jasper.safetensors"), strict=False)
    missing = [k for k in missing if not k.startswith(("text.", "vision."))]
    if missing or unexpected:
        raise ValueError(f"{path}/jasper.safetensors does not match jasper_config.json: "
                         f"missing {missing}, unexpected {unexpected}")
    return model
