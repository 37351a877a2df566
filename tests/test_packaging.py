"""What `pip install scott-kernels` without extras gives: the `mimjepa` command must show its help
and, for a command, name the extra to install instead of failing on an import."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the training extra's modules made unimportable, as in an install without [train]
BLOCK = "import sys; [sys.modules.__setitem__(m, None) for m in ('yaml', 'safetensors', 'tqdm', 'torchvision')]; "


def _mimjepa(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]))
    code = BLOCK + f"from mimjepa.cli import main; sys.exit(main({list(args)!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_help_without_the_train_extra():
    result = _mimjepa("--help")
    assert result.returncode == 0, result.stderr
    assert "pretrain" in result.stdout and "demo" in result.stdout


@pytest.mark.parametrize("command", [["demo"], ["probe", "checkpoint=x.safetensors"]])
def test_commands_name_the_missing_extra(command):
    result = _mimjepa(*command)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'scott-kernels[train]'" in lines[0], result.stderr
