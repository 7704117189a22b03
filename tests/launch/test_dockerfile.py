"""The Dockerfile, read by a real parser (the `dockerfile` package, i.e. BuildKit's own parser): an NGC
PyTorch base, pinned vLLM and modelopt, this package installed with its extras, a non-root user, and every
path it copies present in the repository and not excluded by .dockerignore (`docker build` cannot run here)."""

import fnmatch
import re
import shlex

import pytest

from launch import REPO

dockerfile = pytest.importorskip("dockerfile", reason="pip install dockerfile (in requirements/ci.lock)")


@pytest.fixture(scope="module")
def commands():
    return dockerfile.parse_file(str(REPO / "Dockerfile"))


def build_args(commands) -> dict[str, str]:
    args = {}
    for c in commands:
        if c.cmd == "ARG" and "=" in c.value[0]:
            name, value = c.value[0].split("=", 1)
            args.setdefault(name, value.strip('"'))
    return args


def stages(commands) -> list[list]:
    out = []
    for c in commands:
        if c.cmd == "FROM":
            out.append([])
        if out:
            out[-1].append(c)
    return out


def test_every_stage_starts_from_the_ngc_pytorch_image(commands):
    args = build_args(commands)
    froms = [c.value[0] for c in commands if c.cmd == "FROM"]
    assert froms and all(f.startswith("nvcr.io/nvidia/pytorch:") for f in froms), froms
    tag = froms[-1].split(":", 1)[1].replace("${NGC_TAG}", args.get("NGC_TAG", ""))
    assert re.fullmatch(r"\d\d\.\d\d-py3", tag), f"the NGC tag must be pinned, got {tag!r}"


def test_vllm_and_modelopt_are_pinned(commands):
    args = build_args(commands)
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["VLLM_VERSION"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["MODELOPT_VERSION"])
    runs = " ".join(c.value[0] for c in commands if c.cmd == "RUN")
    assert "--branch v${VLLM_VERSION}" in runs and "use_existing_torch.py" in runs  # built against NGC's torch
    assert '"nvidia-modelopt==${MODELOPT_VERSION}"' in runs


def test_installs_this_package_with_its_gpu_extras(commands):
    final = stages(commands)[-1]
    installs = [shlex.split(c.value[0].replace("&&", ";")) for c in final if c.cmd == "RUN" and "pip install" in c.value[0]]
    targets = [word for words in installs for word in words if word.startswith(".[")]
    assert targets, "no `pip install .[extras]` in the final stage"
    for target in targets:
        extras = set(target[2:-1].split(","))
        assert {"gpu", "sentencepiece"} <= extras, target
    # The source is copied before the last install, and that install is the package itself.
    last_install = max(i for i, c in enumerate(final) if c.cmd == "RUN" and ".[gpu" in c.value[0])
    copied = [c.value[0] for c in final[:last_install] if c.cmd == "COPY" and not c.flags]
    assert "megatron_ovr" in copied


def test_extras_exist_in_setup_py(commands):
    setup = (REPO / "setup.py").read_text()
    for extra in ("gpu", "sentencepiece"):
        assert re.search(rf'"{extra}":\s*\[', setup), f"setup.py has no {extra!r} extra"


def _ignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern.removeprefix("**/")) \
                or path.startswith(pattern + "/"):
            ignored = not negate
    return ignored


def test_every_copied_path_exists_and_is_not_dockerignored(commands):
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    sources = []
    for c in commands:
        if c.cmd in ("COPY", "ADD") and not any(f.startswith("--from") for f in c.flags):
            sources += c.value[:-1]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), f"Dockerfile copies {source}, which does not exist"
        assert not _ignored(source.rstrip("/"), patterns), f"Dockerfile copies {source}, but .dockerignore excludes it"
    for heavy in (".venv", ".git", "outputs"):
        assert _ignored(heavy, patterns), f".dockerignore should exclude {heavy}"


def test_copy_from_names_a_stage(commands):
    names = {c.value[2] for c in commands if c.cmd == "FROM" and len(c.value) == 3 and c.value[1].upper() == "AS"}
    for c in commands:
        for flag in c.flags:
            if flag.startswith("--from="):
                assert flag.split("=", 1)[1] in names, flag


def test_runs_as_a_non_root_user(commands):
    final = stages(commands)[-1]
    users = [c.value[0] for c in final if c.cmd == "USER"]
    assert users and users[-1] not in ("root", "0"), users
    assert any(c.cmd == "RUN" and "useradd" in c.value[0] and users[-1] in c.value[0] for c in final)
