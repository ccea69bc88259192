import os
import re

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
