"""The notebooks' exercises: each asks for a prediction (a number, a set, a choice) or a small function, and its check
says whether the answer is right and, for the wrong answers people often give, why it is wrong.

In a notebook: `exercises.check("pairs-of-pairs", my_answer)` prints the verdict (CHECKS[name] returns it as (correct,
message)). While the answer is still `...`, the check waits. The
answers and their reasoning are in docs/solutions.md, which no notebook imports; tests/test_exercises.py runs every
check on the answer there and on a plausible wrong one.
"""

import math

import torch

import jasper

WAITING = "waits for you: put your answer in place of the ... above, then run this cell again"


def near(value, target, tolerance=1e-3) -> bool:
    return isinstance(value, (int, float)) and math.isclose(value, target, rel_tol=tolerance, abs_tol=1e-9)


def verdict(answer, right, why_right: str, wrong: list[tuple], same=lambda a, b: a == b) -> tuple[bool, str]:
    """(correct, message): `wrong` lists (a wrong answer, why it is wrong); an answer not listed gets a hint."""
    if same(answer, right):
        return True, f"correct: {why_right}"
    for value, why in wrong:
        if same(answer, value):
            return False, f"not yet: {why}"
    return False, "not yet: that is none of the answers this check knows; work it through once more (docs/solutions.md)"


# ----------------------------------------------------------------------------- 01: the data

def target_cosine(answer):
    """Two texts: all-MiniLM-L6-v2 (384-d) gives them a cosine of 0.2, all-mpnet-base-v2 (768-d) one of 0.8. What is
    the cosine of their targets, t . t'?"""
    a = torch.tensor([[1.0, 0.0], [0.2, math.sqrt(1 - 0.04)]])  # two unit vectors with cosine 0.2 ...
    b = torch.tensor([[1.0, 0.0], [0.8, 0.6]])  # ... and 0.8
    t = jasper.teacher_target(a, b)
    return verdict(answer, float(t[0] @ t[1]), "each teacher's normalized vectors are half of the target's length "
                   "squared, so t . t' = (0.2 + 0.8) / 2, whatever the widths", [
                       (0.6, "weighting by width (384 and 768) is what the normalizations prevent: after them each "
                             "teacher's part is a unit vector, whatever its width"),
                       (1.0, "the concatenation of two unit vectors has length sqrt(2); the last normalization halves "
                             "the dot product"),
                       (0.16, "a dot product of concatenations adds the parts' dot products; it does not multiply")],
                   same=near)


def longer_teacher(answer):
    """Skip the normalization of each teacher: concatenate their raw vectors and normalize once. Teacher A's vectors
    are 10 times as long as B's, and both give the two texts a cosine of 0.5. What share of t . t' comes from A?"""
    share = 10 * 10 * 0.5 / (10 * 10 * 0.5 + 1 * 1 * 0.5)
    return verdict(answer, share, f"A's part of the dot product scales with both of its vectors' lengths, 10 x 10: "
                   f"100 / 101 = {share:.3f}; jasper.teacher_target keeps it at 0.5", [
                       (0.5, "that is what normalizing each teacher first gives (jasper.teacher_target); without it "
                             "the longer vectors take over"),
                       (10 / 11, "a dot product scales with the lengths of both vectors: 10 x 10, not 10")],
                   same=lambda a, b: near(a, b, 2e-3))


def chunks(answer):
    """A document of 25 sentences is cut into chunks of 1 to 10 consecutive sentences (paper 3.2, data.chunk_document).
    What are the fewest and the most chunks it can become? Answer (fewest, most)."""
    return verdict(answer, (3, 25), "10 + 10 + 5: three at the fewest; 25 chunks of one sentence at the most", [
        ((2, 25), "two chunks hold at most 10 + 10 = 20 sentences"),
        ((3, 10), "a chunk holds 1 to 10 sentences; the number of chunks has no such bound"),
        ((1, 25), "one chunk holds at most 10 sentences")],
                   same=lambda a, b: isinstance(a, (tuple, list)) and tuple(a) == b)


# ----------------------------------------------------------------------------- 02: the losses

def pairs_of_pairs(answer):
    """How many pairs of pairs, N, does one loss batch of the paper's 128 texts compare?"""
    p = math.comb(128, 2)
    return verdict(answer, math.comb(p, 2), f"P = C(128, 2) = {p:,} text pairs, and N = C(P, 2) = "
                   f"{math.comb(p, 2):,} unordered pairs of them", [
                       (p, f"that is P = C(128, 2) = {p:,}, the text pairs; N counts pairs of those pairs"),
                       (p * p, "that counts ordered pairs, and each pair with itself; a pair of pairs is two different "
                               "pairs, unordered"),
                       (math.comb(128, 4), "two pairs of one pair of pairs may share a text: (1, 2) and (1, 3) count")])


def margin(answer):
    """Three text pairs that the teachers score 0.9, 0.6 and 0.3; the student scores them 0.80, 0.79 and 0.30. With
    the margin 0.015, what is eq. (3)'s hinge sum, before dividing by N?"""
    s, t = torch.tensor([0.80, 0.79, 0.30]), torch.tensor([0.9, 0.6, 0.3])
    total = float(jasper.resim_hinge_sum_dense(s, t, jasper.MARGIN))
    return verdict(answer, total, "only the first two pairs are ordered by less than the margin: "
                   "0.79 - 0.80 + 0.015 = 0.005; the others are apart by 0.49 and 0.5", [
                       (0.0, "the student orders every pair right, but the first two by 0.01 only: less than the "
                             "margin, so that hinge is still open"),
                       (0.005 / 3, "that is already divided by N = C(3, 2) = 3; the question asks for the sum")],
                   same=near)


def tie(answer):
    """Now the teachers score the three pairs 0.9, 0.9 and 0.3 (a tie) and the student 0.5, 0.8 and 0.3. What is the
    hinge sum?"""
    s, t = torch.tensor([0.5, 0.8, 0.3]), torch.tensor([0.9, 0.9, 0.3])
    total = float(jasper.resim_hinge_sum_dense(s, t, jasper.MARGIN))
    return verdict(answer, total, "a tie is never 'greater', so the first two pairs add nothing in either order, and "
                   "the third is below both by more than the margin", [
                       (0.315, "0.8 - 0.5 + 0.015 ranks the first pair above the second, but the teachers tie them: "
                               "neither order is 'greater', and a tie adds no term"),
                       (0.015, "a tie adds nothing, not the margin")], same=near)


def fc1_weight(answer):
    """Stage 3 with FC1 and three short heads, under the release's rule (`head_average="all"`, the paper preset's):
    with what weight does FC1's L_sim enter the loss? (eq. (4) gives it 200.)"""
    return verdict(answer, 50.0, "the release averages 200 L_sim + 20 L_resim over all four heads, FC1 included: "
                   "200 / 4 = 50", [
                       (200.0, "that is the 'short' rule, where FC1 keeps its whole eq. (4) and only the short heads "
                               "are averaged"),
                       (200 / 3, "the mean is over all four heads, FC1 among them, not the three short ones")],
                   same=near)


# ----------------------------------------------------------------------------- 03: the stages

STAGE4_PARTS = {"vision encoder", "pooler", "language model", "FC heads"}


def stage4_path(answer):
    """Stage 4 trains the vision encoder alone. Which parts of the student does its backward pass go through, from the
    loss to the vision encoder's weights? Answer a set of names from STAGE4_PARTS."""
    return verdict(set(answer), STAGE4_PARTS,
                   "the loss is on the heads' vectors: the gradient goes back through the FC heads, the language "
                   "model and the pooler, frozen or weightless as they are, to reach the vision encoder", [
                       ({"vision encoder"}, "the vision encoder's output is not what the loss sees: between them lie "
                                            "the pooler, the language model and the heads"),
                       ({"vision encoder", "pooler"}, "the image tokens go through the language model and the heads "
                                                      "before the loss; frozen parts still pass the gradient on"),
                       ({"vision encoder", "pooler", "language model"}, "the loss is on each FC head's vectors: the "
                                                                        "gradient starts at the heads")])


def fc1_rises(answer):
    """In the notebook's stage 3, FC1's held-out loss went up a little while the short heads' came down. Which is the
    likeliest reason? (a) FC1 overfits the training texts; (b) the short heads share the encoder with FC1 and pull it
    toward what they need; (c) the learning rate is too high; (d) the held-out texts changed between the stages."""
    return verdict(answer, "b", "every head reads the same pooled state, and stage 3 trains the encoder: the short "
                   "heads' L_sim and L_resim move it too (docs/results.md sees FC1's curves creep up in the full "
                   "run)", [
                       ("a", "FC1's training loss would then fall while its held-out loss rose; both of FC1's curves "
                             "creep up together"),
                       ("c", "stage 3's learning rate is the smallest of the four stages'; a step too large would move "
                             "the short heads' losses up too"),
                       ("d", "the held-out texts are the same last texts of the corpus in every stage")])


def layers(answer, model: jasper.Jasper):
    """Write train_last_layers(model, k): a stage 2 that trains FC1 and the last k encoder layers (the paper's k: 3).
    The check takes a step for several k and looks where the gradients went."""
    ids = torch.randint(1, model.text.config.vocab_size, (4, 6))
    stack = jasper.encoder_layers(model.text)
    prefix = next(name for name, module in model.text.named_modules() if module is stack)
    for k in (1, 2, len(stack)):
        model.zero_grad(set_to_none=True)
        answer(model, k)
        vectors = model(input_ids=ids, attention_mask=torch.ones_like(ids))[model.config.head_dims[0]]
        vectors.sum().backward()
        got = {n for n, w in model.named_parameters() if w.grad is not None}
        wanted = {f"heads.{model.config.head_dims[0]}.{p}" for p in ("weight", "bias")}
        wanted |= {f"text.{n}" for n, _ in model.text.named_parameters()
                   if any(n.startswith(f"{prefix}.{i}.") for i in range(len(stack) - k, len(stack)))}
        if got - wanted:
            return False, (f"not yet: with k={k}, gradients reached {sorted(got - wanted)[:2]}: freeze everything "
                           "first (model.requires_grad_(False)), then thaw FC1 and the last k layers")
        if wanted - got:
            return False, (f"not yet: with k={k}, {sorted(wanted - got)[:2]} got no gradient: "
                           "jasper.encoder_layers(model.text)[-k:] are the last k layers, and model.fc1 is FC1")
    return True, "correct: FC1 and the last k layers get gradients, nothing else"


CHECKS = {"target-cosine": target_cosine, "longer-teacher": longer_teacher, "chunks": chunks,
          "pairs-of-pairs": pairs_of_pairs, "margin": margin, "tie": tie, "fc1-weight": fc1_weight,
          "stage4-path": stage4_path, "fc1-rises": fc1_rises, "layers": layers}


def check(name: str, answer, *context) -> None:
    """Print exercise `name`'s verdict on your answer (given what else the check needs)."""
    if answer is ...:
        print(f"exercise {name!r} {WAITING}")
        return
    try:
        print(CHECKS[name](answer, *context)[1])
    except NotImplementedError:
        print(f"exercise {name!r} {WAITING}")
