"""The command line: help, info, params, and one-line errors with exit code 2."""

import json
import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "gasungbi", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_commands():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("info", "params"):
        assert cmd in r.stdout


def test_info_json():
    r = run("info", "--json")
    assert r.returncode == 0
    info = json.loads(r.stdout)
    assert {"gasungbi", "torch", "transformers", "device", "cpu capability", "cpu threads"} <= set(info)


def test_params_671b_on_meta():
    r = run("params", "deepseek-v3-671b", "--json")
    assert r.returncode == 0
    d = json.loads(r.stdout)
    assert d["built_on_meta"] == d["total_with_mtp"]
    assert 665e9 < d["total"] < 677e9 and 36e9 < d["activated"] < 38e9


def test_unknown_model_is_a_one_line_error():
    r = run("params", "no-such-model")
    assert r.returncode == 2
    assert "unknown model 'no-such-model'" in r.stderr and "Traceback" not in r.stderr
