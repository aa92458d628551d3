"""The notebooks' exercises: a check for each, and a solution for each (read it after trying).

In a notebook, write the function the exercise asks for, then run its check cell: `exercises.check("resim", my_resim)`
prints "correct", raises AssertionError saying what differs, or, while the function still raises
NotImplementedError, prints that it waits for you. tests/test_exercises.py runs every solution through its check
and a wrong answer too, so the checks can fail.
"""

import itertools
import math

import torch
import torch.nn.functional as F

import data
import jasper

# ----------------------------------------------------------------------------- solutions


def target_without_inner_normalization(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """01, exercise 1: the teachers' outputs concatenated and normalized, each teacher NOT normalized first."""
    return F.normalize(torch.cat([a, b], dim=-1), dim=-1)


def as_the_student_reads(text: str, kind: str, prompts: dict[str, str]) -> str:
    """01, exercise 2: the string the student encodes for a text of this kind (data.KINDS)."""
    return prompts.get(kind, "") + text


def pairs_of_pairs(m: int) -> int:
    """02, exercise 1: how many unordered pairs of text pairs a batch of m texts has (the paper's N)."""
    return math.comb(math.comb(m, 2), 2)


def trainable_per_stage(sizes: dict[str, int]) -> dict[int, int]:
    """03, exercise 1: from the parameter count of each part of the tiny student, how many train in each stage."""
    vision_side = sizes["vision encoder"] + sizes.get("pooler", 0)  # the release's pooler has no weights
    return {1: sizes["FC1"], 2: sizes["FC1"] + sizes["last 3 layers"], 3: sum(sizes.values()) - vision_side,
            4: vision_side}


def self_distillation_loss(student: dict[int, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """02, exercise 2: stage 3's loss with FC1's own vectors (detached) teaching the short heads."""
    fc1 = target.shape[1]
    short = [200 * jasper.similarity_loss(v, student[fc1].detach()) + 20 * jasper.resim_loss(v, student[fc1].detach())
             for width, v in student.items() if width != fc1]
    return jasper.distill_loss(student[fc1], target)["loss"] + sum(short) / len(short)


def train_last_layers(model: jasper.Jasper, k: int) -> None:
    """03, exercise 2: a stage 2 that trains FC1 and the last k encoder layers (the paper's k: 3)."""
    model.requires_grad_(False)
    for module in (model.fc1, *jasper.encoder_layers(model.text)[-k:]):
        module.requires_grad_(True)


SOLUTIONS = {"target": target_without_inner_normalization, "prompts": as_the_student_reads, "pairs": pairs_of_pairs,
             "self-distillation": self_distillation_loss, "trainable": trainable_per_stage, "layers": train_last_layers}


# ----------------------------------------------------------------------------- checks

def unit_rows(m: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(m, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def check_target(answer):
    g = torch.Generator().manual_seed(0)
    a, b = 10 * torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    mine = answer(a, b)
    assert mine.shape == (6, 8), f"expected a (6, 8) target, got {tuple(mine.shape)}"
    torch.testing.assert_close(mine, F.normalize(torch.cat([a, b], -1), dim=-1), msg="normalize the concatenation only")
    share = float((mine[0, :3] @ mine[1, :3]).abs() / ((mine[0, :3] @ mine[1, :3]).abs() + (mine[0, 3:] @ mine[1, 3:]).abs()))
    balanced = jasper.teacher_target(a, b)
    even = float((balanced[0, :3] @ balanced[1, :3]).abs() / ((balanced[0, :3] @ balanced[1, :3]).abs()
                                                              + (balanced[0, 3:] @ balanced[1, 3:]).abs()))
    return (f"correct: with teacher a's outputs ten times longer, a makes {share:.0%} of a dot product between two "
            f"targets; jasper.teacher_target keeps it at {even:.0%}")


def check_prompts(answer):
    prompts = data.STELLA_PROMPTS
    for text, kind in (("what is a cat", "query"), ("How do I bake bread?", "symmetric"), ("A cat sat.", "passage")):
        assert answer(text, kind, prompts) == data.with_prompts([text], [kind], prompts)[0], f"wrong for a {kind}"
    assert answer("what is a cat", "query", {}) == "what is a cat", "a model with no prompts reads the text as it is"
    return "correct: a passage goes in as it is, a query or symmetric text behind the prompt for its kind"


def check_pairs(answer):
    for m in range(2, 9):
        pairs = list(itertools.combinations(range(m), 2))
        counted = sum(1 for _ in itertools.combinations(pairs, 2))
        assert answer(m) == counted, f"m={m}: yours {answer(m)}, counted {counted}"
    return f"correct: m = 128 texts make {answer(128):,} pairs of pairs, the paper's N"


def check_trainable(answer, model: jasper.Jasper):
    import report
    mine = answer(report.part_sizes(model))
    for stage in (1, 2, 3, 4):
        actual = sum(jasper.set_trainable(model, stage).values())
        assert mine[stage] == actual, f"stage {stage}: yours {mine[stage]:,}, set_trainable {actual:,}"
    return "correct: " + ", ".join(f"stage {s}: {mine[s]:,}" for s in (1, 2, 3, 4))


def check_self_distillation(answer):
    student = {12: unit_rows(6, 12, 0).requires_grad_(True), 5: unit_rows(6, 5, 1), 3: unit_rows(6, 3, 2)}
    target = unit_rows(6, 12, 3)
    expected = jasper.text_distill_loss(student, target, short_teacher="fc1")["loss"]
    mine = answer(student, target)
    assert math.isclose(mine.item(), expected.item(), rel_tol=1e-9), f"yours {mine.item():.6f}, expected {expected.item():.6f}"
    (grad,) = torch.autograd.grad(mine, student[12])
    (fc1_alone,) = torch.autograd.grad(jasper.distill_loss(student[12], target)["loss"], student[12])
    torch.testing.assert_close(grad, fc1_alone, msg="FC1's vectors teach the short heads detached: no gradient to FC1")
    return "correct: the short heads learn FC1's geometry, and FC1 still learns only from the target"


def check_layers(answer, model: jasper.Jasper):
    ids = torch.randint(1, model.text.config.vocab_size, (4, 6))
    layers = jasper.encoder_layers(model.text)
    for k in (1, 2, len(layers)):
        model.zero_grad(set_to_none=True)
        answer(model, k)
        vectors = model(input_ids=ids, attention_mask=torch.ones_like(ids))[model.config.head_dims[0]]
        vectors.sum().backward()
        got = {n for n, w in model.named_parameters() if w.grad is not None}
        wanted = {f"heads.{model.config.head_dims[0]}.{p}" for p in ("weight", "bias")}
        wanted |= {f"text.{n}" for n, _ in model.text.named_parameters()
                   if any(n.startswith(f"{prefix}.{i}.") for i in range(len(layers) - k, len(layers))
                          for prefix in layer_prefixes(model))}
        assert got == wanted, f"k={k}: gradients reached {sorted(got - wanted)[:3]} and missed {sorted(wanted - got)[:3]}"
    return "correct: FC1 and the last k layers get gradients, nothing else"


def layer_prefixes(model: jasper.Jasper) -> set[str]:
    """The names under which the encoder's layers sit in model.text (BERT: encoder.layer, Qwen2: layers)."""
    layers = jasper.encoder_layers(model.text)
    return {name for name, module in model.text.named_modules() if module is layers}


CHECKS = {"target": check_target, "prompts": check_prompts, "pairs": check_pairs,
          "self-distillation": check_self_distillation, "trainable": check_trainable, "layers": check_layers}


def check(name: str, answer, *context) -> None:
    """Run exercise `name`'s check on your function (with what else the check needs) and print the verdict."""
    try:
        print(CHECKS[name](answer, *context))
    except NotImplementedError:
        print(f"exercise {name!r} waits for you: write the function above, then run this cell again "
              f"(a solution: exercises.{SOLUTIONS[name].__name__})")
