"""Every command written in a stage's docstring or the README parses with that stage's own flags, so the
documentation cannot drift from the code; the ones that need no weights (--help, --dry_run) are run. The run
folders those commands name are checked in tests/test_run_all.py (against the smoke run) and below (spelling)."""
import argparse
import ast
import importlib
import re
import shlex
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Every script whose docstring holds a `python SCRIPT.py ...` command of its own.
SCRIPTS = ("sft", "rft", "rollout_sft", "eval", "analyze", "jigsaw", "toy", "report", "base_check", "plan", "mirror")
# The docstrings read: the scripts, and teacher.py (its rollout_sft.py commands).
DOCUMENTED = SCRIPTS + ("teacher",)
ARGS = {"jigsaw": "BuildArgs"}


def documented_texts(readme: str = "code") -> dict[str, str]:
    """{where: text} of the module docstrings of DOCUMENTED and of the README: its fenced code blocks
    (readme="code"), only its bash blocks ("bash") or all of it ("all"). Read with ast: nothing is imported."""
    texts = {f"{name}.py": ast.get_docstring(ast.parse((ROOT / f"{name}.py").read_text()), clean=False) or ""
             for name in DOCUMENTED}
    text = (ROOT / "README.md").read_text()
    if readme != "all":
        text = "\n".join(re.findall(r"```bash\n(.*?)```" if readme == "bash" else r"```\w*\n(.*?)```", text, re.S))
    texts["README.md"] = text
    return texts


# A path as the docs write one: no spaces, ends before `=`, `,`, `:` (NAME=PATH,NAME=PATH:COLUMN lists).
PATH = re.compile(r"(?<![\w./<>*$-])[\w.<>*-]+(?:/[\w.<>*-]+)+/?")


def documented_paths(readme: str = "all") -> list[tuple[str, str]]:
    """(where, path) of every relative path (a/b...) in the docstrings and the README."""
    return [(where, match.group(0).rstrip("."))
            for where, text in documented_texts(readme).items() for match in PATH.finditer(text)]


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(where, script, argv) of every `python SCRIPT.py ...` line (continuation lines joined) in the scripts'
    docstrings and the README's bash code blocks."""
    found = []
    for where, text in documented_texts(readme="bash").items():
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


class _Parsed(Exception):
    """Raised in place of acting once an argparse script has parsed its command line."""


def _parse_and_stop(parser, args=None, namespace=None):
    raise _Parsed(_PARSE_ARGS(parser, args, namespace))


_PARSE_ARGS = argparse.ArgumentParser.parse_args


@pytest.mark.parametrize("where,script,argv", COMMANDS, ids=[f"{w}:{s}:{' '.join(a)[:60]}" for w, s, a in COMMANDS])
def test_documented_command_parses(where, script, argv, capsys):
    import common
    module = importlib.import_module(script)
    args_class = getattr(module, ARGS.get(script, "Args"), None)
    if args_class is None:  # an argparse script (plan.py, mirror.py): its own parser, stopped before it acts
        with mock.patch.object(argparse.ArgumentParser, "parse_args", _parse_and_stop), pytest.raises(_Parsed):
            module.main(argv)  # an unknown or misspelt flag exits (SystemExit 2) instead
        return
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


PRESETS = sorted(path.stem for path in (ROOT / "presets").glob("*.env"))


def test_run_folders_in_the_docs_are_a_preset_s():
    """A run folder the docs name is runs/<preset>/... of a preset, as run_all.sh makes it (runs/3b/rft/final, not
    runs/rft_3b): run_all.sh writes nowhere else under runs/. Examples that write elsewhere use /tmp."""
    wrong = [f"{where}: {path}" for where, path in documented_paths()
             if path.startswith("runs/") and path.split("/")[1] not in PRESETS + ["<preset>"]]
    assert not wrong, "run folders outside runs/<preset>/:\n" + "\n".join(wrong)
