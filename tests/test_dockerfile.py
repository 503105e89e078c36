"""The Dockerfile, checked without a container engine.

A small parser reads the Dockerfile into instructions (comments dropped,
backslash continuations joined, JSON or shell form) and the checks read
them: the base is NVIDIA's PyTorch container, by default a release on CUDA 12
(which the drivers most clusters have run; docs/docker.md names it), every
file copied exists in the repository and survives .dockerignore, no `pip
install` can replace the container's torch (no unpinned torch, local installs
with --no-deps), every requirement of setup.py and of its test extras is in
the container or installed here, `bash tests/run.sh` uses the image's python
instead of building a virtualenv, and there is a working directory and an
entrypoint. The checks are also run on broken Dockerfiles to show that they
catch what they claim.
"""
import ast
import fnmatch
import json
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import NamedTuple

import pytest

REPO = Path(__file__).resolve().parent.parent
BASE_IMAGE = re.compile(r"nvcr\.io/nvidia/pytorch:\d{2}\.\d{2}-py3")
# Python packages NVIDIA's PyTorch container ships (its own builds for torch and triton).
CONTAINER_PACKAGES = {"torch", "triton", "numpy", "tensorboard", "apex"}
TORCH_PACKAGES = {"torch", "triton", "torchvision", "torchaudio"}
# The last nvcr.io/nvidia/pytorch release built on CUDA 12 (12.9.1); later ones are on CUDA 13,
# whose minimum driver (R580) many clusters do not have yet.
LAST_CUDA12_RELEASE = (25, 6)


class Instruction(NamedTuple):
    keyword: str
    arguments: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    instructions, pending, start = [], "", 0
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip(), start))
        pending = ""
    if pending:
        raise ValueError(f"Dockerfile line {start}: continuation at the end of the file")
    return instructions


def words(arguments: str) -> list[str]:
    """The words of an instruction in JSON (exec) form or shell form."""
    if arguments.startswith("["):
        return json.loads(arguments)
    return shlex.split(arguments)


def base_image(instructions: list[Instruction]) -> str:
    defaults = {}
    for instruction in instructions:
        if instruction.keyword == "ARG" and "=" in instruction.arguments:
            name, _, value = instruction.arguments.partition("=")
            defaults[name] = value
        elif instruction.keyword == "FROM":
            image = words(instruction.arguments)[0]
            return re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), image)
    raise ValueError("Dockerfile has no FROM")


def copied_sources(instructions: list[Instruction]) -> list[tuple[int, str]]:
    """(line, source path) of every COPY/ADD from the build context."""
    sources = []
    for instruction in instructions:
        if instruction.keyword not in ("COPY", "ADD"):
            continue
        parts = words(instruction.arguments)
        if any(part.startswith("--from") for part in parts):
            continue
        paths = [part for part in parts if not part.startswith("--")]
        sources += [(instruction.line, path) for path in paths[:-1]]
    return sources


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore `patterns` exclude `path` or a folder above it
    (the subset of the syntax used here: globs and a leading **/)."""
    parts = Path(path).parts
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        anywhere = pattern.startswith("**/")
        for prefix in prefixes:
            if fnmatch.fnmatch(prefix, pattern) or (
                    anywhere and fnmatch.fnmatch(prefix.split("/")[-1], pattern[3:])):
                result = not negate
    return result


def pip_installs(instructions: list[Instruction]) -> list[tuple[int, list[str]]]:
    """(line, arguments after `pip install`) of every pip install in a RUN."""
    found = []
    for instruction in instructions:
        if instruction.keyword != "RUN":
            continue
        lexer = shlex.shlex(instruction.arguments, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        for token in [*lexer, ";"]:
            if token not in ("&&", "||", ";", "|", "&"):
                command.append(token)
                continue
            for i in range(len(command) - 1):
                if command[i].endswith("pip") and command[i + 1] == "install":
                    found.append((instruction.line, command[i + 2:]))
            command = []
    return found


def requirement_name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0).lower().replace("_", "-")


def pip_problems(instructions: list[Instruction]) -> list[str]:
    """What in the pip installs could replace the container's torch."""
    problems = []
    for line, arguments in pip_installs(instructions):
        requirements = [a for a in arguments if not a.startswith("-")]
        local = [a for a in requirements if a.startswith((".", "/"))]
        if local and "--no-deps" not in arguments:
            problems.append(f"line {line}: installing {local} without --no-deps may "
                            f"reinstall torch from setup.py's requirements")
        for requirement in set(requirements) - set(local):
            name = requirement_name(requirement)
            if name in TORCH_PACKAGES and "==" not in requirement:
                problems.append(f"line {line}: unpinned {requirement!r} replaces the "
                                f"container's CUDA build")
    return problems


def setup_requirements(extra: str | None = None) -> list[str]:
    """The names in setup.py's install_requires, or in extras_require[extra]."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires" and extra is None:
            return [requirement_name(ast.literal_eval(item)) for item in node.value.elts]
        if isinstance(node, ast.keyword) and node.arg == "extras_require" and extra is not None:
            return [requirement_name(name) for name in ast.literal_eval(node.value)[extra]]
    raise ValueError(f"setup.py has no {'install_requires' if extra is None else extra} extra")


def environment(instructions: list[Instruction]) -> dict[str, str]:
    """The ENV variables set (the `ENV a=1 b=2` form)."""
    values = {}
    for instruction in instructions:
        if instruction.keyword == "ENV":
            for word in shlex.split(instruction.arguments):
                name, _, value = word.partition("=")
                values[name] = value
    return values


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile((REPO / "Dockerfile").read_text())


def test_base_is_nvidia_pytorch_container(dockerfile):
    assert BASE_IMAGE.fullmatch(base_image(dockerfile)), base_image(dockerfile)


def test_default_base_is_a_cuda12_release_and_the_docs_say_which(dockerfile):
    tag = base_image(dockerfile).split(":")[1]
    year, month = (int(part) for part in tag.split("-")[0].split("."))
    assert (year, month) <= LAST_CUDA12_RELEASE, f"{tag}: built on CUDA 13, needs an R580 driver"
    docs = (REPO / "docs" / "docker.md").read_text()
    assert f"pytorch:{tag}" in docs and "R580" in docs and "R535" in docs


def test_every_copied_file_exists_and_is_in_the_build_context(dockerfile):
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    sources = copied_sources(dockerfile)
    assert sources
    for line, source in sources:
        assert (REPO / source).exists(), f"Dockerfile line {line}: COPY {source}: no such file"
        assert source == "." or not ignored(source, patterns), f"line {line}: {source} ignored"
    needed = ["setup.py", "README.md", "megatron_sr/model/gpt_model.py",
              "megatron_sr/data/indexed_dataset.py", "pretrain_gpt.py", "tools/preprocess_data.py"]
    if any(source == "." for _, source in sources):
        assert [path for path in needed if ignored(path, patterns)] == []
    for path in (".venv/bin/python", ".git/HEAD", "megatron_sr/__pycache__/x.pyc"):
        assert ignored(path, patterns), f".dockerignore lets {path} into the build context"


def test_no_pip_install_replaces_torch(dockerfile):
    assert pip_installs(dockerfile)
    assert pip_problems(dockerfile) == []


@pytest.mark.parametrize("extra", [None, "test"])
def test_setup_requirements_are_in_the_container_or_installed(dockerfile, extra):
    installed = {requirement_name(a) for _, arguments in pip_installs(dockerfile)
                 for a in arguments if not a.startswith(("-", ".", "/"))}
    missing = set(setup_requirements(extra)) - CONTAINER_PACKAGES - installed
    assert missing == set(), f"setup.py ({extra or 'install_requires'}) requires {missing}, " \
                             f"which the image lacks"


def test_the_test_runner_uses_the_images_python_without_installing(dockerfile, tmp_path):
    python = environment(dockerfile).get("MEGATRON_SR_TEST_PYTHON")
    assert python, "the image does not tell tests/run.sh which python to use"
    # A stand-in python that prints its arguments: run.sh must call it, not build a venv.
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho \"$@\"\n")
    fake.chmod(0o755)
    env = {**os.environ, "MEGATRON_SR_TEST_PYTHON": str(fake), "VENV": str(tmp_path / "venv")}
    out = subprocess.run(["bash", str(REPO / "tests" / "run.sh"), "-m", "not slow"], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "-m pytest -m not slow"
    assert not (tmp_path / "venv").exists()


def test_working_directory_and_entrypoint(dockerfile):
    keywords = [instruction.keyword for instruction in dockerfile]
    assert "WORKDIR" in keywords and "ENTRYPOINT" in keywords
    entrypoint = next(i for i in dockerfile if i.keyword == "ENTRYPOINT")
    assert entrypoint.arguments.startswith("[")  # exec form: signals reach torchrun


def test_the_checks_catch_broken_dockerfiles():
    broken = parse_dockerfile(
        "ARG BASE=python:3.12\n"
        "FROM $BASE\n"
        "# a comment\n"
        "RUN pip install torch numpy && \\\n"
        "    pip install -e .\n"
        'COPY ["no_such_file.txt", "/x/"]\n')
    assert [i.keyword for i in broken] == ["ARG", "FROM", "RUN", "COPY"]
    assert broken[2].line == 4
    assert not BASE_IMAGE.fullmatch(base_image(broken))
    problems = pip_problems(broken)
    assert any("unpinned 'torch'" in p for p in problems)
    assert any("without --no-deps" in p for p in problems)
    assert copied_sources(broken) == [(6, "no_such_file.txt")]
    pinned = parse_dockerfile("FROM x\nRUN pip install torch==2.13.0 && pip install --no-deps .\n")
    assert pip_problems(pinned) == []


def pinned_versions(instructions: list[Instruction]) -> dict[str, str]:
    """{name: version} of every `name==version` the pip installs give for
    torch and triton (a local label such as +cu128 dropped)."""
    pins = {}
    for _, arguments in pip_installs(instructions):
        for argument in arguments:
            name, separator, version = argument.partition("==")
            if separator and requirement_name(name) in ("torch", "triton"):
                pins[requirement_name(name)] = version.split("+")[0]
    return pins


def pin_problems(instructions: list[Instruction], setup_py: Path = REPO / "setup.py") -> list[str]:
    """Where the Dockerfile's torch and triton pins miss setup.py's requirement
    (its floor and, for triton, its upper bound), or are missing."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    tree = ast.parse(setup_py.read_text())
    specifiers = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            for item in node.value.elts:
                requirement = Requirement(ast.literal_eval(item))
                specifiers[requirement.name] = requirement.specifier
    pins = pinned_versions(instructions)
    problems = []
    for name in ("torch", "triton"):
        if name not in pins:
            problems.append(f"{name} is not pinned: the container's own is older than setup.py's "
                            f"floor")
        elif Version(pins[name]) not in specifiers[name]:
            problems.append(f"{name}=={pins[name]} does not meet setup.py's {name}"
                            f"{specifiers[name]}")
    return problems


def test_torch_and_triton_are_pinned_at_or_above_setup_floors(dockerfile):
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_floors", REPO / "tools" / "check_floors.py")
    check_floors = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_floors)
    assert pin_problems(dockerfile) == []
    pins = pinned_versions(dockerfile)
    floors = check_floors.floors()
    for name in ("torch", "triton"):  # the floors tools/check_floors.py tests are what is pinned
        assert pins[name].split(".")[:2] == floors[name].split(".")[:2], (pins, floors)


def test_the_pin_check_catches_old_and_missing_pins():
    old = parse_dockerfile('FROM x\nRUN pip install "torch==2.8.0" "triton==3.3.1"\n')
    assert any("torch==2.8.0 does not meet" in p for p in pin_problems(old))
    assert any("triton==3.3.1 does not meet" in p for p in pin_problems(old))
    too_new = parse_dockerfile("FROM x\nRUN pip install torch==2.13.0+cu128 triton==3.10.0\n")
    assert [p.split(" does")[0] for p in pin_problems(too_new)] == ["triton==3.10.0"]
    unpinned = parse_dockerfile("FROM x\nRUN pip install numpy\n")
    assert len(pin_problems(unpinned)) == 2
