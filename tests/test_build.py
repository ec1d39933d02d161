"""The install path, the fast part: setup.py's checks run on fake environments (no download, no
compile), the torch version compiled into _C, the import guard's messages, and the one C++ standard
every compile uses. tools/compat.sh is the slow, real counterpart (results in README).
"""

import os
import re
import runpy
import subprocess
import types
from pathlib import Path

import pytest
import torch

from fused_bptt import _ops

ROOT = Path(__file__).resolve().parent.parent
# setup.py calls setup() only as __main__; under another name it just defines its functions.
SETUP = runpy.run_path(str(ROOT / "setup.py"), run_name="setup_under_test")
FIX = "pip install --no-build-isolation ."


def stop_message(call, *args, **kwargs):
    with pytest.raises(SystemExit) as stop:
        call(*args, **kwargs)
    message = str(stop.value.code)
    assert message.startswith("fused_bptt: ") and "\n" not in message, message
    return message


def fake_torch(path, version="2.15.0+cu132"):
    return types.SimpleNamespace(__file__=path, __version__=version)


# ---- plain `pip install .`: stop at once, with the one-line fix ----------------------------------


def test_no_torch_in_the_build_environment_stops_with_the_fix():
    def no_torch(name):
        raise ImportError(f"No module named '{name}'")

    assert stop_message(SETUP["import_build_torch"], no_torch).endswith(FIX)


@pytest.mark.parametrize(
    "path",
    [
        "/tmp/pip-build-env-x1y2z3/overlay/lib/python3.11/site-packages/torch/__init__.py",  # pip
        "/tmp/build-env-abc123/lib/python3.11/site-packages/torch/__init__.py",  # pypa/build
        "/root/.cache/uv/builds-v0/.tmpAbC/lib/python3.11/site-packages/torch/__init__.py",  # uv
    ],
)
def test_torch_of_a_temporary_build_environment_stops(path):
    message = stop_message(SETUP["import_build_torch"], lambda name: fake_torch(path))
    assert "2.15.0+cu132" in message and message.endswith(FIX)


def test_the_users_torch_is_taken():
    path = "/home/u/venv/lib/python3.11/site-packages/torch/__init__.py"
    assert SETUP["import_build_torch"](lambda name: fake_torch(path)).__file__ == path
    assert SETUP["import_build_torch"]() is torch


def test_torch_is_not_a_declared_build_requirement():
    # Listed, it would make an isolated build download a torch before setup.py can stop it.
    build_system = (ROOT / "pyproject.toml").read_text().split("[project]")[0]
    requires = re.search(r"^requires\s*=\s*\[(.*?)\]", build_system, re.M | re.S).group(1)
    assert "torch" not in requires, requires


# ---- the torch range: what tools/compat.sh verified ----------------------------------------------


@pytest.mark.parametrize(
    "version,inside",
    [
        ("2.13.0+cpu", True),
        ("2.14.1+cu130", True),
        ("2.15.0+cu132", True),
        ("2.15.0", True),
        ("2.12.1", False),
        ("2.15.1", False),
        ("2.16.0.dev20260101+cu132", False),
        ("2.13", True),
    ],
)
def test_in_range_ignores_the_local_part(version, inside):
    assert SETUP["in_range"](version, ">=2.13.0,<=2.15.0") is inside


def test_torch_outside_the_range_stops_unless_asked():
    message = stop_message(SETUP["check_torch_version"], "2.16.0", ">=2.13.0,<=2.15.0", {})
    assert "2.16.0" in message and "FUSED_BPTT_UNVERIFIED_TORCH=1" in message
    SETUP["check_torch_version"](
        "2.16.0", ">=2.13.0,<=2.15.0", {"FUSED_BPTT_UNVERIFIED_TORCH": "1"}
    )
    SETUP["check_torch_version"]("2.14.1+cu130", ">=2.13.0,<=2.15.0", {})


def test_range_is_what_the_readme_reports_as_verified():
    requirement = SETUP["torch_requirement"]()
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| (\d+\.\d+\.\d+)\S* \|(.*)$", readme, re.M)
    verified = [v for v, rest in rows if " passed" in rest and "failed" not in rest]
    assert verified, "no compat results (| <torch> | ... N passed ... |) in README"
    assert all(SETUP["in_range"](v, requirement) for v in verified), (requirement, verified)
    bounds = re.findall(r"(?:>=|<=)(\d+\.\d+\.\d+)", requirement)
    assert len(bounds) == 2 and set(bounds) <= set(verified), (requirement, verified)


# ---- CUDA_HOME -----------------------------------------------------------------------------------


def fake_toolkit(tmp_path, release="13.0", cudart=True):
    (tmp_path / "bin").mkdir(parents=True)
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.88'\n")
    nvcc.chmod(0o755)
    if cudart:
        (tmp_path / "lib64").mkdir()
        (tmp_path / "lib64" / "libcudart.so").write_bytes(b"")
    return str(tmp_path)


def test_toolkit_checks(tmp_path):
    home = fake_toolkit(tmp_path)
    assert SETUP["toolkit_problem"](home, "13.0") is None
    assert SETUP["toolkit_problem"](home, "13.2") is None  # minor versions may differ
    assert "CUDA 13.0" in SETUP["toolkit_problem"](home, "12.8")
    assert "bin/nvcc does not exist" in SETUP["toolkit_problem"](str(tmp_path / "lib64"), "13.0")
    assert "no CUDA toolkit" in SETUP["toolkit_problem"](None, "13.0")


def test_toolkit_without_cudart(tmp_path):
    # nvcc on PATH as a wrapper outside the toolkit makes torch guess such a directory.
    home = fake_toolkit(tmp_path, cudart=False)
    assert "lib64/libcudart.so does not exist" in SETUP["toolkit_problem"](home, "13.0")


def test_want_cuda(tmp_path):
    good = fake_toolkit(tmp_path / "good")
    bad = fake_toolkit(tmp_path / "bad", cudart=False)
    want = SETUP["want_cuda"]
    assert want({}, "13.0", good, "2.14.1+cu130")[0] is True
    built, why = want({}, "13.0", bad, "2.14.1+cu130")
    assert built is False and "CUDA_HOME not set, torch guessed" in why and "set CUDA_HOME" in why
    built, why = want({"CUDA_HOME": bad}, "13.0", bad, "2.14.1+cu130")
    assert built is False and f"CUDA_HOME={bad}" in why
    assert "set CUDA_HOME" in stop_message(want, {"FORCE_CUDA": "1"}, "13.0", bad, "2.14.1+cu130")
    assert want({"FORCE_CUDA": "0"}, "13.0", good, "2.14.1+cu130") == (False, "FORCE_CUDA=0")
    assert "CPU-only" in want({}, None, good, "2.13.0+cpu")[1]
    assert "CPU-only" in stop_message(want, {"FORCE_CUDA": "1"}, None, good, "2.13.0+cpu")
    assert "0 or 1" in stop_message(want, {"FORCE_CUDA": "yes"}, "13.0", good, "2.14.1+cu130")


def test_arch_list_is_passed_as_flags_not_through_the_environment():
    flags, _ = SETUP["cuda_arch_flags"]({})
    # torch adds its own arch flags (from TORCH_CUDA_ARCH_LIST or the visible GPUs) only where the
    # nvcc flags hold none, i.e. no flag containing "arch".
    assert flags == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    assert SETUP["cuda_arch_flags"]({"TORCH_CUDA_ARCH_LIST": "8.6"}) == (
        [],
        "TORCH_CUDA_ARCH_LIST=8.6",
    )


def test_setup_does_not_write_the_environment(capsys):
    before = dict(os.environ)
    SETUP["extension"]({"FORCE_CUDA": "0", "TORCH_CUDA_ARCH_LIST": "8.0"})
    assert dict(os.environ) == before
    assert "CUDA ops: no (FORCE_CUDA=0)" in capsys.readouterr().out
    source = (ROOT / "setup.py").read_text()
    assert not re.search(
        r"os\.environ\[[^]]*\]\s*=|os\.environ\.(setdefault|update)|putenv", source
    )


# ---- which torch _C was built against, and the import guard --------------------------------------


def test_build_info_round_trip(tmp_path):
    define = SETUP["build_info_define"]("2.14.1+cu130")
    text = "".join(chr(int(c)) for c in define.split("=", 1)[1].split(","))
    library = tmp_path / "_C.so"
    library.write_bytes(b"\x7fELF junk" + text.encode() + b"\0more junk")
    assert _ops.built_against(str(library)) == "2.14.1+cu130"
    assert _ops.built_against(str(tmp_path / "missing.so")) is None


@pytest.mark.skipif(not _ops.loaded(), reason=f"fused_bptt._C not loaded: {_ops.LOAD_ERROR}")
def test_the_built_library_names_the_torch_it_was_built_against():
    assert _ops.built_against(_ops._C.__file__) == torch.__version__


def test_load_problem_tells_a_mismatch_from_a_missing_build(tmp_path):
    library = tmp_path / "_C.so"
    library.write_bytes(b"fused_bptt built against torch 2.14.1+cu130\0")
    error = ImportError("undefined symbol: _ZN3c10...")
    assert _ops.load_problem(error, str(library), running="2.13.0+cpu") == (
        "fused_bptt._C was built against torch 2.14.1+cu130, running torch 2.13.0+cpu: "
        "it must be rebuilt"
    )
    assert "could not be loaded (undefined symbol" in _ops.load_problem(
        error, str(library), running="2.14.1+cu130"
    )
    assert "is not built" in _ops.load_problem(ImportError("No module named 'fused_bptt._C'"), None)


def test_reinstall_command_pins_no_torch():
    assert (
        "torch==" not in _ops.REINSTALL_COMMAND and "--no-build-isolation" in _ops.REINSTALL_COMMAND
    )


# ---- one C++ standard everywhere -----------------------------------------------------------


def test_every_compile_uses_the_standard_of_setup():
    flags = {}
    for directory, subdirs, names in os.walk(ROOT):
        subdirs[:] = [
            d for d in subdirs if d not in ("build", "dist", ".git") and not d.startswith("venv")
        ]
        for name in names:
            if name.endswith((".py", ".sh", ".cpp", ".cu", ".h", ".cuh", ".toml")):
                text = Path(directory, name).read_text(errors="replace")
                for flag in re.findall(r"-std=c\+\+\w+", text):
                    flags.setdefault(flag, set()).add(name)
    assert set(flags) == {SETUP["CXX_STANDARD"]}, flags


def test_compat_script_is_valid_bash_and_not_in_ci():
    assert subprocess.run(["bash", "-n", str(ROOT / "tools" / "compat.sh")]).returncode == 0
    assert "compat" not in (ROOT / ".ci" / "run").read_text()
