"""A saved Jasper folder (jasper.Jasper.save_pretrained) as a sentence-transformers model too: this module writes the
modules sentence-transformers reads next to the folder's own files, and nothing reads them back into a Jasper.

    FOLDER/modules.json, 1_Pooling/, 2_Dense_{width}/ (one per head), 3_Normalize/,
    FOLDER/config_sentence_transformers.json      text -> mean pooling -> FC1 -> normalize, and the prompts

    model.save_pretrained(folder); export.save_sentence_transformer(model, folder, prompts={"query": ...})
    SentenceTransformer(folder).encode(["how do I sort a list?"], prompt_name="query")
"""

import json
from pathlib import Path

from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
from torch import nn

import jasper


def save_sentence_transformer(model: jasper.Jasper, path: str | Path, prompts: dict[str, str]) -> None:
    """Make a folder that model.save_pretrained wrote loadable as `SentenceTransformer(path)` too: text/ ->
    mean pooling -> FC1 as a Dense layer -> normalize, the pipeline of Jasper.embed_text and forward. Every head is
    saved as 2_Dense_{width}, the way the released Stella ships its widths; another head replaces module 2:
    `st[2] = Dense.load(f"{path}/2_Dense_256")`."""
    path = Path(path)
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
