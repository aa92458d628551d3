"""How every command of this repository ends on bad input: one line on stderr, exit code 2, no traceback.

train.py, teachers.py and evaluate.py end with `commands.run("train.py", main)`. A problem the user can fix (a
corpus file that is not JSON lines, a preset field of the wrong type, a cache made for another run, a plan that does
not fit the GPU) raises InputError before any model loads. This module imports nothing but the standard library, so
the teachers' own environment (requirements-teachers.txt) imports it too.
"""

import os
import sys


class InputError(ValueError):
    """An input the user gave (a corpus file, a preset file, a flag) that cannot be used."""


def run(command: str, main) -> None:
    """Run a command's main(); an InputError ends it in one line on stderr, printed by rank 0 only, exit code 2."""
    try:
        main()
    except InputError as error:
        if os.environ.get("RANK", "0") == "0":
            print(f"{command}: {error}", file=sys.stderr)
        raise SystemExit(2) from None
