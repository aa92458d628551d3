"""Benchmarks: the relative-similarity loss (dense vs counted), train.py's training step against
sentence-transformers', its stage-3 step's batching and memory settings, the memory plan against a measured step, a
teacher in bf16 on the CPU, the corpus in memory, and on a GPU the paper's shapes.

    python bench.py                   # every table below but --gpu; about 15 minutes on a 2-core CPU
    python bench.py --resim           # L_resim forward+backward for m = 32 ... 2048
    python bench.py --step            # train.py's step vs sentence-transformers' distillation step (the same texts)
    python bench.py --train           # the toy's stage-3 step: chunks, activation checkpointing, cached gradients
    python bench.py --memory          # the memory plan's peak against a measured step (2 layers of Qwen2-1.5B)
    python bench.py --precision       # all-mpnet-base-v2 in bf16 vs float32 on this CPU: speed and cosine
    python bench.py --corpus          # one rank's memory for a 1M-text corpus: a list of strings vs Arrow
    python bench.py --gpu             # on a GPU: the paper's student step at 512 tokens and 128 texts (MFU,
                                      # memory by setting, and the plan's figure beside it), L_resim at m = 4096,
                                      # teacher encoding in bf16 at Stella's and NV-Embed-v2's shapes

Each figure comes from a fresh process, so its peak memory is the computation's own: torch.cuda.max_memory_allocated
on a GPU, the growth of the process's peak resident memory on a CPU. Ratios compare figures taken in the same run;
absolute times on shared machines are noisy.
"""

import argparse
import json
import os
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
MISTRAL_7B = {  # NV-Embed-v2's base (Mistral-7B-v0.1) shape, random weights
    "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 32768,
}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def memory_status() -> dict[str, int]:
    """This process's peak resident memory and its current private (anon) and file-backed parts, in bytes."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status")
                  if line.startswith(("VmHWM", "VmRSS", "RssAnon", "RssFile")))
    return {k: int(v.split()[0]) * 1024 for k, v in fields.items()}


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

    Path("/proc/self/clear_refs").write_text("5") if device().type == "cpu" else torch.cuda.reset_peak_memory_stats()
    base = memory_status()["VmRSS"] if device().type == "cpu" else torch.cuda.memory_allocated()
    step()
    extra = (memory_status()["VmHWM"] if device().type == "cpu" else torch.cuda.max_memory_allocated()) - base
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

    def figure(method, m, key, scale, fmt):
        return fmt.format(results[method, m][key] * scale) if (method, m) in results else "-"
    rows = [f"L_resim forward+backward on {device()} (student {STUDENT_WIDTH}-d, target {TEACHER_WIDTH}-d):", "",
            "| m | text pairs P | dense ms | dense extra MB | counted ms | counted extra MB | dense / counted time |",
            "|---|---|---|---|---|---|---|"]
    for m in sizes:
        ratio = (f"{results['dense', m]['seconds'] / results['counted', m]['seconds']:.1f}x"
                 if ("dense", m) in results else "-")
        rows.append(f"| {m} | {m * (m - 1) // 2:,} | {figure('dense', m, 'seconds', 1e3, '{:.1f}')} | "
                    f"{figure('dense', m, 'extra_mb', 1, '{:.0f}')} | "
                    f"{figure('counted', m, 'seconds', 1e3, '{:.1f}')} | "
                    f"{figure('counted', m, 'extra_mb', 1, '{:.0f}')} | {ratio} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- train.py's step, as it runs

def long_texts(n: int, words: int, seed: int = 0) -> list[tuple[str, str]]:
    """n passages of `words` words each, strung together from the toy corpus: every one fills 512 tokens."""
    import toy_data
    pool = " ".join(text for text, _ in toy_data.toy_corpus(2000, seed)).split()
    rng = np.random.default_rng(seed)
    return [(" ".join(pool[start:start + words]), "passage") for start in rng.integers(0, len(pool) - words, n)]


def student_folder(folder: Path, shape: dict) -> str:
    """A transformers model of this shape (random weights, its real vocabulary size) with a Qwen2-style tokenizer."""
    from transformers import MODEL_MAPPING, AutoConfig

    import rehearsal
    if not (folder / "config.json").is_file():
        rehearsal.qwen2_style_tokenizer(folder)
        config = AutoConfig.for_model(**shape, pad_token_id=0, eos_token_id=0)
        MODEL_MAPPING[type(config)](config).save_pretrained(folder)
    return str(folder)


def run_folder(out: Path, student: str, texts: list[tuple[str, str]], stage: int, target_width: int, **changes):
    """A train.py --out folder for `stage` with what it reads, but random unit vectors as the teachers' target (a
    step's cost does not depend on their values): the corpus, the cache, the previous stage's model. Returns the preset
    that reads it: the toy's, with one teacher as wide as the target."""
    from transformers import AutoTokenizer

    import data
    import presets
    import teachers
    preset = replace(presets.load("toy"), student=student, n_texts=len(texts), heldout=0,
                     teachers=(presets.Teacher("target", "random", target_width),), **changes)
    data.save_corpus(texts, out / "data" / "corpus.arrow")
    corpus = data.Corpus(out / "data" / "corpus.arrow")
    targets = F.normalize(torch.randn(len(texts), target_width, generator=torch.Generator().manual_seed(0)), dim=-1)
    cache = teachers.TeacherCache.create(out / "teachers", corpus.hashes,
                                         [teachers.teacher_record(preset.teachers[0], target_width)],
                                         chunk_rows=len(texts), max_length=preset.max_length)
    cache.fill(corpus, {"target": lambda batch, kinds: targets.numpy()})
    if stage > 1:
        jasper.Jasper(jasper.JasperConfig(text_encoder=student, head_dims=[target_width])).save_pretrained(
            out / f"stage{stage - 1}")
        AutoTokenizer.from_pretrained(student).save_pretrained(out / f"stage{stage - 1}" / "text")
    return preset


def train_py_steps(out: Path, preset, stage: int, plan, steps: int) -> dict:
    """`steps` of train.py's own step (TextStage, its DeepSpeed engine, train_step), after one that warms up: the
    median seconds a step, tokens a second, the share of padding, and the growth of this process's peak memory from
    just before the student loads (on a CPU its resident memory: run it with MALLOC_MMAP_THRESHOLD_ set, so that glibc
    hands every large tensor back to the system when it is freed, as --one-train does)."""
    import types

    import memory_plan
    import train
    layout = train.setup_distributed(preset.loss_batches, plan.batch_size)
    args = types.SimpleNamespace(out=out, seed=0, stage=stage, short_teacher=None)
    resident = memory_status()["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")  # the peak resident memory starts again from here
    task = train.TextStage(args, preset, plan, layout, device())
    train.freeze_for_stage(task.model, stage)
    if plan.gradient_checkpointing:
        memory_plan.enable_checkpointing(task.model, stage)
    task.model.to(device())
    if device().type == "cpu":  # weights in memory, as on a GPU: loaded, they are mapped from their files, and the
        for w in task.model.parameters():  # pages a step never reads (most of a large vocabulary's rows) never count
            w.data = w.data.clone()
    engine, _ = train.deepspeed_engine(task.model, plan, preset, layout, device())
    times, real, padded = [], 0, 0
    for step in range(steps + 1):
        idx = train.batch_indices(step, plan.batch_size * preset.loss_batches, task.n_train, 0)
        start = time.perf_counter()
        _, tokens = train.train_step(engine, task, layout, idx, preset, plan)
        synchronize()
        times.append(time.perf_counter() - start)
        if step:  # what the chunks padded to, counted apart from the timed step
            batches = [b for rows in layout.shares(idx, task.lengths)
                       for b in task.inputs(engine, rows, preset.forward_chunk)[0]]
            real, padded = real + tokens, padded + sum(b["attention_mask"].numel() for b in batches)
    seconds = float(np.median(times[1:]))
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else memory_status()["VmHWM"] - resident
    return {"seconds_per_step": seconds, "tokens_per_second": real / steps / seconds, "padding": 1 - real / padded,
            "peak_mb": peak / 2 ** 20}


def train_once(student: str, stage: int, max_length: int, batch: int, chunk: int, checkpointing: bool, cached: bool,
               steps: int, layers: int | None) -> dict:
    """One configuration of the table below, in a fresh process and folder: the toy student on toy texts, or the paper's
    student shape (Qwen2-1.5B, `layers` of it if given) on texts that fill max_length."""
    import tempfile

    import memory_plan
    import toy_data
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        if student == "minilm":
            path, texts = toy_data.all_minilm_l6_v2(), toy_data.toy_corpus(2000, 0)
            target_width, mrl = TEACHER_WIDTH, (256, 128, 64)
        else:
            shape = dict(memory_plan.QWEN2_1_5B, **({"num_hidden_layers": layers} if layers else {}))
            path, texts = student_folder(out / "student", shape), long_texts(4 * batch, 4 * max_length)
            target_width, mrl = 12288, (1024, 512, 256)
        preset = run_folder(out, path, texts, stage, target_width, mrl_dims=mrl, max_length=max_length,
                            forward_chunk=chunk)
        plan = replace(preset.stages[stage], batch_size=batch, gradient_checkpointing=checkpointing,
                       cached_gradients=cached)
        result = train_py_steps(out, preset, stage, plan, steps)
    # the encoder's layers without the embeddings: MiniLM's, or Qwen2-1.5B's (a share of them)
    n_params = {"minilm": 22.7e6}.get(student) or 1.31e9 * (layers or 28) / 28
    peak = next((f for name, f in PEAK_BF16_FLOPS.items() if name in torch.cuda.get_device_name()), None) \
        if torch.cuda.is_available() else None
    # MFU: 6 N per token for the weights (PaLM, app. B), the attention's share left out; cached gradients forward twice
    flops_per_token = 6 * n_params * (4 / 3 if cached else 1)
    return result | {"mfu": result["tokens_per_second"] * flops_per_token / peak if peak else None}


def train_table(args) -> str:
    configs = [("one forward pass of the whole batch", args.batch, False, False),
               (f"length-sorted, chunks of {args.chunk}", args.chunk, False, False),
               (f"chunks of {args.chunk}, activation checkpointing", args.chunk, True, False),
               (f"chunks of {args.chunk}, cached gradients", args.chunk, False, True),
               (f"chunks of {args.chunk}, both", args.chunk, True, True)]
    rows = [f"stage-{args.stage} step (train.py's), {args.student} student, batch {args.batch}, max length "
            f"{args.max_length}, on {device()} ({'bf16' if device().type == 'cuda' else 'float32'}):", "",
            "| batching and memory | padding | tokens/s | s/step | peak memory MB | MFU |", "|---|---|---|---|---|---|"]
    for name, chunk, checkpointing, cached in configs:
        spec = json.dumps(dict(student=args.student, stage=args.stage, max_length=args.max_length, batch=args.batch,
                               chunk=chunk, checkpointing=checkpointing, cached=cached, steps=args.steps,
                               layers=args.layers))
        run = subprocess.run([sys.executable, __file__, "--one-train", spec], capture_output=True, text=True,
                             env=os.environ | {"MALLOC_MMAP_THRESHOLD_": str(2 ** 16)})
        if run.returncode:  # e.g. out of memory without checkpointing: a result, not an error
            rows.append(f"| {name} | failed: {run.stderr.strip().splitlines()[-1][:120]} | | | | |")
            continue
        r = json.loads(run.stdout.strip().splitlines()[-1])
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        rows.append(f"| {name} | {r['padding']:.0%} | {r['tokens_per_second']:,.0f} | {r['seconds_per_step']:.2f} | "
                    f"{r['peak_mb']:,.0f} | {mfu} |")
        print(f"  {name}: {r['seconds_per_step']:.2f} s/step", file=sys.stderr)
    return "\n".join(rows)


# ----------------------------------------------------------------------------- the memory plan against a real step

MEMORY_CHECK = dict(stage=2, layers=2, batch=8, chunk=8, max_length=512, steps=1)  # tests/test_memory_plan.py


def memory_once(stage: int, layers: int, batch: int, chunk: int, max_length: int, steps: int,
                checkpointing: bool = False, cached: bool = False) -> dict:
    """The plan's peak for a stage on this device (a CPU: float32, one process; a GPU: bf16, less the plan's allowance
    for what torch does not allocate) and the measured peak of train.py's steps with the same shapes: `layers` layers
    of Qwen2-1.5B's width (its 151,646-token vocabulary too), texts that fill
    `max_length` tokens, the paper's 12288-d target and MRL heads."""
    import tempfile

    import memory_plan
    shape = dict(memory_plan.QWEN2_1_5B, num_hidden_layers=layers)
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        preset = run_folder(out, student_folder(out / "student", shape), long_texts(2 * batch, 4 * max_length), stage,
                            12288, mrl_dims=(1024, 512, 256), max_length=max_length, forward_chunk=chunk)
        plan = replace(preset.stages[stage], batch_size=batch, gradient_checkpointing=checkpointing,
                       cached_gradients=cached)
        planned = memory_plan.plan(stage, replace(preset, student=shape), plan, 1, 1e9, device().type).chosen
        measured = train_py_steps(out, preset, stage, plan, steps)
    unmeasured = planned.parts.get(memory_plan.ALLOWANCE, 0)  # torch.cuda.max_memory_allocated leaves it out
    return {"planned_mb": (planned.peak - unmeasured) / 2 ** 20, "measured_mb": measured["peak_mb"],
            "parts_mb": {name: value / 2 ** 20 for name, value in planned.parts.items()}}


def memory_table(checks: list[dict]) -> str:
    rows = [f"The memory plan against measured steps of train.py on {device()} (one process; the growth of the peak "
            "memory from before the student loads):", "",
            "| stage | layers of Qwen2-1.5B | loss batch x tokens | memory settings | planned MB | measured MB | "
            "planned / measured |", "|---|---|---|---|---|---|---|"]
    for check in checks:
        run = subprocess.run([sys.executable, __file__, "--one-memory", json.dumps(check)], capture_output=True,
                             text=True, check=True, env=os.environ | {"MALLOC_MMAP_THRESHOLD_": str(2 ** 16)})
        r = json.loads(run.stdout.strip().splitlines()[-1])
        settings = " and ".join(name for name, key in (("checkpointing", "checkpointing"),
                                                        ("cached gradients", "cached")) if check.get(key)) or "none"
        rows.append(f"| {check['stage']} | {check['layers']} | {check['batch']} x {check['max_length']} | {settings} | "
                    f"{r['planned_mb']:,.0f} | {r['measured_mb']:,.0f} | {r['planned_mb'] / r['measured_mb']:.2f} |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------- train.py's step vs sentence-transformers'

def step_once(kind: str, batch: int, steps: int) -> dict:
    """Median seconds of a training step of the toy student on the toy corpus's first 2,000 texts, every weight
    training, in one process, toward random 1152-d target vectors (a step's cost does not depend on their values).
    "train.py": its stage-3 step as it runs (train_py_steps). "sentence-transformers": its distillation step written
    out as its trainer runs it (the Trainer itself needs accelerate, which nothing else here does): the student with a
    Dense layer to the target's width, MSELoss, backward, clipping, AdamW, on the same texts and batches."""
    import tempfile

    import data
    import presets
    import toy_data
    from train_minimal import batch_indices
    torch.manual_seed(0)
    p = presets.load("toy")
    rows = toy_data.toy_corpus(2000, 0)
    if kind == "train.py":
        with tempfile.TemporaryDirectory() as folder:
            preset = run_folder(Path(folder), p.student, rows, 3, TEACHER_WIDTH)
            plan = replace(preset.stages[3], batch_size=batch)
            seconds = train_py_steps(Path(folder), preset, 3, plan, steps)["seconds_per_step"]
        return {"kind": kind, "seconds_per_step": seconds}
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MSELoss
    from sentence_transformers.sentence_transformer.modules import Dense
    targets = F.normalize(torch.randn(len(rows), TEACHER_WIDTH, generator=torch.Generator().manual_seed(0)), dim=-1)
    model = SentenceTransformer(p.student, device="cpu")
    model.max_seq_length = p.max_length
    model.append(Dense(model.get_embedding_dimension(), TEACHER_WIDTH, activation_function=torch.nn.Identity()))
    model.train()
    texts = data.with_prompts(*zip(*rows), p.prompts)
    loss = MSELoss(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.stages[3].lr)
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        idx = batch_indices(step, batch, len(rows), 0)
        features = model.preprocess([texts[i] for i in idx])
        loss([features], targets[idx]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {"kind": kind, "seconds_per_step": float(np.median(times[1:]))}


STEP_KINDS = {"train.py": "train.py's stage-3 step: four heads, eq. (4) and the short heads' losses, length-sorted "
                          "chunks, fused AdamW, ZeRO-0 on one process",
              "sentence-transformers": "sentence-transformers' distillation: MSELoss to the target through a Dense "
                                       "layer"}


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
    from sentence_transformers import SentenceTransformer

    import toy_data
    corpus_texts = [t for t, _ in toy_data.toy_corpus(texts, 0)]
    result = {}
    for name, dtype in (("float32", torch.float32), ("bf16", torch.bfloat16)):
        model = SentenceTransformer(toy_data.all_mpnet_base_v2(), device="cpu", model_kwargs={"torch_dtype": dtype})
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

    import memory_plan
    fields = dict({"stella": memory_plan.QWEN2_1_5B, "nv-embed": MISTRAL_7B}[shape],
                  **({"num_hidden_layers": layers} if layers else {}))
    config = AutoConfig.for_model(**fields)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = MODEL_MAPPING[type(config)]._from_config(config, attn_implementation="sdpa", torch_dtype=dtype)
    model = model.to(device()).eval()
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
            "peak_mb": torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available() else None}


def teacher_table(batch: int, length: int, steps: int, layers: int | None, n_texts: int = 8_000_000,
                  mean_tokens: int = 215) -> str:
    rows = [f"Teacher encoding on {device()} ({'bf16' if torch.cuda.is_available() else 'float32'}), batches of "
            f"{batch} texts of {length} tokens; the last column scales to {n_texts:,} texts of {mean_tokens} tokens "
            f"on average (the paper's mix, docs/paper-scale.md) on 8 such devices:", "",
            "| teacher shape | texts/s | tokens/s | peak memory MB | hours for the corpus on 8 devices |",
            "|---|---|---|---|---|"]
    for shape in ("stella", "nv-embed"):
        spec = json.dumps(dict(shape=shape, batch=batch, length=length, steps=steps, layers=layers))
        run = subprocess.run([sys.executable, __file__, "--one-teacher", spec], capture_output=True, text=True)
        if run.returncode:
            rows.append(f"| {shape} | failed: {run.stderr.strip().splitlines()[-1][:120]} | | | |")
            continue
        r = json.loads(run.stdout.strip().splitlines()[-1])
        hours = n_texts * mean_tokens / r["tokens_per_second"] / 8 / 3600
        rows.append(f"| {shape} | {r['texts_per_second']:,.1f} | {r['tokens_per_second']:,.0f} | "
                    f"{r['peak_mb']:,.0f} | {hours:.1f} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- the corpus in memory

def synthetic_corpus(folder: Path, n: int) -> tuple[Path, Path]:
    """n texts of 50-1,000 words drawn from a fixed vocabulary, 20% queries: as the old JSON-lines file (one
    prompted string per line) and as the Arrow file the corpus is now."""
    import data
    rng = np.random.default_rng(0)
    words = np.array([f"w{k}" for k in range(5000)])

    def rows():
        for length in rng.integers(50, 1000, size=n):
            kind = "query" if rng.random() < 0.2 else "passage"
            yield " ".join(words[rng.integers(0, len(words), size=length)]), kind
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
            "anon_mb": (now["RssAnon"] - base["RssAnon"]) / 2 ** 20,
            "file_mb": (now["RssFile"] - base["RssFile"]) / 2 ** 20}


def corpus_table(n: int, folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    jsonl, arrow = synthetic_corpus(folder, n)
    rows = [f"One rank opening a synthetic corpus of {n:,} texts ({jsonl.stat().st_size / 2 ** 30:.2f} GB as JSON "
            f"lines, {arrow.stat().st_size / 2 ** 30:.2f} GB as Arrow), taking every length and a batch of 1,024 "
            "texts:", "",
            "| corpus | seconds | peak memory growth MB | private (anon) MB | file pages MB (shared by the ranks) |",
            "|---|---|---|---|---|"]
    for kind, path, name in (("list", jsonl, "before: JSON lines -> a list of strings"),
                             ("arrow", arrow, "now: Arrow file, memory-mapped")):
        run = subprocess.run([sys.executable, __file__, "--one-corpus", kind, str(path)], capture_output=True,
                             text=True, check=True)
        r = json.loads(run.stdout.strip().splitlines()[-1])
        rows.append(f"| {name} | {r['seconds']:.1f} | {r['peak_mb']:,.0f} | {r['anon_mb']:,.0f} | "
                    f"{r['file_mb']:,.0f} |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resim", action="store_true", help="only the L_resim table")
    ap.add_argument("--train", action="store_true", help="only the training-step table (chunks, memory settings)")
    ap.add_argument("--step", action="store_true", help="only train.py's step against sentence-transformers'")
    ap.add_argument("--memory", action="store_true", help="only the memory plan against measured steps")
    ap.add_argument("--precision", action="store_true", help="only the teacher in bf16 against float32 on this CPU")
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024, 2048])
    ap.add_argument("--dense-max-m", type=int, default=128, help="largest m for the dense L_resim (m=256 needs ~14 GB)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--student", default="minilm", choices=["minilm", "qwen2-1.5b"])
    ap.add_argument("--stage", type=int, default=3, choices=[2, 3])
    ap.add_argument("--layers", type=int, help="qwen2-1.5b with fewer layers (a quick check of the code path)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--corpus", action="store_true", help="only the corpus memory table")
    ap.add_argument("--corpus-texts", type=int, default=1_000_000)
    ap.add_argument("--corpus-dir", type=Path, default=Path("runs/bench-corpus"))
    ap.add_argument("--gpu", action="store_true", help="the paper-scale figures (docs/paper-scale.md); meant for a GPU")
    for hidden in ("--one-train", "--one-step", "--one-memory", "--one-teacher"):
        ap.add_argument(hidden, metavar="JSON", help=argparse.SUPPRESS)
    ap.add_argument("--one-resim", nargs=2, metavar=("METHOD", "M"), help=argparse.SUPPRESS)
    ap.add_argument("--one-corpus", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--one-precision", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    one = {"one_train": train_once, "one_step": step_once, "one_memory": memory_once, "one_teacher": teacher_once}
    for name, run in one.items():
        if getattr(args, name):
            print(json.dumps(run(**json.loads(getattr(args, name)))))
            return
    if args.one_resim:
        print(json.dumps(resim_once(args.one_resim[0], int(args.one_resim[1]), args.repeats)))
    elif args.one_corpus:
        print(json.dumps(corpus_once(*args.one_corpus)))
    elif args.one_precision:
        print(json.dumps(teacher_precision_once(args.one_precision)))
    elif args.gpu:  # one short script of every GPU figure docs/paper-scale.md asks for; --layers shrinks it for a check
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (a check of the script only)"
        print(f"device: {name}\n")
        args.student, args.max_length, args.batch, args.chunk = "qwen2-1.5b", 512, 128, 16
        print(train_table(args) + "\n")
        layers = args.layers or 28
        print(memory_table([dict(stage=3, layers=layers, batch=128, chunk=16, max_length=512, steps=1,
                                 checkpointing=True), dict(stage=3, layers=layers, batch=128, chunk=16, max_length=512,
                                                           steps=1, cached=True)]) + "\n")
        print(resim_table([1024, 4096], dense_max_m=0, repeats=args.repeats) + "\n")
        print(teacher_table(32, 512, args.steps, args.layers))
    else:
        every = not (args.resim or args.train or args.step or args.memory or args.precision or args.corpus)
        if args.resim or every:
            print(resim_table(args.sizes, args.dense_max_m, args.repeats) + "\n")
        if args.step or every:
            print(step_table(args.batch, steps=12) + "\n")
        if args.train or every:
            print(train_table(args) + "\n")
        if args.memory or every:
            print(memory_table([MEMORY_CHECK, dict(MEMORY_CHECK, stage=3, cached=True, chunk=2)]) + "\n")
        if args.precision or every:
            print(teacher_precision_table(320) + "\n")
        if args.corpus or every:
            print(corpus_table(args.corpus_texts, args.corpus_dir))


if __name__ == "__main__":
    main()
