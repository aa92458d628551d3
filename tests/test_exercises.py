"""The notebooks' exercises: the answer in docs/solutions.md passes every check, a plausible wrong answer fails it
with the reason, each notebook asks at least two, and no notebook imports the solutions."""

import ast
import json
import re

import pytest
from conftest import ROOT
from test_model import TINY_BERT, TINY_QWEN2, build

import exercises
import jasper

SOLUTIONS = (ROOT / "docs" / "solutions.md").read_text()


def solution(name):
    """The answer under "### `name`" in docs/solutions.md: a Python value, or the function a code block defines."""
    section = SOLUTIONS.split(f"### `{name}`", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    if code:
        namespace = {"jasper": jasper}
        exec(code.group(1), namespace)
        return next(v for k, v in namespace.items() if callable(v) and not k.startswith("_") and k != "jasper")
    return ast.literal_eval(re.search(r"\*\*Answer:\*\* `(.+?)`", section).group(1))


def all_layers(model, k):  # trains every layer, whatever k says
    model.requires_grad_(False)
    for module in (model.fc1, *jasper.encoder_layers(model.text)):
        module.requires_grad_(True)


WRONG = {  # a plausible wrong answer, and a word the explanation must contain
    "target-cosine": (0.6, "width"),
    "longer-teacher": (0.5, "normalizing each teacher"),
    "chunks": ((2, 25), "10 + 10"),
    "pairs-of-pairs": (8128, "text pairs"),
    "margin": (0.0, "margin"),
    "tie": (0.315, "tie"),
    "fc1-weight": (200, "'short' rule"),
    "stage4-path": ({"vision encoder"}, "pooler"),
    "fc1-rises": ("a", "training loss"),
    "layers": (all_layers, "gradients reached"),
}


def context(name, text):
    return (build(text=text, heads=(48, 24, 12)),) if name == "layers" else ()


@pytest.mark.parametrize("name", sorted(exercises.CHECKS))
def test_the_solution_passes_and_a_wrong_answer_fails_with_its_reason(name, capsys):
    for text in (TINY_QWEN2, TINY_BERT) if name == "layers" else (None,):
        correct, message = exercises.CHECKS[name](solution(name), *context(name, text))
        assert correct and message.startswith("correct: ")
        wrong, reason = WRONG[name]
        correct, message = exercises.CHECKS[name](wrong, *context(name, text))
        assert not correct and message.startswith("not yet: ") and reason in message, message
        exercises.check(name, wrong, *context(name, text))  # what the notebook prints
        assert capsys.readouterr().out == message + "\n"


def test_an_unanswered_exercise_waits(capsys):
    exercises.check("pairs-of-pairs", ...)
    assert "waits for you" in capsys.readouterr().out


def notebook_code(path) -> str:
    return "\n".join("".join(cell["source"]) for cell in json.loads(path.read_text())["cells"]
                     if cell["cell_type"] == "code")


@pytest.mark.parametrize("notebook", ["01_data.ipynb", "02_losses.ipynb", "03_stages.ipynb"])
def test_each_notebook_asks_at_least_two_and_never_imports_the_answers(notebook):
    code = notebook_code(ROOT / notebook)
    asked = set(re.findall(r'exercises\.check\("([\w-]+)"', code))
    assert len(asked) >= 2 and asked <= set(exercises.CHECKS)
    assert "solutions" not in code and "docs/solutions" not in code
    for name in asked:  # the notebook leaves the answer to the reader
        assert f"### `{name}`" in SOLUTIONS
