"""Every command written in a stage's docstring or the README parses with that stage's own flags, so the
documentation cannot drift from the code; the ones that need no weights (--help, --dry_run) are run."""
import importlib
import re
import shlex
from pathlib import Path

import pytest

import common

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("sft", "rft", "rollout_sft", "eval", "analyze", "jigsaw", "toy", "report")
ARGS = {"jigsaw": "BuildArgs"}


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(where, script, argv) of every `python SCRIPT.py ...` line (continuation lines joined) in the scripts'
    docstrings and the README's code blocks."""
    sources = {f"{name}.py": importlib.import_module(name).__doc__ or "" for name in SCRIPTS}
    readme = (ROOT / "README.md").read_text()
    sources["README.md"] = "\n".join(re.findall(r"```bash\n(.*?)```", readme, re.S))
    found = []
    for where, text in sources.items():
        text = re.sub(r"\\\\?\n\s*", " ", text)  # join continuation lines (\ or \\ at a line's end)
        for line in text.splitlines():
            for match in re.finditer(r"(?:accelerate launch [^|;&]*?)?python (\w+)\.py((?: [^#|;&`)]*)?)", line):
                script, rest = match.group(1), match.group(2)
                if script not in SCRIPTS or "..." in rest:
                    continue
                argv = [a for a in shlex.split(rest.replace("[", "").replace("]", "")) if a != "\\"]
                found.append((where, script, argv))
    return found


COMMANDS = documented_commands()


def test_the_docs_have_commands_for_every_stage():
    assert {script for _, script, _ in COMMANDS} >= {"sft", "rft", "rollout_sft", "eval", "analyze", "jigsaw"}


@pytest.mark.parametrize("where,script,argv", COMMANDS, ids=[f"{w}:{s}:{' '.join(a)[:60]}" for w, s, a in COMMANDS])
def test_documented_command_parses(where, script, argv, capsys):
    module = importlib.import_module(script)
    args_class = getattr(module, ARGS.get(script, "Args"))
    if "--help" in argv or "-h" in argv:
        with pytest.raises(SystemExit) as err:
            module.main(argv)
        assert err.value.code == 0 and "usage:" in capsys.readouterr().out
        return
    if script == "eval":
        argv = module._join_compare_values(argv) if hasattr(module, "_join_compare_values") else argv
    args = common.parse_args(args_class, argv=argv)  # an unknown or misspelt flag exits here
    if hasattr(module, "check_args"):
        module.check_args(args)
    if "--dry_run" in argv:
        module.main(argv)
        assert "memory plan" in capsys.readouterr().out
