"""The notebooks' exercises: every solution passes its check, and a plausible wrong answer fails it."""

import math

import pytest

import exercises
import jasper
from test_model import TINY_BERT, TINY_QWEN2, TINY_SIGLIP, build


def undetached(student, target):  # the right value, but the short heads pull FC1 too
    fc1 = student[target.shape[1]]
    short = [200 * jasper.similarity_loss(v, fc1) + 20 * jasper.resim_loss(v, fc1)
             for width, v in student.items() if width != target.shape[1]]
    return jasper.distill_loss(fc1, target)["loss"] + sum(short) / len(short)


def all_layers(model, k):  # trains every layer, whatever k says
    exercises.train_last_layers(model, len(jasper.encoder_layers(model.text)))


WRONG = {
    "target": lambda a, b: jasper.teacher_target(a, b),  # normalizes each teacher first: what the exercise drops
    "prompts": lambda text, kind, prompts: prompts.get("query", "") + text,  # every kind gets the query prompt
    "pairs": lambda m: math.comb(m, 2),  # pairs, not pairs of pairs
    "self-distillation": lambda student, target: undetached(student, target),
    "trainable": lambda sizes: exercises.trainable_per_stage(sizes) | {2: sizes["FC1"]},  # stage 2 as stage 1
    "layers": all_layers,
}


def context(name, text):
    if name not in ("trainable", "layers"):
        return ()
    return (build(text=text, vision=TINY_SIGLIP, heads=(48, 24, 12), pooler="mlp", image_tokens=9),)


@pytest.mark.parametrize("text", [TINY_QWEN2, TINY_BERT], ids=["qwen2", "bert"])
@pytest.mark.parametrize("name", sorted(exercises.CHECKS))
def test_each_solution_passes_its_check_and_a_wrong_answer_fails(name, text, capsys):
    exercises.check(name, exercises.SOLUTIONS[name], *context(name, text))
    assert capsys.readouterr().out.startswith("correct")
    with pytest.raises(AssertionError):
        exercises.check(name, WRONG[name], *context(name, text))


def test_an_unwritten_exercise_says_it_waits(capsys):
    def not_yet(m):
        raise NotImplementedError
    exercises.check("pairs", not_yet)
    out = capsys.readouterr().out
    assert "waits for you" in out and "exercises.pairs_of_pairs" in out
