"""Summarize runs: the held-out scores per stage and head, the loss curves, stage 4's retrieval, and a
comparison of stage-3 runs that differ only in what teaches the short heads (self-distillation).

    python report.py runs/toy                  # markdown tables; writes runs/toy/losses.png
    python report.py --compare runs/sd-target runs/sd-fc1 runs/sd-both
"""

import argparse
import csv
import json
from pathlib import Path

import jasper


def head_scores(scores: dict[str, float]) -> dict[int, dict[str, float]]:
    """{"1152_cos": .., "256_sim": .., "256_spearman": ..} -> {1152: {"cos": .., ..., "loss": eq. (4)}, ...}.
    "loss" is eq. (4) over the head's own parts: the weighted sum of those it has."""
    heads = {}
    for key, value in scores.items():
        width, _, name = key.partition("_")
        if name:
            heads.setdefault(int(width), {})[name] = value
    for head in heads.values():
        head["loss"] = sum(jasper.LOSS_WEIGHTS[p] * v for p, v in head.items() if p in jasper.LOSS_WEIGHTS)
    return heads


def cell(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(out: Path) -> str:
    """Every stage's held-out eq. (4) parts per head, before -> after, and how well each head orders
    the held-out text pairs like the teachers (Spearman; stages 1-3)."""
    rows = ["| stage | steps | time (s) | trainable params | head | held-out cos | sim | resim | "
            "loss (eq. 4) before -> after | pair order (Spearman) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for eval_file in sorted(out.glob("stage*/eval.json")):
        result = json.loads(eval_file.read_text())
        before, after = head_scores(result["heldout_before"]), head_scores(result["heldout_after"])
        for k, (width, head) in enumerate(after.items()):
            lead = (f"| {result['stage']} | {result['plan']['steps']} | {result['seconds']:.0f} | "
                    f"{result['trainable_parameters']:,} " if k == 0 else "| | | | ")
            rows.append(f"{lead}| FC {width} | {cell(head.get('cos'), 4)} | {head['sim']:.5f} | {head['resim']:.5f} | "
                        f"{before[width]['loss']:.3f} -> {head['loss']:.3f} | {cell(head.get('spearman'), 3)} |")
    return "\n".join(rows)


def retrieval_table(out: Path) -> str:
    """Stage 4: held-out recall@1 per head, before -> after, with the chance level."""
    result = json.loads((out / "stage4" / "eval.json").read_text())
    before, after = head_scores(result["heldout_before"]), head_scores(result["heldout_after"])
    rows = ["| head | image -> caption R@1 | caption -> image R@1 | chance |", "|---|---|---|---|"]
    for width, head in after.items():
        rows.append(f"| FC {width} | {before[width]['i2c']:.3f} -> {head['i2c']:.3f} | "
                    f"{before[width]['c2i']:.3f} -> {head['c2i']:.3f} | {result['heldout_after']['chance']:.3f} |")
    return "\n".join(rows)


def compare(runs: list[Path]) -> str:
    """Stage-3 runs side by side per short head: held-out L_sim, L_resim and eq. (4) against the teachers'
    target, and the Spearman pair order, whatever taught the head in training."""
    results = [json.loads((run / "stage3" / "eval.json").read_text()) for run in runs]
    rows = ["| head | short heads taught by | held-out sim | resim | 200 sim + 20 resim | pair order (Spearman) |",
            "|---|---|---|---|---|---|"]
    widths = list(head_scores(results[0]["heldout_after"]))
    for width in widths:
        for result in results:
            head = head_scores(result["heldout_after"])[width]
            rows.append(f"| FC {width} | {result['short_teacher']} | {head['sim']:.5f} | {head['resim']:.5f} | "
                        f"{head['loss'] - 10 * head.get('cos', 0):.3f} | {head['spearman']:.4f} |")
    return "\n".join(rows)


PART_COLOURS = {"cos": "tab:blue", "sim": "tab:orange", "resim": "tab:green"}


def running_mean(values: list[float], window: int) -> list[float]:
    """The mean of each value and the window - 1 before it (fewer at the start)."""
    sums = [0.0]
    for v in values:
        sums.append(sums[-1] + v)
    return [(sums[k + 1] - sums[max(0, k + 1 - window)]) / min(k + 1, window) for k in range(len(values))]


def plot(out: Path) -> Path:
    """The loss curves of every stage of a run, one row per stage: the total loss, then one panel per head
    with its weighted parts (eq. 4: 10 L_cos, 200 L_sim, 20 L_resim). Thin lines are the steps, thick ones
    their running mean; each row shares its y axis, so the heads of a stage compare at a glance."""
    import matplotlib.pyplot as plt
    logs = sorted(out.glob("stage*/log.csv"))
    runs = []
    for log in logs:
        with log.open() as f:
            rows = list(csv.DictReader(f))
        heads = {}
        for key in rows[0]:
            width, _, part = key.partition("_")
            if part:
                heads.setdefault(int(width), []).append(part)
        runs.append((log.parent.name, rows, heads))
    columns = 1 + max(len(heads) for _, _, heads in runs)
    fig, axes = plt.subplots(len(runs), columns, figsize=(3.1 * columns, 2.3 * len(runs)), squeeze=False,
                             sharex="row", sharey="row")
    for row_axes, (name, rows, heads) in zip(axes, runs):
        steps = [int(r["step"]) for r in rows]
        window = max(1, len(rows) // 25)
        panels = [("total", {"total": [float(r["loss"]) for r in rows]})]
        panels += [(f"FC {width}", {part: [jasper.LOSS_WEIGHTS[part] * float(r[f"{width}_{part}"]) for r in rows]
                                    for part in parts}) for width, parts in heads.items()]
        for ax, (title, curves) in zip(row_axes, panels):
            for part, values in curves.items():
                colour = PART_COLOURS.get(part, "black")
                ax.plot(steps, values, color=colour, lw=0.5, alpha=0.3)
                ax.plot(steps, running_mean(values, window), color=colour, lw=1.6)
            ax.set_title(f"{name}: {title}", fontsize=9)
            ax.set_yscale("log")
            ax.tick_params(labelsize=7)
        for ax in row_axes[len(panels):]:
            ax.set_visible(False)
        row_axes[0].set_ylabel("weighted loss", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("step", fontsize=8)
    handles = [plt.Line2D([], [], color="black", lw=1.6, label="eq. (4) total")]
    handles += [plt.Line2D([], [], color=c, lw=1.6, label=f"{jasper.LOSS_WEIGHTS[p]:g} L_{p}")
                for p, c in PART_COLOURS.items()]
    fig.legend(handles=handles, loc="upper center", ncol=4, fontsize=8, frameon=False, bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path = out / "losses.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- what trains

def part_of(name: str, model: jasper.Jasper) -> str:
    """The part of the student a parameter belongs to, in the stage plan's terms."""
    if name.startswith("heads."):
        return "FC1" if name.startswith(f"heads.{model.config.head_dims[0]}.") else "FC2-FC4"
    if name.startswith(("vision.", "pooler.")):
        return "vision encoder" if name.startswith("vision.") else "pooler"
    layers = len(jasper.encoder_layers(model.text))
    layer = next((int(p) for p in name.split(".")[1:] if p.isdigit()), None)
    if layer is None:
        return "embeddings" if "embed" in name else "final norm"
    return "last 3 layers" if layer >= layers - 3 else "first layers"


def part_sizes(model: jasper.Jasper) -> dict[str, int]:
    """{part: number of parameters} of the student, in the order of its parameters."""
    sizes = {}
    for name, w in model.named_parameters():
        sizes[part_of(name, model)] = sizes.get(part_of(name, model), 0) + w.numel()
    return sizes


def trainable_table(model: jasper.Jasper) -> str:
    """A markdown table: each part's size and the stages in which it trains (jasper.set_trainable), and the
    trainable total per stage. Leaves the model as stage 4 sets it."""
    sizes = part_sizes(model)
    trains = {stage: {part_of(n, model) for n in jasper.set_trainable(model, stage)} for stage in (1, 2, 3, 4)}
    rows = ["| part | parameters | stage 1 | stage 2 | stage 3 | stage 4 |", "|---|---:|:-:|:-:|:-:|:-:|"]
    rows += [f"| {part} | {count:,} | " + " | ".join("trains" if part in trains[s] else "" for s in trains) + " |"
             for part, count in sizes.items()]
    rows.append("| **trainable** | | " + " | ".join(f"{sum(sizes[p] for p in trains[s]):,}" for s in trains) + " |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- the method in one figure

STAGE_PARTS = ("vision encoder", "pooler", "LM: first layers", "LM: last 3 layers", "mean pool", "FC1", "FC2-FC4 (MRL)")
STAGES = {  # part -> "trains" | "frozen" | "no weights" | None (not there yet), the loss, the data (paper 2.3-2.5)
    1: ({"LM: first layers": "frozen", "LM: last 3 layers": "frozen", "mean pool": "no weights", "FC1": "trains"},
        "FC1 vs target:\n10 Lcos + 200 Lsim + 20 Lresim", "texts: passages and\nqueries (8M)"),
    2: ({"LM: first layers": "frozen", "LM: last 3 layers": "trains", "mean pool": "no weights", "FC1": "trains"},
        "FC1 vs target:\n10 Lcos + 200 Lsim + 20 Lresim", "the same texts"),
    3: ({"LM: first layers": "trains", "LM: last 3 layers": "trains", "mean pool": "no weights", "FC1": "trains",
         "FC2-FC4 (MRL)": "trains"}, "FC1: Lcos; every head: Lsim,\nLresim vs target, averaged", "the same texts"),
    4: ({"vision encoder": "trains", "pooler": "no weights", "LM: first layers": "frozen",
         "LM: last 3 layers": "frozen", "mean pool": "no weights", "FC1": "frozen", "FC2-FC4 (MRL)": "frozen"},
        "every head: image vs caption,\neq. (4), mean over heads", "image-caption pairs"),
}
TEACHER_SIDE = {n: "teachers (frozen), once:\nnormalize, concatenate,\nnormalize = target t" for n in (1, 2, 3)}
TEACHER_SIDE[4] = "the caption through the same\nfrozen LM and heads =\nthe teacher's vectors"


def stages_figure(path: Path) -> Path:
    """The four stages side by side: the student's parts bottom to top in the order a text or an image flows through
    them, which exist (dotted: not yet), which train (orange), which are frozen (grey) and which have no weights
    (white); above them the teacher side each stage compares the heads with; below, the loss and the data."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch
    colours = {"trains": "#f5a25d", "frozen": "#d9d9d9", "no weights": "white", "teacher": "#cfe2f3"}
    top = len(STAGE_PARTS)
    fig, axes = plt.subplots(1, 4, figsize=(12, 5.6))
    for ax, (n, (parts, loss, texts)) in zip(axes, STAGES.items()):
        ax.set(xlim=(0, 1), ylim=(-2.6, top + 2.2), xticks=[], yticks=[])
        ax.axis("off")
        ax.set_title(f"stage {n}", fontsize=12, fontweight="bold")
        for row, part in enumerate(STAGE_PARTS):
            state = parts.get(part)
            ax.add_patch(FancyBboxPatch((0.08, row + 0.12), 0.84, 0.72, boxstyle="round,pad=0.02",
                                        facecolor=colours.get(state, "white"),
                                        edgecolor="black" if state else "#bbbbbb", linestyle="-" if state else ":"))
            label = f"{part} (no weights)" if state == "no weights" else part
            ax.text(0.5, row + 0.48, label, ha="center", va="center", fontsize=8.5,
                    color="black" if state else "#aaaaaa")
        ax.add_patch(FancyBboxPatch((0.08, top + 0.45), 0.84, 1.55, boxstyle="round,pad=0.02",
                                    facecolor=colours["teacher"], edgecolor="black"))
        ax.text(0.5, top + 1.22, TEACHER_SIDE[n], ha="center", va="center", fontsize=8)
        ax.annotate("", xy=(0.5, top - 0.1), xytext=(0.5, top + 0.45),
                    arrowprops=dict(arrowstyle="<->", color="black", lw=1))
        ax.text(0.53, top + 0.18, "compared", fontsize=7, va="center")
        ax.text(0.5, -0.55, loss, ha="center", va="center", fontsize=8.5)
        ax.text(0.5, -1.75, texts, ha="center", va="center", fontsize=8.5, style="italic")
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor=colours[k], edgecolor="black") for k in colours]
    handles.append(plt.Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="#bbbbbb", linestyle=":"))
    fig.legend(handles, ["trains", "frozen", "no weights", "teacher side", "not there yet"], loc="lower center",
               fontsize=8.5, frameon=False, ncol=5)
    fig.suptitle("Jasper's four stages: what trains, against what, the loss, the data", fontsize=12)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", nargs="?", type=Path, default=Path("runs/toy"))
    ap.add_argument("--compare", nargs="+", type=Path, help="stage-3 runs to put side by side")
    ap.add_argument("--stages-figure", type=Path, metavar="PNG", help="draw the four stages (docs/stages.png)")
    args = ap.parse_args()
    if args.stages_figure:
        print(stages_figure(args.stages_figure))
    elif args.compare:
        print(compare(args.compare))
    else:
        print(table(args.run))
        if (args.run / "stage4" / "eval.json").is_file():
            print("\n" + retrieval_table(args.run))
        print(f"\nloss curves: {plot(args.run)}")
