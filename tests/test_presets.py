"""Presets: every setting is declared once, in the Preset and StagePlan dataclasses, and both the command line and
preset files take their options and their checks from there."""

import argparse
import json
import typing
from dataclasses import fields

import pytest

import presets
from commands import InputError
from presets import Preset, StagePlan


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    presets.add_arguments(parser)
    return parser.parse_args(argv)


def test_every_plain_field_is_an_option_with_its_note_as_help():
    parser = argparse.ArgumentParser()
    presets.add_arguments(parser)
    options = {action.dest: action for action in parser._actions}
    for cls in (Preset, StagePlan):
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            plain = presets.plain_type(hints[f.name])
            if plain is not None and f.name != "name":
                assert f.name in options and options[f.name].help == f.metadata["help"], f.name
    assert "stages" not in options and "teachers" not in options  # set in preset files (and --teacher)


def test_the_command_line_changes_the_preset_and_the_stages_plan():
    args = parse("--preset", "paper", "--max-length", "256", "--loss-batches", "4", "--head-average", "short",
                 "--steps", "7", "--schedule-steps", "9", "--no-gradient-checkpointing", "--cached-gradients")
    preset, plan = presets.from_arguments(args, stage=3)
    assert (preset.max_length, preset.loss_batches, preset.head_average) == (256, 4, "short")
    assert (plan.steps, plan.schedule_length, plan.gradient_checkpointing, plan.cached_gradients) == (7, 9, False, True)
    assert presets.from_arguments(parse("--preset", "paper"), stage=3)[1].gradient_checkpointing  # the preset's own
    assert presets.from_arguments(parse("--preset", "paper"), stage=3)[1] == presets.load("paper").stages[3]


def test_a_preset_file_changes_fields_and_the_dataclass_checks_them(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"base": "paper", "max_length": 256, "mrl_dims": [64, 32],
                                "stages": {"3": {"steps": 10, "cached_gradients": True}}}))
    preset = presets.load(str(path))
    assert (preset.name, preset.max_length, preset.mrl_dims) == (str(path), 256, (64, 32))
    assert (preset.stages[3].steps, preset.stages[3].cached_gradients, preset.stages[3].lr) == (10, True, 7e-5)
    assert preset.stages[2] == presets.load("paper").stages[2]
    for changes, message in (({"max_length": "long"}, "field 'max_length': Input should be a valid integer"),
                             ({"mrl_dims": [64, "a"]}, "field 'mrl_dims.1': Input should be a valid integer"),
                             ({"teachers": [{"name": "a"}]}, "field 'teachers.0.model': Field required"),
                             ({"max_lenght": 256}, "max_lenght"),
                             ({"stages": {"5": {"steps": 1}}}, 'stages are "1" to "4"'),
                             ({"stages": {"3": {"steps": 1.5}}}, r"stages\[3\]: field 'steps'")):
        path.write_text(json.dumps({"base": "toy", **changes}))
        with pytest.raises(InputError, match=message):
            presets.load(str(path))
