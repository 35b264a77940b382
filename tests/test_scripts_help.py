"""Every script's --help runs: each script at the repository root and in benchmarks/ that parses arguments.

The scripts are found by glob, so a new one is tested without editing this file. They run through
their own `__main__` line in this process (a fresh interpreter costs seconds of imports per script);
one real subprocess checks the command a user types.
"""
import argparse
import glob
import os
import runpy
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def is_script(path):
    with open(path) as f:
        text = f.read()
    return "argparse" in text and 'if __name__ == "__main__":' in text


SCRIPTS = sorted(os.path.relpath(path, REPO) for pattern in ("*.py", "benchmarks/*.py")
                 for path in glob.glob(os.path.join(REPO, pattern)) if is_script(path))


def run_help(script, argv, monkeypatch, capsys):
    """`script ARGV` run as __main__ in this process: (exit status, stdout)."""
    path = os.path.join(REPO, script)
    monkeypatch.syspath_prepend(os.path.dirname(path))  # what `python script` puts first on sys.path
    monkeypatch.setattr(sys, "argv", [path, *argv])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(path, run_name="__main__")
    return stop.value.code, capsys.readouterr().out


def subcommands(parser):
    """Names of the parser's subcommands (none for most scripts)."""
    return [name for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name in action.choices]


def test_the_scripts_are_found():
    assert {"train.py", "pseudo_label.py", "dataset_tool.py", "compare_runs.py",
            "benchmarks/gpu_check.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_runs(script, monkeypatch, capsys):
    status, out = run_help(script, ["--help"], monkeypatch, capsys)
    assert status == 0 and out.startswith("usage:"), out[:200]
    module = runpy.run_path(os.path.join(REPO, script))  # not __main__: defines get_args_parser, runs nothing
    if "get_args_parser" in module:
        for command in subcommands(module["get_args_parser"]()):
            status, out = run_help(script, [command, "--help"], monkeypatch, capsys)
            assert status == 0 and out.startswith("usage:"), (command, out[:200])


@pytest.mark.slow
def test_pseudo_label_help_in_a_fresh_interpreter():
    result = subprocess.run([sys.executable, os.path.join(REPO, "pseudo_label.py"), "--help"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and result.stdout.startswith("usage:"), result.stderr[-2000:]
    assert "less than 30% of the pixels" in " ".join(result.stdout.split())  # help lines wrap
