"""Texts and images into the model's batches, and vectors out of it: what training, its held-out checks and evaluate.py
share. Texts are tokenized a chunk at a time, each chunk padded only to its own longest text."""

import contextlib
from collections.abc import Iterable, Iterator

import torch


def tokenize(tokenizer, texts: list[str], max_length: int, device) -> dict[str, torch.Tensor]:
    """The model's text inputs: (B, L) token ids and attention mask, L the longest text (at most max_length)."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}


def text_chunks(tokenizer, texts: list[str], chunk: int, max_length: int, device) -> Iterator[dict[str, torch.Tensor]]:
    """`texts` tokenized `chunk` at a time."""
    for start in range(0, len(texts), chunk):
        yield tokenize(tokenizer, texts[start:start + chunk], max_length, device)


def image_chunks(processor, images: list, chunk: int, device) -> Iterator[dict[str, torch.Tensor]]:
    """`images` preprocessed (resized, normalized) `chunk` at a time: {"pixel_values": (B, 3, S, S)}."""
    for start in range(0, len(images), chunk):
        pixels = processor(images[start:start + chunk], return_tensors="pt")["pixel_values"]
        yield {"pixel_values": pixels.to(device)}


def forward_in_chunks(model, batches: Iterable[dict[str, torch.Tensor]]) -> tuple[dict[int, torch.Tensor], int, int]:
    """The model's vectors for several input batches, one forward pass each, concatenated: {width: (all rows, width)}.
    With gradients on, the graphs of all of them stay alive until the one backward pass. Also returns how many real
    and how many padded tokens the text encoder read (0 and 0 for images and pooled states)."""
    outputs, real, padded = [], 0, 0
    for batch in batches:
        outputs.append(model(**batch))
        if "attention_mask" in batch:
            real, padded = real + int(batch["attention_mask"].sum()), padded + batch["attention_mask"].numel()
    return {width: torch.cat([o[width] for o in outputs]) for width in outputs[0]}, real, padded


@contextlib.contextmanager
def evaluating(model: torch.nn.Module):
    """No gradients and eval mode (no dropout) inside; the model's mode as it was afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def embed(model, batches: Iterable[dict[str, torch.Tensor]]) -> dict[int, torch.Tensor]:
    """{width: (all rows, width)} for several input batches, without gradients, in eval mode."""
    with evaluating(model):
        vectors, _, _ = forward_in_chunks(model, batches)
    return vectors
