"""The vectorized losses in jasper.py against plain Python loops over texts and pairs (float64)."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import jasper
import resim_counted

F64 = torch.float64


# ----------------------------------------------------------------------------- loop references

def dot(a, b):
    return sum(a[k] * b[k] for k in range(len(a)))


def cosine_loop(s, t):
    return sum(1 - dot(s[x], t[x]) for x in range(len(s))) / len(s)


def similarity_loop(s, t):
    m = len(s)
    return sum((dot(s[i], s[j]) - dot(t[i], t[j])) ** 2 for i in range(m) for j in range(m)) / (m * m)


def resim_loop(s, t, margin):
    pairs = list(itertools.combinations(range(len(s)), 2))  # the C(m,2) text pairs
    total = 0.0
    for (i, j), (k, l) in itertools.product(pairs, pairs):
        if dot(t[i], t[j]) > dot(t[k], t[l]) + jasper.TIE_TOLERANCE:
            total = total + max(0.0, dot(s[k], s[l]) - dot(s[i], s[j]) + margin)
    n_pairs_of_pairs = math.comb(len(pairs), 2)  # the paper's N
    return total / n_pairs_of_pairs if n_pairs_of_pairs else 0.0


def unit_rows(m, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(m, d, generator=g, dtype=F64), dim=-1)


def tied_teacher(m, seed):
    """Unit rows from a small set whose dot products are exact multiples of 1/2 (basis vectors and
    +-1/2 sign vectors in 4 dimensions), so many teacher pair similarities tie exactly."""
    basis = torch.eye(4, dtype=F64)
    signs = torch.tensor(list(itertools.product([0.5, -0.5], repeat=4)), dtype=F64)
    choices = torch.cat([basis, signs])
    g = torch.Generator().manual_seed(seed)
    return choices[torch.randint(len(choices), (m,), generator=g)]


def value_and_grad(fn, s, t, *args):
    s = s.clone().requires_grad_(True)
    value = fn(s, t, *args)
    (grad,) = torch.autograd.grad(value, s, allow_unused=True) if torch.is_tensor(value) else (None,)
    if grad is None:
        grad = torch.zeros_like(s)
    return float(value.detach()) if torch.is_tensor(value) else value, grad


def assert_same(fast, loop, s, t, *args):
    v_fast, g_fast = value_and_grad(fast, s, t, *args)
    v_loop, g_loop = value_and_grad(loop, s, t, *args)
    assert v_fast == pytest.approx(v_loop, abs=1e-9, rel=1e-9)
    torch.testing.assert_close(g_fast, g_loop, atol=1e-9, rtol=1e-9)


# ----------------------------------------------------------------------------- cases

CASES = {  # name -> (student, teacher); the teacher may be wider, like the 12288-d target
    "random m=5": (unit_rows(5, 6, 0), unit_rows(5, 6, 1)),
    "random m=8 wide teacher": (unit_rows(8, 4, 2), unit_rows(8, 12, 3)),
    "m=1": (unit_rows(1, 4, 4), unit_rows(1, 4, 5)),
    "m=2": (unit_rows(2, 4, 6), unit_rows(2, 4, 7)),
    "m=3": (unit_rows(3, 4, 8), unit_rows(3, 4, 9)),
    "teacher ties m=7": (unit_rows(7, 4, 10), tied_teacher(7, 11)),
    "duplicate rows": (unit_rows(6, 5, 12)[[0, 1, 1, 2, 3, 3]], unit_rows(6, 5, 13)[[0, 1, 1, 2, 3, 3]]),
    "student = teacher": (unit_rows(6, 5, 14), unit_rows(6, 5, 14)),
}
SAME_WIDTH = [name for name, (s, t) in CASES.items() if s.shape == t.shape]


@pytest.mark.parametrize("name", SAME_WIDTH)
def test_cosine_loss_equals_loop(name):
    assert_same(jasper.cosine_loss, cosine_loop, *CASES[name])


@pytest.mark.parametrize("name", CASES)
def test_similarity_loss_equals_loop(name):
    assert_same(jasper.similarity_loss, similarity_loop, *CASES[name])


# Duplicated students with margin 0 put hinges exactly at relu's kink, where the subgradient a product rounded
# differently in the last bit picks (0 or 1) is arbitrary: that one combination has no single right gradient.
RESIM_CASES = [(name, margin) for name in CASES for margin in (0.0, 0.015, 0.3)
               if not (name == "duplicate rows" and margin == 0.0)]


@pytest.mark.parametrize("name,margin", RESIM_CASES)
@pytest.mark.parametrize("method", ["dense", "counted"])
def test_resim_loss_equals_loop(name, margin, method):
    assert_same(lambda s, t, margin: jasper.resim_loss(s, t, margin, method), resim_loop, *CASES[name], margin)


LARGE_CASES = {  # beyond DENSE_RESIM_MAX_PAIRS, where "auto" counts
    "random m=90": (unit_rows(90, 16, 20), unit_rows(90, 48, 21)),
    "teacher ties m=120": (unit_rows(120, 8, 22), tied_teacher(120, 23)),
    "duplicate rows m=100": (unit_rows(50, 8, 24).repeat(2, 1), unit_rows(50, 8, 25).repeat(2, 1)),
}


@pytest.mark.parametrize("name", LARGE_CASES)
def test_counted_resim_equals_dense_on_large_batches(name):
    s, t = LARGE_CASES[name]
    assert s.shape[0] * (s.shape[0] - 1) // 2 > jasper.DENSE_RESIM_MAX_PAIRS
    v_dense, g_dense = value_and_grad(lambda s, t: jasper.resim_loss(s, t, method="dense"), s, t)
    v_auto, g_auto = value_and_grad(jasper.resim_loss, s, t)
    assert v_dense > 0.01 and v_auto == pytest.approx(v_dense, abs=1e-12, rel=1e-12)
    torch.testing.assert_close(g_auto, g_dense, atol=1e-12, rtol=1e-9)


def test_counted_resim_float32_matches_float64_dense():
    s, t = LARGE_CASES["random m=90"]
    v32, g32 = value_and_grad(jasper.resim_loss, s.float(), t.float())
    v64, g64 = value_and_grad(lambda s, t: jasper.resim_loss(s, t, method="dense"), s, t)
    assert v32 == pytest.approx(v64, rel=1e-5)
    torch.testing.assert_close(g32.double(), g64, atol=1e-7, rtol=1e-3)


@pytest.mark.parametrize("n", [1, 2, 3, 8, 9, 300])
def test_count_ranks_below_equals_loop(n):
    g = torch.Generator().manual_seed(n)
    ranks = torch.randperm(n, generator=g).int()
    prefix, limit = torch.randint(0, n + 1, (2, 200), generator=g).int()
    loop = [sum(1 for b in range(p) if ranks[b] < lim) for p, lim in zip(prefix.tolist(), limit.tolist())]
    assert resim_counted.count_ranks_below(ranks, prefix, limit).tolist() == loop


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_sortable_int_sorts_like_the_floats(dtype):
    x = torch.tensor([3.0, -1e-30, 0.5, -0.0, -2.0, 1e-30, 0.0, -0.5, 1.0, -1.0], dtype=dtype)
    assert torch.equal(x[torch.argsort(resim_counted.sortable_int(x))], torch.sort(x).values)


def test_duplicate_texts_tie_despite_rounding_noise():
    """A matrix product may round a duplicated text's similarities differently in the last bit; such
    noise must not rank the duplicates. Perturbing one duplicate by 1e-12 leaves the loss unchanged."""
    s, t = CASES["duplicate rows"]
    noisy = t.clone()
    noisy[2] = F.normalize(noisy[2] + 1e-12 * torch.arange(5, dtype=F64), dim=0)
    assert not torch.equal(noisy @ noisy.T, t @ t.T)
    assert float(jasper.resim_loss(s, noisy)) == pytest.approx(float(jasper.resim_loss(s, t)), abs=1e-15)


def test_ties_exist_in_the_tie_case_and_add_nothing():
    s, t = CASES["teacher ties m=7"]
    sims = [dot(t[i], t[j]) for i, j in itertools.combinations(range(7), 2)]
    assert len(set(float(x) for x in sims)) < len(sims)  # really tied
    # a teacher where every pair ties: nothing is "greater", so the loss is exactly 0
    same = tied_teacher(1, 0).expand(7, 4).contiguous()
    assert float(jasper.resim_loss(s, same, 0.5)) == 0.0


def test_resim_scale_is_independent_of_batch_size():
    """Dividing by the paper's N = C(C(m,2), 2), the pairs of text pairs, keeps a random student's loss about the
    same at m = 8 and m = 32 (dividing by the C(m,2) text pairs instead would make it 35x larger at m = 32)."""
    def mean_loss(m):
        return sum(float(jasper.resim_loss(unit_rows(m, 8, seed), unit_rows(m, 8, 50 + seed)))
                   for seed in range(3)) / 3
    small, large = mean_loss(8), mean_loss(32)
    assert 0.7 < large / small < 1.4
    assert 0.05 < small < 0.5


def test_resim_small_batches_are_zero_not_nan():
    for m in (1, 2):
        s, t = unit_rows(m, 3, 0).requires_grad_(True), unit_rows(m, 3, 1)
        loss = jasper.resim_loss(s, t)
        loss.backward()
        assert float(loss.detach()) == 0.0 and torch.equal(s.grad, torch.zeros_like(s))


def test_perfect_student_has_zero_loss():
    t = unit_rows(6, 5, 0)
    parts = jasper.distill_loss(t, t, margin=0.0)
    assert {k: float(v) for k, v in parts.items()} == pytest.approx(
        {"cos": 0.0, "sim": 0.0, "resim": 0.0, "loss": 0.0}, abs=1e-12)


# ----------------------------------------------------------------------------- teacher target, eq. (4)

def test_teacher_target_is_normalize_concat_normalize():
    a = torch.tensor([[3.0, 4.0], [0.0, 2.0]], dtype=F64)  # norms 5 and 2
    b = torch.tensor([[0.0, 0.0, 10.0], [1.0, 0.0, 0.0]], dtype=F64)
    target = jasper.teacher_target(a, b)
    r = 1 / math.sqrt(2)  # each normalized teacher contributes a unit vector, so the concat has norm sqrt(2)
    expected = torch.tensor([[0.6 * r, 0.8 * r, 0.0, 0.0, r], [0.0, r, r, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(target, expected, atol=1e-15, rtol=0)


def test_teacher_target_weights_teachers_equally_whatever_their_scale():
    a, b = torch.randn(4, 3, dtype=F64), torch.randn(4, 5, dtype=F64)
    torch.testing.assert_close(jasper.teacher_target(a, b), jasper.teacher_target(100 * a, 0.01 * b))


def test_distill_loss_weights_and_heads():
    s, t = unit_rows(6, 5, 0), unit_rows(6, 5, 1)
    full = jasper.distill_loss(s, t)
    expected = (10 * jasper.cosine_loss(s, t) + 200 * jasper.similarity_loss(s, t)
                + 20 * jasper.resim_loss(s, t, 0.015))
    assert float(full["loss"]) == pytest.approx(float(expected), rel=1e-12)
    short = jasper.distill_loss(unit_rows(6, 3, 2), t)  # an MRL head narrower than the target
    assert set(short) == {"sim", "resim", "loss"}
    assert float(short["loss"]) == pytest.approx(float(200 * short["sim"] + 20 * short["resim"]), rel=1e-12)


def eq4_loop(s, t):
    """Eq. (4) from the loops: cos only when the widths match."""
    total = 200 * similarity_loop(s, t) + 20 * resim_loop(s, t, jasper.MARGIN)
    return total + (10 * cosine_loop(s, t) if s.shape[1] == t.shape[1] else 0.0)


def heads(m, widths, seed):
    return {w: unit_rows(m, w, seed + k) for k, w in enumerate(widths)}


@pytest.mark.parametrize("head_average", ["all", "short"])
@pytest.mark.parametrize("short_teacher", ["target", "fc1", "both"])
def test_text_distill_loss_equals_loops(short_teacher, head_average):
    """Stage 3, each rule written out: "all" (the release) is 10 L_cos of FC1 plus the mean over every head, FC1
    included, of 200 L_sim + 20 L_resim; "short" is FC1's eq. (4) plus that mean over the short heads alone. Each short
    head learns from the target, from FC1's vectors (self-distillation) or the mean of both."""
    student, target = heads(6, [12, 5, 3], 0), unit_rows(6, 12, 9)
    teachers = {"target": [target], "fc1": [student[12]], "both": [target, student[12]]}[short_teacher]

    def pairs_part(s, ts):  # 200 L_sim + 20 L_resim of one head, averaged over its teachers
        return sum(200 * similarity_loop(s, t) + 20 * resim_loop(s, t, jasper.MARGIN) for t in ts) / len(ts)
    short = [pairs_part(student[w], teachers) for w in (5, 3)]
    if head_average == "all":
        expected = 10 * cosine_loop(student[12], target) + (pairs_part(student[12], [target]) + sum(short)) / 3
    else:
        expected = eq4_loop(student[12], target) + sum(short) / 2
    parts = jasper.text_distill_loss(student, target, short_teacher, head_average)
    assert float(parts["loss"]) == pytest.approx(float(expected), rel=1e-9)
    assert set(parts) == {"loss", "12_cos", "12_sim", "12_resim", "5_sim", "5_resim", "3_sim", "3_resim"}
    assert float(parts["5_sim"]) == pytest.approx(float(sum(similarity_loop(student[5], t) for t in teachers)
                                                        / len(teachers)), rel=1e-9)


def test_the_two_rules_agree_without_short_heads_and_weigh_fc1_unalike_with_them():
    """Stages 1-2 have FC1 alone: both rules are eq. (4), bit for bit. With three short heads, "short" gives FC1's
    L_sim and L_resim 4 times the weight "all" gives them (1 against 1/4), L_cos the same."""
    fc1, target = unit_rows(6, 12, 0), unit_rows(6, 12, 9)
    alone = {rule: jasper.text_distill_loss({12: fc1}, target, head_average=rule)["loss"] for rule in ("all", "short")}
    assert float(alone["all"]) == float(alone["short"]) == float(jasper.distill_loss(fc1, target)["loss"])
    s = heads(6, [12, 5, 3, 2], 0)
    leaves = {w: v.clone().requires_grad_(True) for w, v in s.items()}
    grads = {}
    for rule in ("all", "short"):
        loss = jasper.text_distill_loss(leaves, target, head_average=rule)["loss"]
        grads[rule] = torch.autograd.grad(loss, leaves[12])[0]
    cos_grad = torch.autograd.grad(10 * jasper.cosine_loss(leaves[12], target), leaves[12])[0]
    pairs = torch.autograd.grad(200 * jasper.similarity_loss(leaves[12], target)
                                + 20 * jasper.resim_loss(leaves[12], target), leaves[12])[0]
    torch.testing.assert_close(grads["all"], cos_grad + pairs / 4)
    torch.testing.assert_close(grads["short"], cos_grad + pairs)
    with pytest.raises(ValueError, match="head_average"):
        jasper.text_distill_loss(s, target, head_average="mean")


@pytest.mark.parametrize("head_average", ["all", "short"])
def test_self_distillation_does_not_move_fc1_toward_the_short_heads(head_average):
    """FC1's vectors teach the short heads detached: the short heads' loss sends no gradient into FC1, whose gradient
    is that of its own terms alone (under "all", its L_sim and L_resim share the mean with the one short head)."""
    student, target = heads(6, [12, 5], 0), unit_rows(6, 12, 9)
    fc1 = student[12].clone().requires_grad_(True)
    total = jasper.text_distill_loss({12: fc1, 5: student[5]}, target, "fc1", head_average)["loss"]
    share = 1 / 2 if head_average == "all" else 1
    fc1_alone = 10 * jasper.cosine_loss(fc1, target) + share * (200 * jasper.similarity_loss(fc1, target)
                                                                 + 20 * jasper.resim_loss(fc1, target))
    torch.testing.assert_close(torch.autograd.grad(total, fc1)[0], torch.autograd.grad(fc1_alone, fc1)[0],
                               rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="short_teacher"):
        jasper.text_distill_loss(student, target, "teacher")
    with pytest.raises(ValueError, match="as wide as the target"):
        jasper.text_distill_loss({5: student[5]}, target)


def test_image_distill_loss_is_the_mean_of_eq4_over_heads():
    """Stage 4: every head's image vectors against the same head's caption vectors, all three losses."""
    image, caption = heads(5, [12, 4], 0), heads(5, [12, 4], 7)
    expected = float(eq4_loop(image[12], caption[12]) + eq4_loop(image[4], caption[4])) / 2
    parts = jasper.image_distill_loss(image, caption)
    assert float(parts["loss"]) == pytest.approx(expected, rel=1e-9)
    assert {"12_cos", "4_cos", "4_resim"} <= set(parts)
    image_12, caption_12 = image[12].clone().requires_grad_(True), caption[12].clone().requires_grad_(True)
    loss = jasper.image_distill_loss({12: image_12, 4: image[4]}, {12: caption_12, 4: caption[4]})["loss"]
    image_grad, caption_grad = torch.autograd.grad(loss, [image_12, caption_12], allow_unused=True)
    assert image_grad is not None and caption_grad is None  # the caption side is the teacher
    with pytest.raises(ValueError, match="differ"):
        jasper.image_distill_loss(image, {12: caption[12]})


# ----------------------------------------------------------------------------- bad input

BAD = [
    ("batch sizes differ", lambda f: f(unit_rows(4, 3, 0), unit_rows(5, 3, 1))),
    ("NaN", lambda f: f(unit_rows(4, 3, 0), unit_rows(4, 3, 1).index_fill(0, torch.tensor([2]), math.nan))),
    ("NaN", lambda f: f(unit_rows(4, 3, 0).index_fill(0, torch.tensor([1]), math.inf), unit_rows(4, 3, 1))),
    ("empty", lambda f: f(torch.zeros(0, 3), torch.zeros(0, 3))),
    ("matrix", lambda f: f(torch.ones(3), torch.ones(3))),
    ("L2-normalized", lambda f: f(2 * unit_rows(4, 3, 0), unit_rows(4, 3, 1))),
]


ENTRY_POINTS = {  # each loss call checks its inputs once, at the entry
    "distill_loss": jasper.distill_loss,
    "text_distill_loss": lambda s, t: jasper.text_distill_loss({t.shape[-1] if t.dim() == 2 else 3: s}, t),
    "image_distill_loss": lambda s, t: jasper.image_distill_loss({3: s}, {3: t}),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("problem,call", BAD)
def test_bad_input_raises_a_clear_error(entry, problem, call):
    with pytest.raises(ValueError, match=problem):
        call(ENTRY_POINTS[entry])


def test_the_inputs_are_checked_once_per_loss_call(monkeypatch):
    """One check (one device sync on a GPU) per call, for all heads together, not one per part per head."""
    calls = []
    check = jasper.check_vectors
    monkeypatch.setattr(jasper, "check_vectors", lambda *a, **k: calls.append(k) or check(*a, **k))
    jasper.text_distill_loss(heads(6, [12, 5, 3], 0), unit_rows(6, 12, 9))
    jasper.image_distill_loss(heads(6, [12, 5], 0), heads(6, [12, 5], 4))
    assert [sorted(c) for c in calls] == [["head 12", "head 3", "head 5", "target"],
                                          ["caption 12", "caption 5", "image 12", "image 5"]]


def test_cosine_loss_needs_one_width_and_the_others_do_not():
    with pytest.raises(ValueError, match="same width"):
        jasper.cosine_loss(unit_rows(4, 3, 0), unit_rows(4, 5, 1))
    assert "cos" not in jasper.distill_loss(unit_rows(4, 3, 0), unit_rows(4, 5, 1))
    for loss in (jasper.similarity_loss, jasper.resim_loss):  # a short head against the wide target
        assert float(loss(unit_rows(4, 3, 0), unit_rows(4, 5, 1))) > 0


def test_unknown_resim_method_is_rejected():
    with pytest.raises(ValueError, match="method"):
        jasper.resim_loss(unit_rows(4, 3, 0), unit_rows(4, 3, 1), method="sorted")


def test_negative_margin_is_rejected():
    with pytest.raises(ValueError, match="margin"):
        jasper.resim_loss(unit_rows(4, 3, 0), unit_rows(4, 3, 1), margin=-0.1)


@pytest.mark.parametrize("problem,teachers", [
    ("at least one", []),
    ("batch size", [torch.randn(3, 4), torch.randn(2, 4)]),
    ("NaN", [torch.full((2, 3), math.nan)]),
    ("all-zero", [torch.zeros(2, 3)]),
    ("empty", [torch.zeros(0, 3)]),
])
def test_teacher_target_bad_input(problem, teachers):
    with pytest.raises(ValueError, match=problem):
        jasper.teacher_target(*teachers)
