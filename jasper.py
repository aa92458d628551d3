"""
Jasper and Stella: distillation of SOTA embedding models.
Dun Zhang, Jiacheng Li, Ziyang Zeng, Fulong Wang. arXiv:2412.19048 (2024).

A student embedding model learns to reproduce the vectors of several frozen teacher models.

Notation (paper 2.1). For a text x, s_x is the student's L2-normalized vector and t_x the teachers'
vectors, each L2-normalized, concatenated and L2-normalized again. For a batch X of m texts, S_X and
T_X stack those rows.

    (1) L_cos   = sum_x (1 - s_x . t_x)
    (2) L_sim   = MSE(S_X S_X^T, T_X T_X^T)
    (3) L_resim = 1/N sum_{(i,j),(m,n): t_i.t_j > t_m.t_n} max(0, s_m.s_n - s_i.s_j + margin),
                  over the N = C(m,2) text pairs
    (4) L       = l1 L_cos + l2 L_sim + l3 L_resim,   l1, l2, l3 = 10, 200, 20,   margin = 0.015

The student (paper 2.2, Figure 1): a bidirectional language model with mean pooling, a vision
encoder whose tokens a pooler shrinks and maps to the language model's input width, and fully
connected heads. FC1 maps to the teachers' concatenated width (12288 = 4096 + 8192 in the paper);
FC2-FC4 are the short Matryoshka (MRL) heads added in stage 3.

The stages (paper 2.3-2.5), i.e. what trains:
    1: FC1            2: FC1 + the last 3 encoder layers
    3: the whole text side and every head (short heads get L_sim + L_resim only)
    4: the vision encoder + pooler only (caption vectors teach image vectors)

This file reads top to bottom: the losses (pure functions on (m, d) matrices), the config, the
modules, the stage plan.
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
from transformers import MODEL_MAPPING, AutoConfig, SiglipVisionConfig, SiglipVisionModel

LOSS_WEIGHTS = {"cos": 10.0, "sim": 200.0, "resim": 20.0}  # lambda_1..3, paper 3.1
MARGIN = 0.015  # paper 3.1
UNIT_NORM_TOLERANCE = 1e-2  # bf16 rounding keeps row norms within ~4e-3 of 1
TIE_TOLERANCE = 1e-6  # teacher similarities closer than this tie (float32 dot products err ~6e-7)
DENSE_RESIM_MAX_PAIRS = 496  # m <= 32: both ways take ~2 ms there, and the dense one is the reference


# ----------------------------------------------------------------------------- input checks

def check_vectors(**named: Tensor) -> None:
    """Raise ValueError, naming the argument, unless every tensor is a finite (m, d) matrix of unit
    rows with m, d >= 1 and the same m for all. Every loss below starts with this check, because a
    misaligned or broken vector file otherwise turns into a silently wrong loss."""
    for name, v in named.items():
        if v.dim() != 2:
            raise ValueError(f"{name} must be a (batch, dim) matrix, got shape {tuple(v.shape)}")
        if v.shape[0] == 0 or v.shape[1] == 0:
            raise ValueError(f"{name} is empty: shape {tuple(v.shape)}")
        if not torch.isfinite(v).all():
            raise ValueError(f"{name} contains NaN or inf")
    for name, v in named.items():
        norms = v.detach().float().norm(dim=-1)
        if (norms - 1).abs().max() > UNIT_NORM_TOLERANCE:
            raise ValueError(f"{name} rows must be L2-normalized, found norms from "
                             f"{norms.min():.4g} to {norms.max():.4g}")
    rows = {name: v.shape[0] for name, v in named.items()}
    if len(set(rows.values())) > 1:
        raise ValueError(f"batch sizes differ: {rows}")


# ----------------------------------------------------------------------------- teacher target

def teacher_target(*teacher_vectors: Tensor) -> Tensor:
    """t_x = normalize(concat(normalize(t1_x), normalize(t2_x), ...)), paper 2.1.

    teacher_vectors: k matrices (m, d_1) ... (m, d_k), raw teacher outputs (any norm, not zero).
    Returns (m, d_1 + ... + d_k) with unit rows. Normalizing each teacher first gives every teacher
    the same weight in the target, whatever the scale of its outputs.
    """
    if not teacher_vectors:
        raise ValueError("teacher_target needs at least one teacher's vectors")
    for k, v in enumerate(teacher_vectors):
        if v.dim() != 2 or v.shape[0] == 0 or v.shape[1] == 0:
            raise ValueError(f"teacher {k} must be a non-empty (batch, dim) matrix, got {tuple(v.shape)}")
        if not torch.isfinite(v).all():
            raise ValueError(f"teacher {k} vectors contain NaN or inf")
        if (v.norm(dim=-1) == 0).any():
            raise ValueError(f"teacher {k} has an all-zero vector, which has no direction")
    rows = [v.shape[0] for v in teacher_vectors]
    if len(set(rows)) > 1:
        raise ValueError(f"teachers disagree on the batch size: {rows}")
    return F.normalize(torch.cat([F.normalize(v, dim=-1) for v in teacher_vectors], dim=-1), dim=-1)


# ----------------------------------------------------------------------------- the three losses

def cosine_loss(s: Tensor, t: Tensor) -> Tensor:
    """Eq. (1): L_cos = sum_x (1 - s_x . t_x), taken as the mean over the batch.

    s, t: (m, d) unit rows of the same width. The paper writes a sum; the official implementation
    (RAG-Retrieval, model_distill.py, via F.cosine_embedding_loss), with which the weights 10/200/20
    were tuned, averages over the batch, so we do too: the loss does not grow with m.
    """
    check_vectors(s=s, t=t)
    if s.shape[1] != t.shape[1]:
        raise ValueError(f"cosine_loss needs the same width, got student {s.shape[1]} and teacher "
                         f"{t.shape[1]}; short heads use similarity_loss and resim_loss only")
    return (1 - (s * t).sum(dim=-1)).mean()


def similarity_loss(s: Tensor, t: Tensor) -> Tensor:
    """Eq. (2): L_sim = MSE(S S^T, T T^T), the mean over all m*m entries.

    s: (m, d_s), t: (m, d_t) unit rows; the widths may differ, since only the m x m similarity
    matrices are compared (this is how a 256-d MRL head learns from the 12288-d target).
    """
    check_vectors(s=s, t=t)
    return F.mse_loss(s @ s.T, t @ t.T)


def resim_loss(s: Tensor, t: Tensor, margin: float = MARGIN, method: str = "auto") -> Tensor:
    """Eq. (3), relative similarity distillation, a CoSENT-style ranking loss:

        L_resim = 1/P sum over pairs of pairs with t_i.t_j > t_m.t_n of max(0, s_m.s_n - s_i.s_j + margin)

    s: (m, d_s), t: (m, d_t) unit rows. The pairs are the N = C(m,2) unordered text pairs (i<j).
    Whenever the teachers rank pair (i,j) above pair (m,n), the student must too, by `margin`.
    A teacher tie is never "greater", so tied pairs of pairs add nothing. "Greater" means greater
    by more than TIE_TOLERANCE: a matrix product may round the similarities of a duplicated text
    differently in the last bit, and a duplicate must tie, not be ranked by rounding noise.

    Scale: the paper writes 1/N; the official implementation, with which the weights 10/200/20 were
    tuned, averages over all P = N(N-1)/2 unordered pairs of pairs (it gives ties a direction; we do
    not). We divide by P, which keeps the loss independent of the batch size. m < 3 gives 0.

    method: "dense" compares all N x N pairs of pairs (the readable reference, O(m^4) memory);
    "counted" gets the same value and gradient from two counts per pair in O(N log N) time and O(N)
    memory; "auto" takes dense up to DENSE_RESIM_MAX_PAIRS pairs (m <= 32), where both are instant.
    """
    check_vectors(s=s, t=t)
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if method not in ("auto", "dense", "counted"):
        raise ValueError(f"method must be 'auto', 'dense' or 'counted', got {method!r}")
    m = s.shape[0]
    i, j = torch.triu_indices(m, m, offset=1, device=s.device)
    s_pairs = (s @ s.T)[i, j]  # (N,) student similarity of each pair i<j
    t_pairs = (t @ t.T)[i, j]  # (N,) teacher similarity of each pair
    n_pairs = s_pairs.shape[0]
    if n_pairs < 2:
        return s_pairs.sum() * 0.0  # no pair of pairs; keeps the graph so backward gives zeros
    if method == "auto":
        method = "dense" if n_pairs <= DENSE_RESIM_MAX_PAIRS else "counted"
    hinge_sum = resim_hinge_sum_dense if method == "dense" else resim_hinge_sum_counted
    return hinge_sum(s_pairs, t_pairs, margin) / (n_pairs * (n_pairs - 1) / 2)


def resim_hinge_sum_dense(s_pairs: Tensor, t_pairs: Tensor, margin: float) -> Tensor:
    """Eq. (3)'s sum over pairs of pairs, written out. s_pairs, t_pairs: (N,) -> scalar."""
    # (N, N): row a is the pair the teachers rank higher, column b the lower one
    teacher_higher = t_pairs[:, None] > t_pairs[None, :] + TIE_TOLERANCE
    hinge = F.relu((s_pairs[None, :] + margin) - s_pairs[:, None])
    return (hinge * teacher_higher).sum()


def resim_hinge_sum_counted(s_pairs: Tensor, t_pairs: Tensor, margin: float) -> Tensor:
    """The same sum as resim_hinge_sum_dense, from two counts per pair instead of an (N, N) matrix.

    Each active hinge, pair a above pair b in the teachers' order with s_a < s_b + margin, adds
    (s_b + margin) - s_a. Collect the terms per pair p:
        below[p] = #{a : t_a > t_p + tol and s_a < s_p + margin}   active hinges where p is the lower pair
        above[p] = #{b : t_p > t_b + tol and s_p < s_b + margin}   active hinges where p is the higher one
        sum = sum_p below[p] (s_p + margin) - above[p] s_p,   d sum / d s_p = below[p] - above[p]
    The counts are constants of the step, so autograd through the last line gives the dense gradient.

    Sorted by teacher similarity, the pairs ranked above p are a suffix [start_p, N) and those ranked
    below a prefix [0, end_p) (ties excluded by the same comparisons as the dense version). Replacing
    each student similarity by its rank r (a permutation of 0..N-1), both counts become "how many
    ranks below a limit in a prefix", which count_ranks_below answers for all 2N queries at once.
    O(N log N) time, O(N) memory. Summed in float64: the two terms are ~N^2 and their difference small.
    """
    n = s_pairs.shape[0]
    order = torch.argsort(sortable_int(t_pairs.detach()))
    s_in_order = s_pairs[order]  # (N,) with its gradient, for the last line
    with torch.no_grad():
        t, s = t_pairs[order], s_in_order.detach()
        floor = t + TIE_TOLERANCE  # as in the dense version: a is above b iff t_a > t_b + tol
        start = torch.searchsorted(t, floor, right=True, out_int32=True)  # [start_p, N): the pairs above p
        end = torch.searchsorted(floor, t, out_int32=True)  # [0, end_p): the pairs below p
        by_value = torch.argsort(sortable_int(s))
        s_sorted = s[by_value]
        rank = torch.empty(n, dtype=torch.int32, device=s.device)
        rank[by_value] = torch.arange(n, dtype=torch.int32, device=s.device)
        ceiling = s_sorted + margin
        fewer_than_ceiling = torch.searchsorted(s_sorted, ceiling, out_int32=True).index_select(0, rank)  # #{a : s_a < s_p + margin}
        at_most = torch.searchsorted(ceiling, s_sorted, right=True, out_int32=True).index_select(0, rank)  # #{b : s_b + margin <= s_p}
        counts = count_ranks_below(rank, torch.cat([start, end]), torch.cat([fewer_than_ceiling, at_most]))
        below = fewer_than_ceiling - counts[:n]  # the suffix: all ranks below the limit minus the prefix's
        above = end - counts[n:]  # the prefix's ranks not below the limit
    total = ((below - above).double() * s_in_order.double()).sum() + margin * below.sum().double()
    return total.to(s_pairs.dtype)


def sortable_int(x: Tensor) -> Tensor:
    """Integers that sort like the floats x: their IEEE 754 bits, with the magnitude bits of negative
    numbers flipped. Integer sorts are radix sorts, several times faster than float sorts on a CPU."""
    bits = x.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])
    return bits ^ ((bits >> (8 * x.element_size() - 1)) & torch.iinfo(bits.dtype).max)


def count_ranks_below(ranks: Tensor, prefix: Tensor, limit: Tensor) -> Tensor:
    """For each query q: #{b < prefix[q] : ranks[b] < limit[q]}.

    ranks: (N,) a permutation of 0..N-1; prefix, limit: (Q,) in [0, N] -> (Q,) counts (ranks' dtype).
    A wavelet matrix, queried for all q at once: one pass per bit of the ranks, from the highest.
    Each pass reorders the ranks stably by that bit (zeros first, then ones). The ranks that agree
    with a query's limit in the bits above stay together in one block (a node) whose start depends
    on those bits alone, so each query follows only its end `hi` into the half that shares its
    limit's bit; where the limit has a 1, the node's ranks before `hi` with a 0 there are below the
    limit and counted. O((N + Q) log N) time, O(N + Q) memory; int32 halves the memory traffic.
    """
    n = ranks.shape[0]
    boundaries = torch.arange(n + 1, dtype=ranks.dtype, device=ranks.device)
    hi, count = prefix.clone(), torch.zeros_like(prefix)
    node_start = boundaries[:1]  # one node: the whole sequence
    for bit in reversed(range(max(1, n.bit_length()))):
        ones = (ranks >> bit) & 1
        zeros_before = F.pad(torch.cumsum(1 - ones, 0, dtype=ranks.dtype), (1, 0))  # (N+1,) among the first k
        n_zeros = zeros_before[-1]
        # (2 * (N+1),): where boundary k lands among the zeros, then where it lands among the ones
        follow = torch.cat([zeros_before, n_zeros + boundaries - zeros_before])
        # (index_select takes int32 indices as they are; x[i] would copy them to int64)
        start_zeros = zeros_before.index_select(0, node_start)  # (nodes,)
        lo_zeros = start_zeros.index_select(0, limit >> (bit + 1))  # (Q,)
        hi_zeros = zeros_before.index_select(0, hi)  # (Q,)
        limit_bit = (limit >> bit) & 1
        count += limit_bit * (hi_zeros - lo_zeros)
        hi = follow.index_select(0, limit_bit * (n + 1) + hi)
        # node (prefix) splits into (prefix, 0) among the zeros and (prefix, 1) among the ones
        node_start = torch.stack([start_zeros, n_zeros + node_start - start_zeros], dim=1).flatten()
        destination = follow.index_select(0, ones * (n + 1) + boundaries[:-1])
        ranks = torch.empty_like(ranks).scatter_(0, destination.long(), ranks)
    return count


def distill_loss(s: Tensor, t: Tensor, margin: float = MARGIN,
                 weights: dict[str, float] = LOSS_WEIGHTS) -> dict[str, Tensor]:
    """Eq. (4): L = 10 L_cos + 200 L_sim + 20 L_resim for one head.

    s: (m, d_s) student head, t: (m, d_t) teacher vectors, unit rows. L_cos needs the two vectors in
    the same space, so it enters only when d_s == d_t: FC1 against the teachers' target (stages 1-3),
    and every head in stage 4, where the caption's vector from the same head is the teacher. A short
    MRL head against the wide target (stage 3) gets L_sim + L_resim only (paper 2.4).

    Returns {"loss": weighted total, "cos": ..., "sim": ..., "resim": ...}, the parts unweighted.
    """
    parts = {}
    if s.shape[-1] == t.shape[-1]:
        parts["cos"] = cosine_loss(s, t)
    parts["sim"] = similarity_loss(s, t)
    parts["resim"] = resim_loss(s, t, margin)
    parts["loss"] = sum(weights[name] * value for name, value in parts.items())
    return parts


def named_parts(per_head: dict[int, dict[str, Tensor]]) -> dict[str, Tensor]:
    """{width: {"loss", "cos", ...}} -> {"{width}_cos": ..., ...}: the unweighted parts, for logging."""
    return {f"{width}_{name}": value for width, parts in per_head.items()
            for name, value in parts.items() if name != "loss"}


def text_distill_loss(student: dict[int, Tensor], target: Tensor, short_teacher: str = "target") -> dict[str, Tensor]:
    """The loss of stages 1-3: eq. (4) for every head of the student against the teachers' target.

    student: {width: (m, width) unit rows}, one entry per FC head; target: (m, D) unit rows.
    FC1 (width D) gets all three losses. The short MRL heads of stage 3 get L_sim + L_resim, and
    their mean joins FC1's loss, so FC1's objective keeps the scale it had in stages 1-2 (the official
    code likewise averages the similarity losses over its MRL widths).

    short_teacher: what the short heads learn from: "target", the teachers' vectors (paper 2.4); "fc1",
    FC1's own vectors, detached (the self-distillation paper 2.4 proposes but never evaluates); or
    "both", the mean of the two losses.

    Returns {"loss": total, "{width}_{part}": each unweighted part of each head}.
    """
    fc1 = target.shape[-1]
    if fc1 not in student:
        raise ValueError(f"no head as wide as the target ({fc1}); the student has {sorted(student)}")
    teachers = {"target": [target], "fc1": [student[fc1].detach()],
                "both": [target, student[fc1].detach()]}
    if short_teacher not in teachers:
        raise ValueError(f"short_teacher must be one of {sorted(teachers)}, got {short_teacher!r}")
    per_head = {fc1: distill_loss(student[fc1], target)}
    for width in (w for w in student if w != fc1):
        losses = [distill_loss(student[width], t) for t in teachers[short_teacher]]
        per_head[width] = {name: sum(parts[name] for parts in losses) / len(losses) for name in losses[0]}
    short = [per_head[width]["loss"] for width in per_head if width != fc1]
    total = per_head[fc1]["loss"] + (sum(short) / len(short) if short else 0.0)
    return {"loss": total, **named_parts(per_head)}


def image_distill_loss(image: dict[int, Tensor], caption: dict[int, Tensor]) -> dict[str, Tensor]:
    """The loss of stage 4 (paper 2.5): every FC head gives a student vector for the image and a teacher
    vector for its caption (from the frozen text side, so detached); eq. (4) per head, all three parts
    since the widths match, averaged over the heads.

    image, caption: {width: (m, width) unit rows}, the same widths.
    Returns {"loss": mean over heads, "{width}_{part}": each unweighted part of each head}.
    """
    if sorted(image) != sorted(caption):
        raise ValueError(f"image heads {sorted(image)} and caption heads {sorted(caption)} differ")
    per_head = {width: distill_loss(image[width], caption[width].detach()) for width in image}
    total = sum(parts["loss"] for parts in per_head.values()) / len(per_head)
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
    if (counts == 0).any():
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
    image_tokens: int = 81  # a square: the pooler averages the patch grid down to 9 x 9

    def __post_init__(self):
        if not self.head_dims or any(d <= 0 for d in self.head_dims):
            raise ValueError(f"head_dims must be positive widths, FC1 first; got {self.head_dims}")
        if len(set(self.head_dims)) != len(self.head_dims):
            raise ValueError(f"head_dims must be distinct (heads are named by width): {self.head_dims}")
        if math.isqrt(self.image_tokens) ** 2 != self.image_tokens:
            raise ValueError(f"image_tokens must be a square number (a k x k grid), got {self.image_tokens}")


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


class VisionPooler(nn.Module):
    """Vision tokens -> fewer tokens at the language model's input width (paper 2.2, component 3).

    Averages the square patch grid down to a k x k grid (k*k = image_tokens), which keeps the
    layout, then a two-layer MLP (as in LLaVA-1.5's projector) maps each token to the LM width.
    (B, P, D_vision) with P a square -> (B, image_tokens, D_text).
    """

    def __init__(self, vision_width: int, text_width: int, image_tokens: int):
        super().__init__()
        self.side = math.isqrt(image_tokens)
        self.mlp = nn.Sequential(nn.Linear(vision_width, text_width), nn.GELU(),
                                 nn.Linear(text_width, text_width))

    def forward(self, vision_tokens: Tensor) -> Tensor:
        grid = math.isqrt(vision_tokens.shape[1])
        if grid * grid != vision_tokens.shape[1]:
            raise ValueError(f"expected a square grid of patches, got {vision_tokens.shape[1]} tokens")
        x = rearrange(vision_tokens, "b (h w) d -> b d h w", h=grid)
        x = F.adaptive_avg_pool2d(x, self.side)  # (B, D_vision, k, k)
        return self.mlp(rearrange(x, "b d h w -> b (h w) d"))


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
            self.add_vision(config.vision_encoder, config.image_tokens)

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

    def add_vision(self, spec: str | dict, image_tokens: int) -> None:
        """Stage 4: attach a vision encoder and a fresh pooler to a text-only model."""
        self.config = replace(self.config, vision_encoder=spec, image_tokens=image_tokens)
        self.vision = load_vision_encoder(spec)
        self.pooler = VisionPooler(self.vision.config.hidden_size, self.text.config.hidden_size, image_tokens)
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
        pixel_values = pixel_values.to(self.pooler.mlp[0].weight.dtype)  # bf16 under DeepSpeed on GPU
        tokens = self.pooler(self.vision(pixel_values=pixel_values).last_hidden_state)  # (B, k*k, H)
        mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
        hidden = self.text(inputs_embeds=tokens, attention_mask=mask).last_hidden_state
        return mean_pool(hidden, mask)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                pixel_values: Tensor | None = None, pooled: Tensor | None = None) -> dict[int, Tensor]:
        """Texts (input_ids + attention_mask), images (pixel_values) or their mean-pooled states (pooled,
        (B, H), e.g. computed once while the encoder is frozen) -> {width: (B, width) unit rows}."""
        if sum(x is not None for x in (input_ids, pixel_values, pooled)) != 1:
            raise ValueError("pass exactly one of input_ids (+ attention_mask), pixel_values or pooled")
        if input_ids is not None and attention_mask is None:
            raise ValueError("input_ids need an attention_mask (1 for tokens, 0 for padding)")
        if input_ids is not None:
            pooled = self.embed_text(input_ids, attention_mask)
        elif pixel_values is not None:
            pooled = self.embed_image(pixel_values)
        return {int(d): F.normalize(head(pooled.to(head.weight.dtype)).float(), dim=-1)
                for d, head in self.heads.items()}

    def save_pretrained(self, path: str | Path, prompts: dict[str, str] | None = None) -> None:
        """path/text (transformers folder), path/vision, path/jasper.safetensors (pooler + heads),
        path/jasper_config.json; and the files that make the folder a sentence-transformers model of
        the text side (see save_sentence_transformer_modules), with `prompts` (e.g. {"query": ...})."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.text.save_pretrained(path / "text")
        if self.vision is not None:
            self.vision.save_pretrained(path / "vision")
        own = {k: v.detach().contiguous() for k, v in self.state_dict().items()
               if not k.startswith(("text.", "vision."))}
        save_file(own, path / "jasper.safetensors")
        config = replace(self.config, text_encoder="text",
                         vision_encoder=None if self.vision is None else "vision")
        (path / "jasper_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
        self.save_sentence_transformer_modules(path, prompts or {})

    def save_sentence_transformer_modules(self, path: Path, prompts: dict[str, str]) -> None:
        """Make `path` loadable as `SentenceTransformer(path)`: text/ (the encoder; its tokenizer goes
        there too) -> mean pooling -> FC1 as a Dense layer -> normalize, the pipeline of embed_text and
        forward. Every head is saved as 2_Dense_{width}, the way the released Stella ships its widths;
        another head replaces module 2: `st[2] = Dense.load(f"{path}/2_Dense_256")`."""
        from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
        saved = {"1_Pooling": Pooling(self.text.config.hidden_size, "mean"), "3_Normalize": Normalize()}
        for width, head in self.heads.items():
            saved[f"2_Dense_{width}"] = Dense(head.in_features, head.out_features, activation_function=nn.Identity())
            saved[f"2_Dense_{width}"].linear.load_state_dict(head.state_dict())
        for folder, module in saved.items():
            (path / folder).mkdir(exist_ok=True)
            module.save(str(path / folder))
        modules = [(Transformer, "text"), (Pooling, "1_Pooling"), (Dense, f"2_Dense_{self.config.head_dims[0]}"),
                   (Normalize, "3_Normalize")]
        (path / "modules.json").write_text(json.dumps(
            [{"idx": k, "name": str(k), "path": folder, "type": f"{module.__module__}.{module.__qualname__}"}
             for k, (module, folder) in enumerate(modules)], indent=2) + "\n")
        (path / "config_sentence_transformers.json").write_text(json.dumps(
            {"model_type": "SentenceTransformer", "prompts": prompts, "default_prompt_name": None,
             "similarity_fn_name": "cosine"}, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Jasper":
        """Load a folder written by save_pretrained, exactly."""
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
        4: the vision encoder and the pooler     (paper 2.5: "training the visual encoder")

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
