"""Benchmarks: the relative-similarity loss (dense vs counted) and a stage-3 training step.

    python bench.py                   # both tables; a few minutes on a 2-core CPU
    python bench.py --resim           # L_resim forward+backward for m = 32 ... 2048
    python bench.py --train           # the toy student's stage-3 step: padding, grouping, checkpointing
    python bench.py --train --student qwen2-1.5b --max-length 512   # on a GPU: tokens/s, MFU, memory

Each L_resim figure comes from a fresh process, so its peak memory is the computation's own:
torch.cuda.max_memory_allocated on a GPU, the growth of the process's peak resident memory on a CPU.
Ratios compare figures taken in the same run; absolute times on shared machines are noisy.
"""

import argparse
import json
import resource
import subprocess
import sys
import time

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
        texts = data.make_corpus(*data.toy_sources(0), 2000, 0)
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
        if run.returncode:
            raise RuntimeError(f"{name} failed:\n{run.stderr[-3000:]}")
        r = json.loads(run.stdout.strip().splitlines()[-1])
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        rows.append(f"| {name} | {r['padding']:.0%} | {r['tokens_per_second']:,.0f} | {r['seconds_per_step']:.2f} | "
                    f"{r['peak_mb']:,.0f} | {mfu} |")
        print(f"  {name}: {r['tokens_per_second']:,.0f} tokens/s", file=sys.stderr)
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resim", action="store_true", help="only the L_resim table")
    ap.add_argument("--train", action="store_true", help="only the training-step table")
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024, 2048])
    ap.add_argument("--dense-max-m", type=int, default=128, help="largest m for the dense L_resim (m=256 needs ~14 GB)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--student", default="minilm", choices=["minilm", "qwen2-1.5b"])
    ap.add_argument("--layers", type=int, help="qwen2-1.5b with fewer layers (a quick check of the code path)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--one-resim", nargs=2, metavar=("METHOD", "M"), help=argparse.SUPPRESS)
    ap.add_argument("--one-train", metavar="JSON", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one_resim:
        print(json.dumps(resim_once(args.one_resim[0], int(args.one_resim[1]), args.repeats)))
    elif args.one_train:
        print(json.dumps(train_once(**json.loads(args.one_train))))
    else:
        both = not (args.resim or args.train)
        if args.resim or both:
            print(resim_table(args.sizes, args.dense_max_m, args.repeats) + "\n")
        if args.train or both:
            print(train_table(args))


if __name__ == "__main__":
    main()
