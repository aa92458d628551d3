"""Summarize a run: the held-out distillation losses per stage and head, and the loss curves.

    python report.py runs/toy        # prints a markdown table, writes runs/toy/losses.png
"""

import csv
import json
import sys
from pathlib import Path

import jasper


def head_losses(parts: dict[str, float]) -> dict[int, dict[str, float]]:
    """{"1152_cos": .., "256_sim": ..} -> {1152: {"cos": .., "sim": .., "resim": .., "loss": weighted}}."""
    heads = {}
    for key, value in parts.items():
        if key != "loss":
            width, part = key.split("_")
            heads.setdefault(int(width), {})[part] = value
    for losses in heads.values():
        losses["loss"] = sum(jasper.LOSS_WEIGHTS[p] * v for p, v in losses.items())
    return heads


def table(out: Path) -> str:
    rows = ["| stage | steps | time (s) | trainable params | head | held-out cos | sim | resim | "
            "loss (eq. 4) before -> after |", "|---|---|---|---|---|---|---|---|---|"]
    for eval_file in sorted(out.glob("stage*/eval.json")):
        result = json.loads(eval_file.read_text())
        before, after = head_losses(result["heldout_before"]), head_losses(result["heldout_after"])
        for k, (width, losses) in enumerate(after.items()):
            lead = (f"| {result['stage']} | {result['plan']['steps']} | {result['seconds']:.0f} | "
                    f"{result['trainable_parameters']:,} " if k == 0 else "| | | | ")
            cos = f"{losses['cos']:.4f}" if "cos" in losses else "-"
            rows.append(f"{lead}| FC {width} | {cos} | {losses['sim']:.5f} | {losses['resim']:.5f} | "
                        f"{before[width]['loss']:.3f} -> {losses['loss']:.3f} |")
    return "\n".join(rows)


def plot(out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    logs = sorted(out.glob("stage*/log.csv"))
    fig, axes = plt.subplots(1, len(logs), figsize=(4.5 * len(logs), 3.2), squeeze=False)
    for ax, log in zip(axes[0], logs):
        with log.open() as f:
            rows = list(csv.DictReader(f))
        steps = [int(r["step"]) for r in rows]
        ax.plot(steps, [float(r["loss"]) for r in rows], label="total", color="black")
        for key in (k for k in rows[0] if k not in ("step", "lr", "loss")):
            part = key.split("_")[1]
            ax.plot(steps, [jasper.LOSS_WEIGHTS[part] * float(r[key]) for r in rows], label=key, lw=0.8)
        ax.set(title=log.parent.name, xlabel="step", ylabel="weighted loss", yscale="log")
        ax.legend(fontsize=6)
    fig.tight_layout()
    path = out / "losses.png"
    fig.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    run = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/toy")
    print(table(run))
    print(f"\nloss curves: {plot(run)}")
