"""
Jasper and Stella: distillation of SOTA embedding models.
Dun Zhang, Jiacheng Li, Ziyang Zeng, Fulong Wang. arXiv:2412.19048 (2024).

A student embedding model learns to reproduce the vectors of several frozen teacher models.

Notation (paper 2.1). A batch holds m texts x. s_x is the student's L2-normalized vector of x; t_x is the
teachers' vectors of x, each L2-normalized, concatenated and L2-normalized again. S and T stack them as rows.
The batch has P = C(m,2) text pairs (i,j), i < j, and N = C(P,2) pairs of those pairs.

    (1) L_cos   = sum_x (1 - s_x . t_x)
    (2) L_sim   = MSE(S S^T, T T^T)
    (3) L_resim = 1/N sum over pairs of pairs ((i,j), (k,l)) with t_i.t_j > t_k.t_l of
                      max(0, s_k.s_l - s_i.s_j + margin)
    (4) L       = l1 L_cos + l2 L_sim + l3 L_resim,   (l1, l2, l3) = (10, 200, 20),   margin = 0.015

The student (paper 2.2, Figure 1): a bidirectional language model with mean pooling, a vision encoder whose
tokens a pooler shrinks to fewer tokens at the language model's input width, and fully connected heads. FC1
maps to the teachers' concatenated width (12288 = 4096 + 8192 in the paper); FC2-FC4 are the short
Matryoshka (MRL) heads added in stage 3. Unlike Matryoshka representation learning proper (Kusupati et al.,
2022), where one vector's prefixes are the short vectors, each head here is its own linear layer (paper 2.4).

The stages (paper 2.3-2.5): what trains, and the loss.
    1: FC1                                  eq. (4), FC1 against the target
    2: FC1 + the last 3 encoder layers      eq. (4), FC1 against the target
    3: the text side and every head         FC1: eq. (4); short heads: 200 L_sim + 20 L_resim (text_distill_loss)
    4: the vision encoder                   every head: eq. (4), image against its caption (image_distill_loss)

This file reads top to bottom: input checks, the target and the losses (pure functions on (m, d) matrices),
the config, the modules (with saving and loading), the stage plan. The exact fast L_resim for large batches is in
resim_counted.py; export.py also writes a saved folder as a sentence-transformers model.
"""

import inspect
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor
from transformers import MODEL_MAPPING, AutoConfig, SiglipVisionConfig, SiglipVisionModel

from resim_counted import resim_hinge_sum_counted

LOSS_WEIGHTS = {"cos": 10.0, "sim": 200.0, "resim": 20.0}  # lambda_1..3, paper 3.1
MARGIN = 0.015  # paper 3.1
UNIT_NORM_TOLERANCE = 1e-2  # bf16 rounding keeps row norms within ~4e-3 of 1
TIE_TOLERANCE = 1e-6  # teacher similarities closer than this tie (float32 dot products err ~6e-7)
DENSE_RESIM_MAX_PAIRS = 496  # text pairs (m <= 32): both ways take ~2 ms there, and the dense one is the reference


# ----------------------------------------------------------------------------- input checks

def check_vectors(unit: bool = True, **named: Tensor) -> None:
    """Raise ValueError, naming the argument, unless every tensor is a finite (m, d) matrix with m, d >= 1 and the same
    m for all, whose rows are unit vectors (unit=True: student and target vectors) or at least not zero (unit=False:
    a teacher's raw outputs). The loss entry points (distill_loss, text_distill_loss, image_distill_loss) and
    teacher_target start with it: a misaligned or broken vector file otherwise turns into a silently wrong loss. The
    value checks of all tensors are read back together, one device sync per call."""
    for name, v in named.items():
        if v.dim() != 2:
            raise ValueError(f"{name} must be a (batch, dim) matrix, got shape {tuple(v.shape)}")
        if v.shape[0] == 0 or v.shape[1] == 0:
            raise ValueError(f"{name} is empty: shape {tuple(v.shape)}")
    rows = {name: v.shape[0] for name, v in named.items()}
    if len(set(rows.values())) > 1:
        raise ValueError(f"batch sizes differ: {rows}")
    norms = {name: v.detach().float().norm(dim=-1) for name, v in named.items()}
    finite = [bool(ok) for ok in torch.stack([torch.isfinite(v).all() for v in named.values()]).tolist()]
    extremes = torch.stack([torch.stack([n.min(), n.max()]) for n in norms.values()]).tolist()
    for name, ok, (low, high) in zip(named, finite, extremes):
        if not ok:
            raise ValueError(f"{name} contains NaN or inf")
        if unit and max(abs(low - 1), abs(high - 1)) > UNIT_NORM_TOLERANCE:
            raise ValueError(f"{name} rows must be L2-normalized, found norms from {low:.4g} to {high:.4g}")
        if not unit and low == 0:
            raise ValueError(f"{name} has an all-zero vector, which has no direction")


# ----------------------------------------------------------------------------- teacher target

def teacher_target(*teacher_vectors: Tensor) -> Tensor:
    """t_x = normalize(concat(normalize(t1_x), normalize(t2_x), ...)), paper 2.1.

    teacher_vectors: k matrices (m, d_1) ... (m, d_k), raw teacher outputs (any norm, not zero).
    Returns (m, d_1 + ... + d_k) with unit rows. Normalizing each teacher first gives every teacher
    the same weight in the target, whatever the scale of its outputs: t . t' = (a . a' + b . b') / 2 for two.

        >>> jasper.teacher_target(nv_embed_vectors, stella_vectors).shape   # (m, 4096), (m, 8192)
        torch.Size([m, 12288])
    """
    if not teacher_vectors:
        raise ValueError("teacher_target needs at least one teacher's vectors")
    check_vectors(unit=False, **{f"teacher {k}": v for k, v in enumerate(teacher_vectors)})
    return F.normalize(torch.cat([F.normalize(v, dim=-1) for v in teacher_vectors], dim=-1), dim=-1)


# ----------------------------------------------------------------------------- the three losses
# The parts take unit rows as they come; the entry points below check their inputs once per call.

def cosine_loss(s: Tensor, t: Tensor) -> Tensor:
    """Eq. (1): L_cos = sum_x (1 - s_x . t_x), taken as the mean over the batch.

    s, t: (m, d) unit rows of the same width -> scalar. Each text alone: is the student's vector the teacher's?
    It is sentence-transformers' CosineSimilarityLoss with every label 1 (or MSELoss's direction-only cousin). The
    paper writes a sum; the official implementation (RAG-Retrieval, model_distill.py, via F.cosine_embedding_loss),
    with which the weights 10/200/20 were tuned, averages over the batch, so we do too: the loss does not grow with m.

        >>> jasper.cosine_loss(s, t)       # 0 when every s_x == t_x, 1 when all are orthogonal
    """
    if s.shape[-1] != t.shape[-1]:
        raise ValueError(f"cosine_loss needs the same width, got student {s.shape[-1]} and teacher "
                         f"{t.shape[-1]}; short heads use similarity_loss and resim_loss only")
    return (1 - (s * t).sum(dim=-1)).mean()


def similarity_loss(s: Tensor, t: Tensor) -> Tensor:
    """Eq. (2): L_sim = MSE(S S^T, T T^T), the mean over all m*m entries.

    s: (m, d_s), t: (m, d_t) unit rows -> scalar. Every pair of texts: are they as similar for the student as for the
    teachers? This is MSE on the Gram matrices (sentence-transformers' MSELoss compares vectors; this compares their
    pairwise cosines), so the widths may differ: a 256-d MRL head learns from the 12288-d target this way.

        >>> jasper.similarity_loss(s[:, :256], t)   # any student width against any teacher width
    """
    return F.mse_loss(s @ s.T, t @ t.T)


def resim_loss(s: Tensor, t: Tensor, margin: float = MARGIN, method: str = "auto") -> Tensor:
    """Eq. (3), relative similarity distillation:

        L_resim = 1/N sum over pairs of text pairs ((i,j), (k,l)) with t_i.t_j > t_k.t_l of
                      max(0, s_k.s_l - s_i.s_j + margin)

    s: (m, d_s), t: (m, d_t) unit rows -> scalar. Every pair of pairs: whenever the teachers rank text pair (i,j) above
    pair (k,l), the student must too, by `margin`. It is CoSENT (Su, 2022; sentence-transformers' CoSENTLoss), which
    ranks pairs by their labels with a smooth log-sum-exp, with the teachers' similarities as the labels and a hinge
    in place of the log-sum-exp: a pair of pairs the student already orders by the margin adds nothing.

    The text pairs are the P = C(m,2) unordered pairs i < j. Of the two orders of a pair of pairs at most one is
    "greater", so the sum has at most one term per unordered pair of pairs, and N, the paper's count of them, is
    C(P, 2) (the sentence after its eq. 3; also the official code's mean): the loss does not grow with the batch. A
    teacher tie is never "greater" and adds nothing; "greater" means by more than TIE_TOLERANCE, so a duplicated text,
    whose similarities a matrix product may round differently in the last bit, ties instead of being ranked by
    rounding noise. m < 3 has no pair of pairs: the loss is 0.

    method: "dense" compares all pairs of pairs (resim_hinge_sum_dense: the readable reference, a P x P mask, O(m^4)
    memory); "counted" gets the same value and gradient in O(P log P) time and O(P) memory (resim_counted.py); "auto"
    takes dense up to DENSE_RESIM_MAX_PAIRS text pairs (m <= 32).

        >>> jasper.resim_loss(s, t)        # 0 once the student orders every pair of pairs like the teachers, by 0.015
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if method not in ("auto", "dense", "counted"):
        raise ValueError(f"method must be 'auto', 'dense' or 'counted', got {method!r}")
    m = s.shape[0]
    i, j = torch.triu_indices(m, m, offset=1, device=s.device)
    s_pairs = (s @ s.T)[i, j]  # (P,) student similarity of each text pair i < j
    t_pairs = (t @ t.T)[i, j]  # (P,) teacher similarity of each text pair
    n_pairs = s_pairs.shape[0]
    if n_pairs < 2:
        return s_pairs.sum() * 0.0  # no pair of pairs; keeps the graph so backward gives zeros
    if method == "auto":
        method = "dense" if n_pairs <= DENSE_RESIM_MAX_PAIRS else "counted"
    if method == "dense":
        hinge_sum = resim_hinge_sum_dense(s_pairs, t_pairs, margin)
    else:
        hinge_sum = resim_hinge_sum_counted(s_pairs, t_pairs, margin, TIE_TOLERANCE)
    return hinge_sum / math.comb(n_pairs, 2)  # N


def resim_hinge_sum_dense(s_pairs: Tensor, t_pairs: Tensor, margin: float) -> Tensor:
    """Eq. (3)'s sum over pairs of text pairs, written out. s_pairs, t_pairs: (P,) -> scalar."""
    # (P, P): row a is the pair the teachers rank higher, column b the lower one
    teacher_higher = t_pairs[:, None] > t_pairs[None, :] + TIE_TOLERANCE
    hinge = F.relu((s_pairs[None, :] + margin) - s_pairs[:, None])
    return (hinge * teacher_higher).sum()


def head_parts(s: Tensor, t: Tensor, margin: float = MARGIN) -> dict[str, Tensor]:
    """One head's unweighted parts: "cos" only when the widths match (L_cos needs the two vectors in one space), then
    "sim" and "resim". Inputs unchecked: the entry points check them."""
    parts = {"cos": cosine_loss(s, t)} if s.shape[-1] == t.shape[-1] else {}
    return parts | {"sim": similarity_loss(s, t), "resim": resim_loss(s, t, margin)}


def weighted(parts: dict[str, Tensor], names=("cos", "sim", "resim")) -> Tensor:
    """Eq. (4)'s weighted sum of those of the parts named."""
    return sum(LOSS_WEIGHTS[name] * parts[name] for name in names if name in parts)


def distill_loss(s: Tensor, t: Tensor, margin: float = MARGIN) -> dict[str, Tensor]:
    """Eq. (4): L = 10 L_cos + 200 L_sim + 20 L_resim for one head.

    s: (m, d_s) student head, t: (m, d_t) teacher vectors, unit rows. L_cos needs the two vectors in the same space,
    so it enters only when d_s == d_t: FC1 against the teachers' target (stages 1-3), and every head in stage 4, where
    the caption's vector from the same head is the teacher. A short MRL head against the wide target (stage 3) gets
    L_sim + L_resim only (paper 2.4).

        >>> parts = jasper.distill_loss(s, t)      # {"loss": weighted total, "cos", "sim", "resim": unweighted}
        >>> parts["loss"].backward()
    """
    check_vectors(s=s, t=t)
    parts = head_parts(s, t, margin)
    return parts | {"loss": weighted(parts)}


def named_parts(per_head: dict[int, dict[str, Tensor]]) -> dict[str, Tensor]:
    """{width: {"cos": ..., ...}} -> {"{width}_cos": ..., ...}: the unweighted parts, for logging."""
    return {f"{width}_{name}": value for width, parts in per_head.items() for name, value in parts.items()}


HEAD_AVERAGES = ("all", "short")


def text_distill_loss(student: dict[int, Tensor], target: Tensor, short_teacher: str = "target",
                      head_average: str = "all") -> dict[str, Tensor]:
    """The loss of stages 1-3: every head of the student against the teachers' target T (paper 2.3-2.4). FC1, as wide
    as T, gets all three losses; a short head (FC2-FC4, H below) cannot be compared with T vector by vector, only by
    its similarities. How the heads add up the paper leaves open; `head_average` says:

        "all"   (the release, RAG-Retrieval's model_distill.py):
                L = 10 L_cos(S_FC1, T) + 1/|H+1| sum_{h in FC1 and H} (200 L_sim(S_h, T) + 20 L_resim(S_h, T))
        "short" (FC1 keeps its whole eq. (4), the short heads come on top, averaged):
                L = L_4(S_FC1, T) + 1/|H| sum_{h in H} (200 L_sim(S_h, T) + 20 L_resim(S_h, T))

    With no short head (stages 1-2) both are eq. (4) for FC1. Against "all", "short" weighs FC1's L_sim and L_resim
    |H + 1| times as much and the short heads' (|H| + 1) / |H| times, relative to L_cos.

    student: {width: (m, width) unit rows}, one entry per FC head; target: (m, D) unit rows.
    short_teacher: what the short heads learn from: "target", the teachers' vectors (paper 2.4); "fc1", FC1's own
    vectors, detached (the self-distillation paper 2.4 proposes but never evaluates); or "both", the mean of the two.

        >>> jasper.text_distill_loss({12288: s_fc1, 1024: s_fc2, 512: s_fc3, 256: s_fc4}, t)["loss"]

    Returns {"loss": total, "{width}_{part}": each unweighted part of each head}.
    """
    full_width = target.shape[-1]
    if full_width not in student:
        raise ValueError(f"no head as wide as the target ({full_width}); the student has {sorted(student)}")
    if head_average not in HEAD_AVERAGES:
        raise ValueError(f"head_average must be one of {HEAD_AVERAGES}, got {head_average!r}")
    teachers = {"target": [target], "fc1": [student[full_width].detach()],
                "both": [target, student[full_width].detach()]}
    if short_teacher not in teachers:
        raise ValueError(f"short_teacher must be one of {sorted(teachers)}, got {short_teacher!r}")
    check_vectors(target=target, **{f"head {width}": v for width, v in student.items()})
    per_head = {full_width: head_parts(student[full_width], target)}
    for width in (w for w in student if w != full_width):
        losses = [head_parts(student[width], t) for t in teachers[short_teacher]]
        per_head[width] = {name: sum(parts[name] for parts in losses) / len(losses) for name in losses[0]}
    fc1, short = per_head[full_width], [per_head[w] for w in per_head if w != full_width]
    if not short:  # stages 1-2: eq. (4) for FC1, whichever the average
        loss = weighted(fc1)
    elif head_average == "all":
        loss = weighted(fc1, ("cos",)) + sum(weighted(h, ("sim", "resim")) for h in [fc1, *short]) / (1 + len(short))
    else:
        loss = weighted(fc1) + sum(weighted(h, ("sim", "resim")) for h in short) / len(short)
    return {"loss": loss, **named_parts(per_head)}


def image_distill_loss(image: dict[int, Tensor], caption: dict[int, Tensor]) -> dict[str, Tensor]:
    """The loss of stage 4 (paper 2.5): every FC head h gives a student vector for each image and a teacher
    vector for its caption (from the frozen text side, so detached); eq. (4) per head, all three parts since the
    widths match, averaged over the heads ("three losses, which are then averaged": this repository reads it as the
    mean of eq. (4) over the heads):

        L = 1/|heads| sum_h L_4(S_h(images), S_h(captions))

    image, caption: {width: (m, width) unit rows}, the same widths.

        >>> jasper.image_distill_loss(model(pixel_values=pixels), captions)["loss"]

    Returns {"loss": mean over heads, "{width}_{part}": each unweighted part of each head}.
    """
    if sorted(image) != sorted(caption):
        raise ValueError(f"image heads {sorted(image)} and caption heads {sorted(caption)} differ")
    check_vectors(**{f"image {w}": v for w, v in image.items()}, **{f"caption {w}": v for w, v in caption.items()})
    per_head = {width: head_parts(image[width], caption[width].detach()) for width in image}
    total = sum(weighted(parts) for parts in per_head.values()) / len(per_head)
    return {"loss": total, **named_parts(per_head)}


# ----------------------------------------------------------------------------- pooling

def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """The average of the token states over the non-padding tokens (paper 2.2, component 1).

    hidden: (B, L, H), attention_mask: (B, L) with 1 for tokens, 0 for padding -> (B, H), float32.
    """
    if attention_mask.shape != hidden.shape[:2]:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match the "
                         f"hidden states {tuple(hidden.shape[:2])}")
    counts = attention_mask.sum(dim=1)  # (B,)
    if not isinstance(counts, FakeTensor) and (counts == 0).any():  # the memory plan's fake tensors have no values
        raise ValueError(f"empty text: rows {counts.eq(0).nonzero().flatten().tolist()} have no tokens")
    mask = attention_mask.unsqueeze(-1).float()  # (B, L, 1)
    return (hidden.float() * mask).sum(dim=1) / counts.unsqueeze(-1).float()


# ----------------------------------------------------------------------------- config

@dataclass
class JasperConfig:
    """What to build. A model spec is a hub id or local folder (pretrained weights), or a dict of
    transformers config fields with "model_type" (random init: tests and tiny demos)."""
    text_encoder: str | dict  # paper: dunzhang/stella_en_1.5B_v5 (a Qwen2, made bidirectional)
    vision_encoder: str | dict | None = None  # paper: google/siglip-so400m-patch14-384; None: text only
    head_dims: list[int] = field(default_factory=lambda: [12288])  # FC1 (teacher width), then MRL
    pooler: str = "average"  # POOLERS: how vision tokens become image tokens
    image_tokens: int = 300  # the image's length in the language model (the release: 300)
    vector_dropout: float = 0.0  # dropout on the mean-pooled vector before the heads, while training

    def __post_init__(self):
        if not self.head_dims or any(d <= 0 for d in self.head_dims):
            raise ValueError(f"head_dims must be positive widths, FC1 first; got {self.head_dims}")
        if len(set(self.head_dims)) != len(self.head_dims):
            raise ValueError(f"head_dims must be distinct (heads are named by width): {self.head_dims}")
        if self.pooler not in POOLERS:
            raise ValueError(f"pooler must be one of {POOLERS}, got {self.pooler!r}")
        if self.image_tokens < 1 or (self.pooler == "mlp" and math.isqrt(self.image_tokens) ** 2 != self.image_tokens):
            raise ValueError(f"image_tokens must be positive, and a square number (a k x k grid) for the mlp "
                             f"pooler; got {self.image_tokens}")
        if not 0 <= self.vector_dropout < 1:
            raise ValueError(f"vector_dropout must be in [0, 1), got {self.vector_dropout}")


# ----------------------------------------------------------------------------- modules

def make_bidirectional(model: nn.Module) -> None:
    """Turn off causal masking everywhere. Qwen2-style decoders build their attention mask from
    config.is_causal; each attention layer also carries an is_causal flag, which the SDPA path reads
    when transformers skips building a mask. Both are set, so no code path stays causal
    (tests/test_model.py checks the result, with and without padding)."""
    model.config.is_causal = False
    for module in model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False


def load_text_encoder(spec: str | dict) -> nn.Module:
    """A transformers encoder (no LM head) with bidirectional attention."""
    from_config = isinstance(spec, dict)
    config = AutoConfig.for_model(**spec) if from_config else AutoConfig.from_pretrained(spec)
    config.is_causal, config.use_cache = False, False
    model_class = MODEL_MAPPING[type(config)]
    options = {"attn_implementation": "sdpa"}
    if "add_pooling_layer" in inspect.signature(model_class.__init__).parameters:
        options["add_pooling_layer"] = False  # BERT's [CLS] pooler: mean pooling replaces it
    model = (model_class._from_config(config, **options) if from_config
             else model_class.from_pretrained(spec, config=config, **options))
    make_bidirectional(model)
    return model


def load_vision_encoder(spec: str | dict) -> SiglipVisionModel:
    """SigLIP's vision tower; a full SigLIP checkpoint (vision + text) loads its vision half. Its
    attention-pooling head is left out: the pooler below takes the patch tokens instead."""
    if isinstance(spec, dict):
        fields = {k: v for k, v in spec.items() if k != "model_type"} | {"vision_use_head": False}
        return SiglipVisionModel(SiglipVisionConfig(**fields))
    return SiglipVisionModel.from_pretrained(spec, vision_use_head=False, attn_implementation="sdpa")


def load_image_processor(spec: str | dict):
    """The vision encoder's preprocessing (resize, rescale, normalize to SigLIP's mean/std 0.5): from a
    hub id or folder, or for a config dict, SigLIP's defaults at the config's image size."""
    if isinstance(spec, dict):
        from transformers import SiglipImageProcessorPil
        return SiglipImageProcessorPil(size={"height": spec["image_size"], "width": spec["image_size"]})
    from transformers import AutoImageProcessor
    return AutoImageProcessor.from_pretrained(spec)


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks of a transformers model (Qwen2: .layers, BERT: .encoder.layer)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == model.config.num_hidden_layers:
            return module
    raise ValueError(f"no list of {model.config.num_hidden_layers} layers in {type(model).__name__}")


class AveragePooler(nn.Module):
    """Vision tokens -> image tokens at the language model's input width, with no weights (paper 2.2, component 3;
    the release's pooler): average pooling over the (tokens, width) matrix of each image, down (or up, by
    repeating) to (image_tokens, text width). (B, P, D_vision) -> (B, image_tokens, D_text)."""

    def __init__(self, text_width: int, image_tokens: int):
        super().__init__()
        self.shape = (image_tokens, text_width)

    def forward(self, vision_tokens: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(vision_tokens.unsqueeze(1), self.shape).squeeze(1)  # one "channel" per image


class GridMLPPooler(nn.Module):
    """Vision tokens -> image tokens with weights: the square patch grid averaged down to a k x k grid
    (k*k = image_tokens), which keeps the layout, then a two-layer MLP (LLaVA-1.5's projector) to the LM width.
    (B, P, D_vision) with P a square -> (B, image_tokens, D_text)."""

    def __init__(self, vision_width: int, text_width: int, image_tokens: int):
        super().__init__()
        self.side = math.isqrt(image_tokens)
        self.mlp = nn.Sequential(nn.Linear(vision_width, text_width), nn.GELU(), nn.Linear(text_width, text_width))

    def forward(self, vision_tokens: Tensor) -> Tensor:
        grid = math.isqrt(vision_tokens.shape[1])
        if grid * grid != vision_tokens.shape[1]:
            raise ValueError(f"expected a square grid of patches, got {vision_tokens.shape[1]} tokens")
        x = rearrange(vision_tokens, "b (h w) d -> b d h w", h=grid)
        x = F.adaptive_avg_pool2d(x, self.side)  # (B, D_vision, k, k)
        return self.mlp(rearrange(x, "b d h w -> b (h w) d"))


POOLERS = ("average", "mlp")


def make_pooler(kind: str, vision_width: int, text_width: int, image_tokens: int) -> nn.Module:
    if kind == "average":
        return AveragePooler(text_width, image_tokens)
    return GridMLPPooler(vision_width, text_width, image_tokens)


class Jasper(nn.Module):
    """The student: text (or image) -> one unit vector per FC head, keyed by the head's width."""

    def __init__(self, config: JasperConfig):
        super().__init__()
        self.config = config
        self.text = load_text_encoder(config.text_encoder)
        width = self.text.config.hidden_size
        # FC1..FC4 act on the pooled hidden state (paper 2.4: FC3 has shape (1536, 512))
        self.heads = nn.ModuleDict({str(d): nn.Linear(width, d) for d in config.head_dims})
        self.vision = self.pooler = None
        if config.vision_encoder is not None:
            self.add_vision(config.vision_encoder, config.pooler, config.image_tokens)

    @property
    def fc1(self) -> nn.Linear:
        return self.heads[str(self.config.head_dims[0])]

    def add_heads(self, dims: list[int]) -> None:
        """Stage 3: add the short MRL heads FC2, FC3, ... next to FC1."""
        new_dims = [d for d in dims if str(d) not in self.heads]
        self.config = replace(self.config, head_dims=self.config.head_dims + new_dims)
        width = self.text.config.hidden_size
        for d in new_dims:
            self.heads[str(d)] = nn.Linear(width, d).to(self.fc1.weight.device, self.fc1.weight.dtype)

    def add_vision(self, spec: str | dict, pooler: str, image_tokens: int) -> None:
        """Stage 4: attach a vision encoder and a fresh pooler to a text-only model."""
        self.config = replace(self.config, vision_encoder=spec, pooler=pooler, image_tokens=image_tokens)
        self.vision = load_vision_encoder(spec)
        self.pooler = make_pooler(pooler, self.vision.config.hidden_size, self.text.config.hidden_size, image_tokens)
        if self.vision.device != self.fc1.weight.device:  # the text side may be on a GPU already
            self.vision.to(self.fc1.weight.device)
            self.pooler.to(self.fc1.weight.device)

    def embed_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L) token ids and mask -> (B, H) mean-pooled hidden states."""
        if input_ids.shape != attention_mask.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask "
                             f"{tuple(attention_mask.shape)} differ in shape")
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def embed_image(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, S, S) images -> (B, H): vision tower, pooler, then the same language model.
        The image tokens alone form the LM's input sequence (no text around them)."""
        if self.vision is None:
            raise ValueError("this Jasper has no vision encoder (JasperConfig.vision_encoder is None)")
        pixel_values = pixel_values.to(self.vision.dtype)  # bf16 under DeepSpeed on GPU
        tokens = self.pooler(self.vision(pixel_values=pixel_values).last_hidden_state)  # (B, image_tokens, H)
        mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
        hidden = self.text(inputs_embeds=tokens, attention_mask=mask).last_hidden_state
        return mean_pool(hidden, mask)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                pixel_values: Tensor | None = None, pooled: Tensor | None = None) -> dict[int, Tensor]:
        """Texts (input_ids + attention_mask), images (pixel_values) or their mean-pooled states (pooled,
        (B, H), e.g. computed once while the encoder is frozen) -> {width: (B, width) unit rows}. While training,
        config.vector_dropout zeroes that share of the pooled vector's features (scaling the rest up) before the
        heads: the released config's vector_dropout_p."""
        if sum(x is not None for x in (input_ids, pixel_values, pooled)) != 1:
            raise ValueError("pass exactly one of input_ids (+ attention_mask), pixel_values or pooled")
        if input_ids is not None and attention_mask is None:
            raise ValueError("input_ids need an attention_mask (1 for tokens, 0 for padding)")
        if input_ids is not None:
            pooled = self.embed_text(input_ids, attention_mask)
        elif pixel_values is not None:
            pooled = self.embed_image(pixel_values)
        pooled = F.dropout(pooled, self.config.vector_dropout, self.training)
        return {int(d): F.normalize(head(pooled.to(head.weight.dtype)).float(), dim=-1)
                for d, head in self.heads.items()}

    def save_pretrained(self, path: str | Path) -> None:
        """Write the model to a folder that from_pretrained loads exactly:

            path/text/                 the language model (a transformers folder; its tokenizer belongs there too)
            path/vision/               the vision encoder, once stage 4 has added one
            path/jasper.safetensors    the FC heads, and the pooler's weights where it has any
            path/jasper_config.json    JasperConfig, with text/ and vision/ as the encoders
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.text.save_pretrained(path / "text")
        if self.vision is not None:
            self.vision.save_pretrained(path / "vision")
        own = {k: v.detach().contiguous() for k, v in self.state_dict().items()
               if not k.startswith(("text.", "vision."))}
        save_file(own, path / "jasper.safetensors")
        config = replace(self.config, text_encoder="text", vision_encoder=None if self.vision is None else "vision")
        (path / "jasper_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Jasper":
        """The model save_pretrained wrote to `path`, exactly."""
        path = Path(path)
        if not (path / "jasper_config.json").is_file():
            raise FileNotFoundError(f"{path} has no jasper_config.json; is it a Jasper.save_pretrained folder?")
        fields = json.loads((path / "jasper_config.json").read_text())
        fields["text_encoder"] = str(path / fields["text_encoder"])
        if fields["vision_encoder"] is not None:
            fields["vision_encoder"] = str(path / fields["vision_encoder"])
        model = cls(JasperConfig(**fields))
        missing, unexpected = model.load_state_dict(load_file(path / "jasper.safetensors"), strict=False)
        missing = [k for k in missing if not k.startswith(("text.", "vision."))]
        if missing or unexpected:
            raise ValueError(f"{path}/jasper.safetensors does not match jasper_config.json: "
                             f"missing {missing}, unexpected {unexpected}")
        return model


# ----------------------------------------------------------------------------- the stage plan

def set_trainable(model: Jasper, stage: int) -> dict[str, int]:
    """Set requires_grad as the paper trains stage 1, 2, 3 or 4; everything else is frozen.

        1: FC1                                   (paper 2.3)
        2: FC1 + the last 3 encoder layers       (paper 2.3)
        3: the text encoder and every FC head    (paper 2.4: "all parameters of the student")
        4: the vision encoder, and the pooler's weights if it has any (paper 2.5: "training the visual encoder")

    Returns {parameter name: number of elements} of what it made trainable.
    """
    model.requires_grad_(False)
    if stage == 1:
        trained = [model.fc1]
    elif stage == 2:
        trained = [model.fc1, *encoder_layers(model.text)[-3:]]
    elif stage == 3:
        trained = [model.text, model.heads]
    elif stage == 4:
        if model.vision is None:
            raise ValueError("stage 4 trains the vision encoder, but this model has none")
        trained = [model.vision, model.pooler]
    else:
        raise ValueError(f"stage must be 1, 2, 3 or 4, got {stage}")
    for module in trained:
        module.requires_grad_(True)
    return {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
