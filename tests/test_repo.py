"""The repository's promises about itself: CI runs the README's test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)


def test_ci_runs_the_readme_test_command():
    commands = _readme_commands()
    test_commands = [c for c in commands if "pytest" in c]
    assert len(test_commands) == 1, commands
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_commands[0] in ci.splitlines(), "the README's test command is not in .ci/run"


def test_readme_commands_pin_torch_and_skip_build_isolation():
    for command in _readme_commands():
        if "pip install" in command and "torch" in command:
            assert "torch==2.13.0" in command, command
            assert "--no-build-isolation" in command, command
