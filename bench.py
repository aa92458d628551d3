"""Benchmarks: the relative-similarity loss (dense vs counted), train.py's training step against
sentence-transformers', a stage-3 step's batching, a teacher in bf16 on the CPU, the corpus in memory, and on a GPU
the paper's shapes.

    python bench.py                   # every table below but --gpu; about 10 minutes on a 2-core CPU
    python bench.py --resim           # L_resim forward+backward for m = 32 ... 2048
    python bench.py --step            # train.py's step vs sentence-transformers' distillation step (the same texts)
    python bench.py --train           # the toy student's stage-3 step: padding, grouping, checkpointing
    python bench.py --precision       # all-mpnet-base-v2 in bf16 vs float32 on this CPU: speed and cosine
    python bench.py --corpus          # one rank's memory for a 1M-text corpus: a list of strings vs Arrow
    python bench.py --gpu             # on a GPU: the paper's student step at 512 tokens and 128 texts (MFU,
                                      # memory, with and without checkpointing), L_resim at m = 4096, and
                                      # teacher encoding in bf16 at Stella's and NV-Embed-v2's shapes

Each figure comes from a fresh process, so its peak memory is the computation's own: torch.cuda.max_memory_allocated
on a GPU, the growth of the process's peak resident memory on a CPU. Ratios compare figures taken in the same run;
absolute times on shared machines are noisy.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import jasper

STUDENT_WIDTH, TEACHER_WIDTH = 256, 1152  # a toy MRL head against the toy target
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense tensor-core peak

QWEN2_1_5B = {  # stella_en_1.5B_v5's base (Qwen2-1.5B) shape, random weights
    "model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
    "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151646,
    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
}
MISTRAL_7B = {  # NV-Embed-v2's base (Mistral-7B-v0.1) shape, random weights
    "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 32768,
}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def peak_memory_bytes() -> int:
    """Peak memory so far: allocated on the GPU, or resident (ru_maxrss, in KiB on Linux) on a CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- L_resim

def resim_once(method: str, m: int, repeats: int) -> dict:
    """One (method, m): peak extra memory of the first forward+backward, then the median time."""
    g = torch.Generator().manual_seed(m)
    s = F.normalize(torch.randn(m, STUDENT_WIDTH, generator=g), dim=-1).to(device()).requires_grad_(True)
    t = F.normalize(torch.randn(m, TEACHER_WIDTH, generator=g), dim=-1).to(device())

    def step():
        jasper.resim_loss(s, t, method=method).backward()
        synchronize()

    base = peak_memory_bytes()
    step()
    extra = peak_memory_bytes() - base
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"method": method, "m": m, "seconds": float(np.median(times)), "extra_mb": extra / 2 ** 20}


def resim_table(sizes: list[int], dense_max_m: int, repeats: int) -> str:
    results = {}
    for m in sizes:
        for method in ("dense", "counted") if m <= dense_max_m else ("counted",):
            run = subprocess.run([sys.executable, __file__, "--one-resim", method, str(m), "--repeats", str(repeats)],
                                 capture_output=True, text=True, check=True)
            results[method, m] = json.loads(run.stdout.strip().splitlines()[-1])
            print(f"  {method:7s} m={m:5d}: {results[method, m]['seconds'] * 1e3:9.1f} ms", file=sys.stderr)

    def cell(method, m, key, scale, fmt):
        return fmt.format(results[method, m][key] * scale) if (method, m) in results else "-"
    rows = [f"L_resim forward+backward on {device()} (student {STUDENT_WIDTH}-d, target {TEACHER_WIDTH}-d):", "",
            "| m | pairs N | dense ms | dense extra MB | counted ms | counted extra MB | dense / counted time |",
            "|---|---|---|---|---|---|---|"]
    for m in sizes:
        ratio = (f"{results['dense', m]['seconds'] / results['counted', m]['seconds']:.1f}x"
                 if ("dense", m) in results else "-")
        rows.append(f"| {m} | {m * (m - 1) // 2:,} | {cell('dense', m, 'seconds', 1e3, '{:.1f}')} | "
                    f"{cell('dense', m, 'extra_mb', 1, '{:.0f}')} | {cell('counted', m, 'seconds', 1e3, '{:.1f}')} | "
                    f"{cell('counted', m, 'extra_mb', 1, '{:.0f}')} | {ratio} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- a stage-3 step

def train_once(student: str, max_length: int, batch: int, chunk: int, sort: bool, checkpointing: bool,
               steps: int, layers: int | None) -> dict:
    """Stage-3 steps of the student (every text-side weight and head trains; AdamW): time, tokens,
    padding, peak memory. bf16 autocast on a GPU."""
    import data
    import train
    torch.manual_seed(0)
    dev = device()
    if student == "minilm":  # the toy student on the toy corpus, real tokenizer and texts
        from transformers import AutoTokenizer
        path = data.all_minilm_l6_v2()
        encoder, tokenizer = path, AutoTokenizer.from_pretrained(path)
        texts, kinds = zip(*data.make_corpus(*data.toy_sources(0), 2000, 0))
        texts = data.with_prompts(texts, kinds, data.STELLA_PROMPTS)
        target_width, mrl = TEACHER_WIDTH, [256, 128, 64]
    else:  # the paper's student shape from its config; texts are random ids filling max_length
        encoder = dict(QWEN2_1_5B, **({"num_hidden_layers": layers} if layers else {}))
        tokenizer, texts = None, None
        target_width, mrl = 12288, [1024, 512, 256]
    model = jasper.Jasper(jasper.JasperConfig(text_encoder=encoder, head_dims=[target_width, *mrl])).to(dev)
    jasper.set_trainable(model, 3)
    if checkpointing:
        model.text.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW([w for w in model.parameters() if w.requires_grad], lr=1e-5)
    lengths = np.array([len(text) for text in texts]) if texts else None
    n_params = sum(w.numel() for w in model.text.parameters()) - model.text.get_input_embeddings().weight.numel()

    def one_step(step):
        if texts:
            idx = train.batch_indices(step, batch, len(texts), 0)
            if sort:
                (idx,) = train.rank_slices(idx, lengths, 1)
            batches = train.text_chunks(tokenizer, [texts[i] for i in idx], chunk if sort else batch, max_length, dev)
        else:
            shapes = [(min(chunk, batch - k), max_length) for k in range(0, batch, chunk)]
            batches = ({"input_ids": torch.randint(model.text.config.vocab_size, shape, device=dev),
                        "attention_mask": torch.ones(shape, dtype=torch.long, device=dev)} for shape in shapes)
        vectors, real, padded = train.forward_in_chunks(model, batches)
        target = F.normalize(torch.randn(batch, target_width, device=dev), dim=-1)
        jasper.text_distill_loss(vectors, target)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize()
        return real, padded

    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        one_step(0)  # warm-up: allocator, kernels, optimizer state
        real = padded = 0
        start = time.perf_counter()
        for step in range(1, steps + 1):
            r, p = one_step(step)
            real, padded = real + r, padded + p
        seconds = time.perf_counter() - start
    tokens_per_second = real / seconds
    # MFU from the tokens that carry text: 6 N per token for the weights plus 12 L d T for attention (PaLM, app. B)
    cfg = model.text.config
    flops_per_token = 6 * n_params + 12 * cfg.num_hidden_layers * cfg.hidden_size * (padded / (steps * batch))
    peak = next((f for name, f in PEAK_BF16_FLOPS.items() if name in torch.cuda.get_device_name()), None) \
        if dev.type == "cuda" else None
    return {"tokens_per_second": tokens_per_second, "padding": 1 - real / padded,
            "peak_mb": peak_memory_bytes() / 2 ** 20,  # the whole process's: weights, optimizer, activations
            "mfu": tokens_per_second * flops_per_token / peak if peak else None,
            "seconds_per_step": seconds / steps}


def train_table(args) -> str:
    configs = [("random order, one forward pass", False, args.batch, False),
               (f"length-sorted, chunks of {args.chunk}", True, args.chunk, False),
               (f"length-sorted, chunks of {args.chunk}, gradient checkpointing", True, args.chunk, True)]
    if args.student != "minilm":  # fixed-length random ids: no padding to group
        configs = [(f"chunks of {args.chunk}", False, args.chunk, False),
                   (f"chunks of {args.chunk}, gradient checkpointing", False, args.chunk, True)]
    rows = [f"stage-3 step, {args.student} student, batch {args.batch}, max length {args.max_length}, on {device()}"
            + (" (bf16 autocast)" if device().type == "cuda" else " (float32)") + ":", "",
            "| batching | padding | tokens/s | s/step | peak memory MB | MFU |", "|---|---|---|---|---|---|"]
    for name, sort, chunk, checkpointing in configs:
        spec = json.dumps(dict(student=args.student, max_length=args.max_length, batch=args.batch, chunk=chunk,
                               sort=sort, checkpointing=checkpointing, steps=args.steps, layers=args.layers))
        run = subprocess.run([sys.executable, __file__, "--one-train", spec], capture_output=True, text=True)
        if run.returncode:  # e.g. out of memory without checkpointing: a result, not an error
            rows.append(f"| {name} | failed: {run.stderr.strip().splitlines()[-1][:120]} | | | | |")
            continue
        r = json.loads(run.stdout.strip().splitlines()[-1])
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        rows.append(f"| {name} | {r['padding']:.0%} | {r['tokens_per_second']:,.0f} | {r['seconds_per_step']:.2f} | "
                    f"{r['peak_mb']:,.0f} | {mfu} |")
        print(f"  {name}: {r['tokens_per_second']:,.0f} tokens/s", file=sys.stderr)
    return "\n".join(rows)


# ----------------------------------------------------------------------------- train.py's step against sentence-transformers'

STEP_KINDS = {
    "train.py": "train.py's stage-3 step: fused AdamW, ZeRO-0 on one process",
    "train.py before": "the same step as it was: torch's AdamW, ZeRO-2 on one process",
    "sentence-transformers": "sentence-transformers' distillation: MSELoss to the target through a Dense layer",
}


def step_once(kind: str, batch: int, steps: int) -> dict:
    """Median seconds of a training step of the toy student on toy texts (the toy corpus's first 2,000), every weight
    training, in one process. train.py's kinds run its own pieces (TextStage.loss on a corpus file and a cache of
    target vectors, engine.backward, engine.step); sentence-transformers' is its trainer's step written out (the
    Trainer itself needs accelerate, which nothing else here does): its model with a Dense layer to the target width,
    tokenize, MSELoss, backward, clipping, AdamW, on the same texts, batches and target width. The targets are random unit vectors: a step's cost does not depend on their values."""
    import tempfile
    import data
    import presets
    import teachers
    import train
    torch.manual_seed(0)
    p = presets.load("toy")
    rows = data.make_corpus(*data.toy_sources(0), 2000, 0)
    rng = np.random.default_rng(0)
    targets = F.normalize(torch.from_numpy(rng.standard_normal((len(rows), TEACHER_WIDTH))).float(), dim=-1)
    times = []
    if kind == "sentence-transformers":
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.losses import MSELoss
        from sentence_transformers.sentence_transformer.modules import Dense
        model = SentenceTransformer(data.all_minilm_l6_v2(), device="cpu")
        model.max_seq_length = p.max_length
        model.append(Dense(model.get_embedding_dimension(), TEACHER_WIDTH, activation_function=torch.nn.Identity()))
        model.train()
        texts = data.with_prompts(*zip(*rows), p.prompts)
        loss = MSELoss(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=p.stages[3].lr)
        for step in range(steps + 3):
            start = time.perf_counter()
            idx = train.batch_indices(step, batch, len(rows), 0)
            features = model.preprocess([texts[i] for i in idx])
            loss([features], targets[idx]).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
    else:
        from transformers import AutoTokenizer
        import deepspeed
        with tempfile.TemporaryDirectory() as out:
            out = Path(out)
            data.save_corpus(rows, out / "corpus.arrow")
            corpus = data.Corpus(out / "corpus.arrow")
            record = {"name": "target", "model": "random", "identity": "random", "dim": TEACHER_WIDTH, "prompts": {},
                      "append_eos": False}
            cache = teachers.TeacherCache.create(out / "teachers", corpus.hashes, [record], chunk_rows=len(rows))
            cache.fill(corpus, {"target": lambda texts, kinds: targets.numpy()})
            rank, world = train.setup_distributed()
            model = jasper.Jasper(jasper.JasperConfig(text_encoder=p.student, head_dims=[TEACHER_WIDTH, *p.mrl_dims]))
            tokenizer = AutoTokenizer.from_pretrained(p.student)
            tokenizer.padding_side = "right"
            train.prepare_for_stage(model, 3, p, torch.device("cpu"))
            plan = replace(p.stages[3], batch_size=batch, steps=steps + 3)
            if kind == "train.py":
                engine, _ = train.deepspeed_engine(model, plan, p, world, torch.device("cpu"))
            else:
                optimizer = torch.optim.AdamW([w for w in model.parameters() if w.requires_grad], lr=plan.lr)
                engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config={
                    "train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
                    "zero_optimization": {"stage": 2}, "steps_per_print": 10 ** 9})
            task = train.TextStage(corpus, cache, tokenizer, p, torch.device("cpu"), "target", reuse_pooled=False)
            for step in range(steps + 3):
                start = time.perf_counter()
                parts, _ = task.loss(engine, train.batch_indices(step, batch, len(rows), 0), rank, world)
                engine.backward(parts["loss"])
                engine.step()
                times.append(time.perf_counter() - start)
    return {"kind": kind, "seconds_per_step": float(np.median(times[3:]))}


def step_table(batch: int, steps: int) -> str:
    results = {}
    for kind in STEP_KINDS:
        spec = json.dumps(dict(kind=kind, batch=batch, steps=steps))
        run = subprocess.run([sys.executable, __file__, "--one-step", spec], capture_output=True, text=True, check=True)
        results[kind] = json.loads(run.stdout.strip().splitlines()[-1])["seconds_per_step"]
        print(f"  {kind}: {results[kind]:.2f} s/step", file=sys.stderr)
    rows = [f"A training step of the toy student (all weights) on {batch} toy texts, one process on {device()}, the "
            f"median of {steps} steps; ratio = s/step over sentence-transformers' s/step:", "",
            "| step | s/step | ratio |", "|---|---|---|"]
    rows += [f"| {STEP_KINDS[k]} | {seconds:.2f} | {seconds / results['sentence-transformers']:.2f} |"
             for k, seconds in results.items()]
    return "\n".join(rows)


# ----------------------------------------------------------------------------- teacher encoding in bf16 on a CPU

def teacher_precision_once(texts: int) -> dict:
    """all-mpnet-base-v2 (the toy's costlier teacher) on toy corpus texts in float32 and in bf16 on this CPU: the
    texts per second of each and the cosine between their vectors (what the cache would store)."""
    import data
    from sentence_transformers import SentenceTransformer
    corpus_texts = [t for t, _ in data.make_corpus(*data.toy_sources(0), texts, 0)]
    result = {}
    for name, dtype in (("float32", torch.float32), ("bf16", torch.bfloat16)):
        model = SentenceTransformer(data.all_mpnet_base_v2(), device="cpu", model_kwargs={"torch_dtype": dtype})
        model.max_seq_length = 128
        model.encode(corpus_texts[:16], batch_size=16)
        start = time.perf_counter()
        vectors = model.encode(corpus_texts, batch_size=16, convert_to_tensor=True).float()
        result[name] = (vectors, len(corpus_texts) / (time.perf_counter() - start))
    cosines = F.cosine_similarity(result["float32"][0], result["bf16"][0])
    return {"float32_per_second": result["float32"][1], "bf16_per_second": result["bf16"][1],
            "min_cosine": float(cosines.min()), "mean_cosine": float(cosines.mean())}


def teacher_precision_table(texts: int) -> str:
    run = subprocess.run([sys.executable, __file__, "--one-precision", str(texts)], capture_output=True, text=True,
                         check=True)
    r = json.loads(run.stdout.strip().splitlines()[-1])
    return "\n".join([
        f"all-mpnet-base-v2 encoding {texts} toy texts on {device()} in batches of 16:", "",
        "| precision | texts/s | speed vs float32 | cosine to float32 (min / mean) |", "|---|---|---|---|",
        f"| float32 | {r['float32_per_second']:.1f} | 1.00x | 1 |",
        f"| bf16 | {r['bf16_per_second']:.1f} | {r['bf16_per_second'] / r['float32_per_second']:.2f}x | "
        f"{r['min_cosine']:.5f} / {r['mean_cosine']:.5f} |"])


# ----------------------------------------------------------------------------- teacher encoding at the paper's shapes

def teacher_once(shape: str, batch: int, length: int, steps: int, layers: int | None) -> dict:
    """A teacher's forward pass (no gradient) at its base model's shape, bf16 on a GPU, full-length inputs:
    what encoding the corpus costs per token (the pooling and the Dense module are negligible)."""
    from transformers import MODEL_MAPPING, AutoConfig
    fields = dict({"stella": QWEN2_1_5B, "nv-embed": MISTRAL_7B}[shape], **({"num_hidden_layers": layers} if layers else {}))
    config = AutoConfig.for_model(**fields)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = MODEL_MAPPING[type(config)]._from_config(config, attn_implementation="sdpa", torch_dtype=dtype).to(device()).eval()
    ids = torch.randint(config.vocab_size, (batch, length), device=device())
    mask = torch.ones_like(ids)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            model(input_ids=ids, attention_mask=mask)
        synchronize()
    seconds = (time.perf_counter() - start) / steps
    return {"shape": shape, "texts_per_second": batch / seconds, "tokens_per_second": batch * length / seconds,
            "peak_mb": peak_memory_bytes() / 2 ** 20}


def teacher_table(batch: int, length: int, steps: int, layers: int | None, n_texts: int = 8_000_000,
                  mean_tokens: int = 215) -> str:
    rows = [f"Teacher encoding on {device()} ({'bf16' if torch.cuda.is_available() else 'float32'}), batches of "
            f"{batch} texts of {length} tokens; the last column scales to {n_texts:,} texts of {mean_tokens} tokens "
            f"on average (the paper's mix, README) on 8 such devices:", "",
            "| teacher shape | texts/s | tokens/s | peak memory MB | hours for the corpus on 8 devices |", "|---|---|---|---|---|"]
    for shape in ("stella", "nv-embed"):
        spec = json.dumps(dict(shape=shape, batch=batch, length=length, steps=steps, layers=layers))
        run = subprocess.run([sys.executable, __file__, "--one-teacher", spec], capture_output=True, text=True)
        if run.returncode:
            rows.append(f"| {shape} | failed: {run.stderr.strip().splitlines()[-1][:120]} | | | |")
            continue
        r = json.loads(run.stdout.strip().splitlines()[-1])
        hours = n_texts * mean_tokens / r["tokens_per_second"] / 8 / 3600
        rows.append(f"| {shape} | {r['texts_per_second']:,.1f} | {r['tokens_per_second']:,.0f} | {r['peak_mb']:,.0f} | {hours:.1f} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- the corpus in memory

def memory_status() -> dict[str, int]:
    """This process's peak resident memory and its current private (anon) and file-backed parts, in bytes."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith(("VmHWM", "RssAnon", "RssFile")))
    return {k: int(v.split()[0]) * 1024 for k, v in fields.items()}


def synthetic_corpus(folder: Path, n: int) -> tuple[Path, Path]:
    """n texts of 50-1,000 words drawn from a fixed vocabulary, 20% queries: as the old JSON-lines file (one
    prompted string per line) and as the Arrow file the corpus is now."""
    import data
    rng = np.random.default_rng(0)
    words = np.array([f"w{k}" for k in range(5000)])

    def rows():
        for length in rng.integers(50, 1000, size=n):
            yield " ".join(words[rng.integers(0, len(words), size=length)]), "query" if rng.random() < 0.2 else "passage"
    arrow, jsonl = folder / "corpus.arrow", folder / "texts.jsonl"
    if not arrow.is_file():
        data.save_corpus(rows(), arrow)
        with jsonl.open("w") as f:
            corpus = data.Corpus(arrow)
            for text in corpus.prompted(np.arange(len(corpus)), data.STELLA_PROMPTS):
                f.write(json.dumps(text) + "\n")
    return jsonl, arrow


def corpus_once(kind: str, path: str) -> dict:
    """What one rank holds after opening the corpus, the length of every text, and one batch of 1,024 texts."""
    base = memory_status()
    start = time.perf_counter()
    if kind == "list":  # before: the whole corpus as a Python list of strings, as every rank held it
        texts = [json.loads(line) for line in open(path)]
        lengths = np.array([len(t) for t in texts])
        batch = [texts[i] for i in np.random.default_rng(0).integers(0, len(texts), 1024)]
    else:
        import data
        corpus = data.Corpus(path)
        lengths = corpus.lengths
        batch = corpus.texts(np.random.default_rng(0).integers(0, len(corpus), 1024))
    seconds = time.perf_counter() - start
    now = memory_status()
    assert len(batch) == 1024 and len(lengths) > 0
    return {"kind": kind, "seconds": seconds, "peak_mb": (now["VmHWM"] - base["VmHWM"]) / 2 ** 20,
            "anon_mb": (now["RssAnon"] - base["RssAnon"]) / 2 ** 20, "file_mb": (now["RssFile"] - base["RssFile"]) / 2 ** 20}


def corpus_table(n: int, folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    jsonl, arrow = synthetic_corpus(folder, n)
    rows = [f"One rank opening a synthetic corpus of {n:,} texts ({jsonl.stat().st_size / 2 ** 30:.2f} GB as JSON "
            f"lines, {arrow.stat().st_size / 2 ** 30:.2f} GB as Arrow), taking every length and a batch of 1,024 texts:", "",
            "| corpus | seconds | peak memory growth MB | private (anon) MB | file pages MB (shared by the ranks) |",
            "|---|---|---|---|---|"]
    for kind, path, name in (("list", jsonl, "before: JSON lines -> a list of strings"),
                             ("arrow", arrow, "now: Arrow file, memory-mapped")):
        run = subprocess.run([sys.executable, __file__, "--one-corpus", kind, str(path)], capture_output=True, text=True,
                             check=True)
        r = json.loads(run.stdout.strip().splitlines()[-1])
        rows.append(f"| {name} | {r['seconds']:.1f} | {r['peak_mb']:,.0f} | {r['anon_mb']:,.0f} | {r['file_mb']:,.0f} |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resim", action="store_true", help="only the L_resim table")
    ap.add_argument("--train", action="store_true", help="only the training-step table (padding, checkpointing)")
    ap.add_argument("--step", action="store_true", help="only train.py's step against sentence-transformers'")
    ap.add_argument("--precision", action="store_true", help="only the teacher in bf16 against float32 on this CPU")
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024, 2048])
    ap.add_argument("--dense-max-m", type=int, default=128, help="largest m for the dense L_resim (m=256 needs ~14 GB)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--student", default="minilm", choices=["minilm", "qwen2-1.5b"])
    ap.add_argument("--layers", type=int, help="qwen2-1.5b with fewer layers (a quick check of the code path)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--corpus", action="store_true", help="only the corpus memory table")
    ap.add_argument("--corpus-texts", type=int, default=1_000_000)
    ap.add_argument("--corpus-dir", type=Path, default=Path("runs/bench-corpus"))
    ap.add_argument("--one-resim", nargs=2, metavar=("METHOD", "M"), help=argparse.SUPPRESS)
    ap.add_argument("--one-corpus", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--gpu", action="store_true", help="the paper-scale figures (README); meant for a GPU")
    ap.add_argument("--one-teacher", metavar="JSON", help=argparse.SUPPRESS)
    ap.add_argument("--one-train", metavar="JSON", help=argparse.SUPPRESS)
    ap.add_argument("--one-step", metavar="JSON", help=argparse.SUPPRESS)
    ap.add_argument("--one-precision", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one_resim:
        print(json.dumps(resim_once(args.one_resim[0], int(args.one_resim[1]), args.repeats)))
    elif args.one_train:
        print(json.dumps(train_once(**json.loads(args.one_train))))
    elif args.one_corpus:
        print(json.dumps(corpus_once(*args.one_corpus)))
    elif args.one_teacher:
        print(json.dumps(teacher_once(**json.loads(args.one_teacher))))
    elif args.one_step:
        print(json.dumps(step_once(**json.loads(args.one_step))))
    elif args.one_precision:
        print(json.dumps(teacher_precision_once(args.one_precision)))
    elif args.gpu:  # one short script of every GPU figure the README asks for; --layers shrinks it for a check
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (a check of the script only)"
        print(f"device: {name}\n")
        args.student, args.max_length, args.batch, args.chunk = "qwen2-1.5b", 512, 128, 16
        print(train_table(args) + "\n")
        print(resim_table([1024, 4096], dense_max_m=0, repeats=args.repeats) + "\n")
        print(teacher_table(32, 512, args.steps, args.layers))
    else:
        every = not (args.resim or args.train or args.step or args.precision or args.corpus)
        if args.resim or every:
            print(resim_table(args.sizes, args.dense_max_m, args.repeats) + "\n")
        if args.step or every:
            print(step_table(args.batch, steps=12) + "\n")
        if args.train or every:
            print(train_table(args) + "\n")
        if args.precision or every:
            print(teacher_precision_table(320) + "\n")
        if args.corpus or every:
            print(corpus_table(args.corpus_texts, args.corpus_dir))


if __name__ == "__main__":
    main()
