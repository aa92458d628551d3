"""Will a stage fit its GPUs? The peak memory per GPU, planned before launch: no weights, no GPU, no hub.

    python train.py --stage 3 --preset paper --plan --gpus 8 --gpu-memory 48

A rank holds its model states for the whole run and, during a step, what the step makes. The plan adds up:

- weights, gradients' fp32 partition and optimizer states: DeepSpeed's own ZeRO-2 estimator
  (estimate_zero2_model_states_mem_needs: 16-bit weights, 16- and 32-bit gradients, fp32 master weights and AdamW's
  two moments, all but the 16-bit weights split over the ranks), plus the 16-bit copies of the frozen weights and, on
  more than one rank, ZeRO-2's gradient reduction bucket;
- the step: the real student built from its real configuration on fake tensors (PyTorch's FakeTensorMode: shapes and
  dtypes, no storage), run through one micro-step as train.py runs it (its chunks, activation checkpointing, cached
  gradients), counting the peak bytes of every tensor the forward and backward passes make while it lives
  (LiveBytes). Every text is taken at the preset's max length, the worst case. Each weight's 16-bit gradient leaves
  as soon as it is made, as ZeRO-2's hooks move it into the reduction bucket;
- the target rows and the losses, measured on real tensors of the loss batch's shape (they are small);
- on a GPU, an allowance for the CUDA context, NCCL and the caching allocator (not measured).

On a CPU (float32, one process, no ZeRO: what this repository's tests run) the same plan counts float32 weights and
AdamW's moments as states, and the gradients with the step (they are kept whole). tests/test_memory_plan.py holds the
plan within 15% of the measured peak of a real step (bench.py --memory).

The settings that fit with the least recomputation decide the paper preset's (docs/paper-scale.md has the tables).
"""

import json
import math
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

import jasper
from commands import InputError
from presets import SIGLIP, STELLA, Preset, StagePlan

GIB = 2 ** 30
GPU_ALLOWANCE = 2 * GIB  # the CUDA context, NCCL's buffers and the caching allocator's slack: an allowance
ALLOWANCE = "CUDA context, NCCL, allocator (allowance)"
REDUCE_BUCKET = 500_000_000  # elements: DeepSpeed ZeRO-2's default reduce_bucket_size

# The configurations of the paper's models on the hub (their config.json files), so the plan needs no network.
QWEN2_1_5B = {  # dunzhang/stella_en_1.5B_v5: a Qwen2-1.5B (gte-Qwen2-1.5B-instruct), 1.54B parameters
    "model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
    "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151646,
    "max_position_embeddings": 131072, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
}
SIGLIP_SO400M = {  # google/siglip-so400m-patch14-384's vision tower: 27 x 27 = 729 patches of width 1152
    "model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
    "num_attention_heads": 16, "image_size": 384, "patch_size": 14,
}
KNOWN_CONFIGS = {STELLA: QWEN2_1_5B, SIGLIP: SIGLIP_SO400M}
SETTINGS = ((False, False), (True, False), (False, True), (True, True))  # (activation checkpointing, cached gradients)


def model_config(spec: str | dict) -> dict:
    """A model's configuration as a dict of transformers config fields: the spec itself, a folder's config.json, or a
    hub model's (KNOWN_CONFIGS; another hub id is asked of the hub)."""
    if isinstance(spec, dict):
        return spec
    if spec in KNOWN_CONFIGS:
        return KNOWN_CONFIGS[spec]
    if (Path(spec) / "config.json").is_file():
        return json.loads((Path(spec) / "config.json").read_text())
    try:
        from transformers import AutoConfig
        return AutoConfig.from_pretrained(spec).to_dict()
    except OSError as error:
        raise InputError(f"the plan needs {spec}'s configuration: a folder, a config, or the hub ({error})") from None


@dataclass(frozen=True)
class Plan:
    """One stage's memory per rank, by part (bytes), for some ranks, memory settings and device."""
    stage: int
    gpus: int
    gpu_memory: float  # GiB per device
    device: str  # "cuda" (bf16, DeepSpeed ZeRO-2 on more than one rank) or "cpu" (float32, one process)
    checkpointing: bool
    cached: bool
    parts: dict
    recompute: float  # extra forward passes of the encoders per step, as a share of one
    trainable: int  # parameters
    frozen: int

    @property
    def peak(self) -> float:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.peak <= self.gpu_memory * GIB

    def settings(self) -> str:
        on = [name for name, flag in (("activation checkpointing", self.checkpointing),
                                      ("cached gradients", self.cached)) if flag]
        return " and ".join(on) or "no memory savers"

    def verdict(self) -> str:
        return (f"stage {self.stage}, {self.gpus} GPUs of {self.gpu_memory:g} GB: peak {self.peak / GIB:.1f} GB per "
                f"GPU ({'fits' if self.fits else 'does not fit'})")


def plan(stage: int, preset: Preset, stage_plan: StagePlan, gpus: int, gpu_memory: float, device: str = "cuda",
         checkpointing: bool | None = None, cached: bool | None = None) -> "Report":
    """The stage's plan with its memory settings (or those given), and what would fit if it does not."""
    checkpointing = stage_plan.gradient_checkpointing if checkpointing is None else checkpointing
    cached = stage_plan.cached_gradients if cached is None else cached
    chosen = plan_for(stage, preset, stage_plan, gpus, gpu_memory, device, checkpointing, cached)
    options = [] if chosen.fits else alternatives(stage, preset, stage_plan, gpus, gpu_memory, device)
    return Report(chosen, options, preset, stage_plan)


def check_fits(stage: int, preset: Preset, stage_plan: StagePlan, gpus: int, gpu_memory: float) -> None:
    """Raise InputError, naming the figure and a setting that fits, when the stage would not fit these GPUs."""
    report = plan(stage, preset, stage_plan, gpus, gpu_memory)
    if not report.chosen.fits:
        raise InputError(f"the memory plan needs {report.chosen.peak / GIB:.1f} GB per GPU, these have "
                         f"{gpu_memory:.1f} GB: {report.remedy()} (python train.py --stage {stage} --plan)")


def plan_for(stage, preset, stage_plan, gpus, gpu_memory, device, checkpointing, cached) -> Plan:
    on_gpu = device == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    group_size = max(1, gpus // preset.loss_batches)
    accumulation = max(1, preset.loss_batches // gpus)  # loss batches a rank computes one after another
    step, trainable, frozen, layers_saving, layers = step_memory(stage, preset, stage_plan.batch_size // group_size,
                                                                 dtype, checkpointing, cached, on_gpu, accumulation)
    target, losses = loss_memory(stage, preset, stage_plan.batch_size)
    if on_gpu:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
        _, states = estimate_zero2_model_states_mem_needs(trainable, gpus, cpu_offload=False)
        parts = {"16-bit weights": 2 * (trainable + frozen),
                 "gradients (16- and 32-bit, partitioned)": 6 * trainable / gpus,
                 "optimizer states (fp32 weights, AdamW moments)": 12 * trainable / gpus}
        assert abs(sum(parts.values()) - 2 * frozen - states) < 16  # the parts of DeepSpeed's own estimate
        parts["ZeRO-2 reduction bucket"] = 2 * min(trainable, REDUCE_BUCKET) if gpus > 1 else 0
    else:
        parts = {"float32 weights": 4 * (trainable + frozen), "optimizer states (AdamW moments)": 8 * trainable}
    parts["step: activations" + ("" if on_gpu else " and gradients")] = step
    parts["target rows"] = target
    parts["losses"] = losses
    if on_gpu:
        parts[ALLOWANCE] = GPU_ALLOWANCE
    recompute = (1.0 if cached else 0.0) + (layers_saving / layers if checkpointing else 0.0)
    return Plan(stage, gpus, gpu_memory, device, checkpointing, cached, parts, recompute, trainable, frozen)


def alternatives(stage, preset, stage_plan, gpus, gpu_memory, device) -> list[Plan]:
    """Plans that fit: other memory settings on these GPUs, least recomputation first (on a tie, one backward pass
    per loss batch first); else the fewest GPUs (multiples or divisors of the loss batches, up to 64) that fit."""
    options = [plan_for(stage, preset, stage_plan, gpus, gpu_memory, device, c, k) for c, k in SETTINGS]
    fitting = sorted((p for p in options if p.fits), key=lambda p: (p.recompute, p.cached))
    if fitting:
        return fitting
    for more in (g for g in range(gpus + 1, 65) if g % preset.loss_batches == 0 or preset.loss_batches % g == 0):
        if stage_plan.batch_size % max(1, more // preset.loss_batches):
            continue
        best = plan_for(stage, preset, stage_plan, more, gpu_memory, device, True, True)
        if best.fits:
            return [best]
    return []


@dataclass
class Report:
    """The plan with the stage's settings (`chosen`), and when it does not fit, the plans that would (`options`)."""
    chosen: Plan
    options: list
    preset: Preset
    stage_plan: StagePlan

    def remedy(self) -> str:
        if not self.options:
            return "no setting fits on up to 64 GPUs of this size"
        best = self.options[0]
        if best.gpus != self.chosen.gpus:
            return f"{best.gpus} GPUs with {best.settings()} would fit (peak {best.peak / GIB:.1f} GB)"
        return f"{best.settings()} would fit (peak {best.peak / GIB:.1f} GB)"

    def report(self) -> str:
        p = self.chosen
        share = self.stage_plan.batch_size // max(1, p.gpus // self.preset.loss_batches)
        accumulation = max(1, self.preset.loss_batches // p.gpus)
        lines = [f"stage {p.stage} of {self.preset.name} on {p.gpus} {'GPU' if p.device == 'cuda' else 'CPU'}(s): "
                 f"loss batch {self.stage_plan.batch_size} ({share} per rank, accumulation {accumulation}), "
                 f"{self.preset.max_length} tokens a text, forward chunks of {self.preset.forward_chunk}; "
                 f"{p.trainable:,} parameters train, {p.frozen:,} frozen; "
                 f"{p.settings()} (recomputes {p.recompute:.2f} of a forward pass)", "",
                 "| part | GB per GPU |", "|---|---:|"]
        lines += [f"| {name} | {value / GIB:.2f} |" for name, value in p.parts.items() if value]
        lines += [f"| **peak** | **{p.peak / GIB:.2f}** |", ""]
        return "\n".join(lines) + p.verdict() + ("" if p.fits else f": {self.remedy()}")


# ----------------------------------------------------------------------------- measured on fake tensors

def target_width(preset: Preset) -> int:
    """FC1's width: the teachers' widths added up (each teacher must say its width)."""
    if any(teacher.dim is None for teacher in preset.teachers):
        raise InputError("the memory plan needs every teacher's width: NAME=MODEL@WIDTH, or \"dim\" in a preset file")
    return sum(teacher.dim for teacher in preset.teachers)


def fake_student(stage: int, preset: Preset, dtype) -> jasper.Jasper:
    """The stage's student from its real configuration, on fake tensors, in the dtype the run trains in, its weights
    left uninitialized (they have no values to draw)."""
    from transformers.initialization import no_init_weights
    heads = [target_width(preset), *preset.mrl_dims] if stage >= 3 else [target_width(preset)]
    vision = model_config(preset.vision_encoder) if stage == 4 else None
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the run's dtype, as DeepSpeed's bf16 casts it
    try:
        with no_init_weights():
            return jasper.Jasper(jasper.JasperConfig(text_encoder=model_config(preset.student), vision_encoder=vision,
                                                     head_dims=heads, pooler=preset.pooler,
                                                     image_tokens=preset.image_tokens))
    finally:
        torch.set_default_dtype(default)


MEASURED = {}  # (what shapes a step, settings) -> step_memory's result: plans for other GPU counts reuse it


def step_memory(stage: int, preset: Preset, rows: int, dtype, checkpointing: bool, cached: bool,
                drop_grads: bool, accumulation: int = 1) -> tuple[int, int, int, int, int]:
    """The peak bytes one micro-step keeps alive besides the weights (activations, temporaries, and the gradients
    unless each is dropped as it is made), on fake tensors, for a rank's `rows` texts (images) of a loss batch; also
    the trainable and frozen parameter counts, and how many encoder layers save activations for backward, of how many.
    Each chunk adds the same to the peak (its graph, or with cached gradients its vectors), so the step is run with
    one and two chunks and the rest extrapolated: every chunk taken full. Where gradients stay in place between the
    backward passes of a step (no ZeRO-2 hooks: a CPU) and there is more than one pass (accumulated loss batches, or
    cached gradients' chunks), a second pass adds fresh gradients to the kept ones, and its peak counts them too."""
    vision = preset.vision_encoder and model_config(preset.vision_encoder)
    key = json.dumps([stage, model_config(preset.student), vision, [t.dim for t in preset.teachers], preset.mrl_dims,
                      preset.max_length, preset.forward_chunk, preset.pooler, preset.image_tokens, rows, str(dtype),
                      checkpointing, cached, drop_grads, accumulation])
    if key not in MEASURED:
        MEASURED[key] = measure_step(stage, preset, rows, dtype, checkpointing, cached, drop_grads, accumulation)
    return MEASURED[key]


def measure_step(stage, preset, rows, dtype, checkpointing, cached, drop_grads, accumulation):
    chunks = math.ceil(rows / preset.forward_chunk)
    passes = accumulation * (chunks if cached else 1)  # backward passes of a step on a rank
    again = passes > 1 and not drop_grads
    one, trainable, frozen, layers = fake_step(stage, preset, 1, dtype, checkpointing, cached, drop_grads, again)
    two = fake_step(stage, preset, 2, dtype, checkpointing, cached, drop_grads, again)[0] if chunks > 1 else one
    return one + (chunks - 1) * (two - one), trainable, frozen, *layers


def fake_step(stage: int, preset: Preset, chunks: int, dtype, checkpointing: bool, cached: bool, drop_grads: bool,
              again: bool = False):
    """One micro-step of `chunks` full forward chunks on fake tensors, as train.py takes it, and with `again` a second
    one whose gradients are added to the first's: (peak bytes, trainable parameters, frozen parameters, (layers that
    save activations, layers))."""
    from train_minimal import freeze_for_stage
    with FakeTensorMode():
        model = fake_student(stage, preset, dtype)
        trainable = sum(freeze_for_stage(model, stage).values())
        frozen = sum(w.numel() for w in model.parameters()) - trainable
        if checkpointing:
            enable_checkpointing(model, stage)
        if drop_grads:  # ZeRO-2's hooks take each 16-bit gradient into the reduction bucket as it is made
            for w in model.parameters():
                if w.requires_grad:
                    w.register_post_accumulate_grad_hook(lambda w: setattr(w, "grad", None))
        inputs = [fake_inputs(model, stage, preset.forward_chunk, preset) for _ in range(chunks)]
        with LiveBytes(ignore=[*model.parameters(), *model.buffers()]) as tracker:
            if stage == 4:  # the captions' vectors, the teacher: without a graph, before the images'
                with torch.no_grad():
                    model(**fake_inputs(model, 1, preset.forward_chunk, preset))
            if cached:
                with torch.no_grad():
                    kept = [model(**batch) for batch in inputs]
                for _ in range(1 + again):
                    backward(model(**inputs[0]))
                del kept
            else:
                for _ in range(1 + again):
                    backward(*[model(**batch) for batch in inputs])
    return tracker.peak, trainable, frozen, saving_layers(model, stage)


def enable_checkpointing(model: jasper.Jasper, stage: int) -> None:
    """Activation checkpointing (transformers' own, non-reentrant) on the encoders a backward pass goes through: none
    in stage 1 (FC1 alone trains), the language model in stages 2 and 3, both towers in stage 4. Transformers also
    makes a text encoder's embeddings require gradients, which only the reentrant kind needs; that is undone, or every
    frozen layer of stage 2 would keep its activations for a backward pass that does nothing."""
    for encoder in {1: [], 2: [model.text], 3: [model.text], 4: [model.vision, model.text]}[stage]:
        encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if encoder.main_input_name == "input_ids":
            encoder.disable_input_require_grads()


def fake_inputs(model: jasper.Jasper, stage: int, n: int, preset: Preset) -> dict:
    if stage == 4:
        size = model.vision.config.image_size
        return {"pixel_values": torch.randn(n, 3, size, size)}
    ids = torch.zeros(n, preset.max_length, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def backward(*outputs: dict) -> None:
    """Backward from every head of every output, as the loss's gradient reaches them."""
    torch.autograd.backward([v for out in outputs for v in out.values()],
                            [torch.ones_like(v) for out in outputs for v in out.values()])


def saving_layers(model: jasper.Jasper, stage: int) -> tuple[int, int]:
    """How many encoder layers keep activations for backward (those that train, and every layer after an input that
    needs a gradient: stage 4's image tokens pass through the whole frozen language model), of how many there are."""
    text = len(jasper.encoder_layers(model.text))
    if stage == 4:
        vision = len(jasper.encoder_layers(model.vision))
        return vision + text, vision + text
    return {1: 0, 2: 3, 3: text}[stage], text


def loss_memory(stage: int, preset: Preset, batch: int) -> tuple[int, int]:
    """(target rows, losses): bytes of the loss batch's teacher vectors (float16 rows read, float32 target) and the
    peak the loss's forward and backward add, measured on real tensors of the loss batch's shape."""
    widths = [target_width(preset), *(preset.mrl_dims if stage >= 3 else ())]
    with LiveBytes() as tracker:
        if stage == 4:
            teacher = {w: torch.nn.functional.normalize(torch.randn(batch, w), dim=-1) for w in widths}
        else:
            rows = [torch.randn(batch, t.dim, dtype=torch.float16).float() for t in preset.teachers]
            teacher = jasper.teacher_target(*rows)
            del rows
        target = sum(v.numel() for v in (teacher.values() if stage == 4 else [teacher])) * 4
        student = {w: torch.nn.functional.normalize(torch.randn(batch, w), dim=-1).requires_grad_(True)
                   for w in widths}
        loss = (jasper.image_distill_loss(student, teacher) if stage == 4
                else jasper.text_distill_loss(student, teacher, head_average=preset.head_average))["loss"]
        loss.backward()
    return target, max(0, tracker.peak - target)


class LiveBytes(TorchDispatchMode):
    """Inside it, the bytes of every tensor storage an operation makes count while the storage lives; `peak` keeps
    the most at any moment. Storages that exist before (the weights: `ignore`) never count. On fake tensors this is
    the memory the same code would take, with none taken."""

    def __init__(self, ignore=()):
        super().__init__()
        self.live = self.peak = 0
        self.counted = WeakIdKeyDictionary()
        for tensor in ignore:
            self.counted[tensor.untyped_storage()] = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage() not in self.counted:
                storage = tensor.untyped_storage()
                self.counted[storage] = storage.nbytes()
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self.free, storage.nbytes())
        return out

    def free(self, size: int) -> None:
        self.live -= size


# ----------------------------------------------------------------------------- the tables of docs/paper-scale.md

MEAN_TOKENS = 215  # the paper's mix, about 1.7B tokens in 8M texts (docs/paper-scale.md); an estimate
PEAK_BF16 = {"RTX A6000": 154.8e12, "H100": 989e12}  # dense bf16 tensor-core FLOP/s


def step_flops(stage: int, preset: Preset, stage_plan: StagePlan, plan: Plan) -> float:
    """A step's FLOPs, estimated: 2 per weight and token forward, 4 backward (2 where only the inputs' gradients are
    needed: stage 4's frozen language model), texts at MEAN_TOKENS, images at their 729 patches and their image tokens,
    plus the forward passes the memory settings repeat. Attention's own FLOPs are left out (a few percent here)."""
    examples = stage_plan.batch_size * preset.loss_batches
    if stage == 4:  # the vision tower trains (plan.trainable); the language model (plan.frozen) passes gradients on
        patches = (SIGLIP_SO400M["image_size"] // SIGLIP_SO400M["patch_size"]) ** 2
        forward = 2 * plan.trainable * patches + 2 * plan.frozen * preset.image_tokens
        return examples * (forward * (1 + plan.recompute) + 4 * plan.trainable * patches
                           + 2 * plan.frozen * preset.image_tokens)
    forward = 2 * (plan.trainable + plan.frozen) * MEAN_TOKENS
    backward_share = {1: 0.0, 2: 3 / 28, 3: 1.0}[stage]  # of the encoder's layers a backward pass goes through
    return examples * (forward * (1 + plan.recompute) + 2 * forward * backward_share)


def paper_tables() -> str:
    """The plan of every stage of the paper preset on 8 x 48 GB (the authors' RTX A6000s), 8 x 80 GB and 1 x 80 GB
    (H100s), with each stage's hours estimated at 40% of the cards' bf16 peak."""
    from presets import load
    paper = load("paper")
    rows = ["| stage | GPUs | memory settings | weights, gradients, optimizer | step | peak GB per GPU | fits | "
            "hours (estimate) |", "|---|---|---|---:|---:|---:|---|---:|"]
    for stage in (1, 2, 3, 4):
        stage_plan = paper.stages[stage]
        for gpus, memory, card in ((8, 48, "RTX A6000"), (8, 80, "H100"), (1, 80, "H100")):
            report = plan(stage, paper, stage_plan, gpus, memory)
            p = report.chosen
            states = sum(v for k, v in p.parts.items() if k.startswith(("16-bit", "gradients", "optimizer")))
            hours = stage_plan.steps * step_flops(stage, paper, stage_plan, p) / (gpus * 0.4 * PEAK_BF16[card]) / 3600
            rows.append(f"| {stage} | {gpus} x {memory} GB | {p.settings()} | {states / GIB:.1f} | "
                        f"{p.parts['step: activations'] / GIB:.1f} | {p.peak / GIB:.1f} | "
                        f"{'yes' if p.fits else 'no: ' + report.remedy()} | {hours:.1f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(paper_tables())
