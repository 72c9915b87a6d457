"""The command line: the installed ``seqrec-fast`` script, help texts, one-line user errors."""
import shutil
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from seqrec_fast.cli import main


def test_seqrec_fast_script_is_installed():
    # pyproject's [project.scripts] is what setuptools honours (setup.py's entry_points are
    # dropped when pyproject.toml has a [project] table)
    eps = [e for e in entry_points(group="console_scripts") if e.name == "seqrec-fast"]
    assert eps and eps[0].value == "seqrec_fast.cli:main", eps
    exe = shutil.which("seqrec-fast")
    assert exe is not None, "seqrec-fast is not on PATH after pip install"
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "train" in r.stdout and "evaluate" in r.stdout, r.stderr
