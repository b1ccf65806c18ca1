"""deploy/Dockerfile and .dockerignore: what the image is built from and runs as.

Docker cannot build here; these read the files (checkov scans the Dockerfile in
`make deploy-check`) and tie them to the manifests: the user the image runs as is the one
the pods require, and the build context lets in only what the Dockerfile copies.
"""

from __future__ import annotations

import re

from tests.deploy.manifests import DEPLOY, ROOT, Manifests

DOCKERFILE = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
BASE = re.compile(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?")
ALLOWED_CONTEXT = {"pyproject.toml", "README.md", "relay/", "merchant_side/", "pci_side/"}


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    lines = [line.strip() for line in joined.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def _final_stage() -> list[tuple[str, str]]:
    instructions = _instructions(DOCKERFILE)
    last_from = max(i for i, (name, _) in enumerate(instructions) if name == "FROM")
    return instructions[last_from:]


def test_every_stage_starts_from_a_pinned_slim_python():
    """Each FROM names a patch release of python:3.11 slim on bookworm, never latest."""
    bases = [args.split()[0] for name, args in _instructions(DOCKERFILE) if name == "FROM"]
    assert 2 <= len(bases)
    assert all(BASE.fullmatch(base) for base in bases), bases


def test_the_image_runs_relay_as_the_user_the_pods_require(overlays: dict[str, Manifests]):
    """USER is numeric and is the runAsUser of every pod; the entrypoint is `relay`."""
    final = _final_stage()
    [user] = [args for name, args in final if name == "USER"]
    uid = int(user.split(":")[0])
    assert [("ENTRYPOINT", '["relay"]')] == [(n, a) for n, a in final if n == "ENTRYPOINT"]
    for manifests in overlays.values():
        for workload in manifests.workloads:
            assert uid == workload.pod["securityContext"]["runAsUser"]


def test_the_final_stage_installs_wheels_only():
    """No compiler, no apt, no pip cache: wheels from the build stage, offline."""
    runs = " ".join(args for name, args in _final_stage() if name == "RUN")
    assert "--no-index" in runs
    assert "--no-cache-dir" in runs
    assert [] == re.findall(r"apt-get|gcc|build-essential|pip wheel", runs)
    labels = " ".join(args for name, args in _final_stage() if name == "LABEL")
    for key in ("title", "description", "version", "revision", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_the_build_context_admits_only_the_sources():
    """.dockerignore excludes everything, then lets in only what the Dockerfile copies."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert "**" == patterns[0]
    allowed = {p[1:] for p in patterns if p.startswith("!")}
    assert ALLOWED_CONTEXT == allowed
    copied = {
        source if (ROOT / source).is_file() else source + "/"
        for name, args in _instructions(DOCKERFILE)
        if name == "COPY" and "--from" not in args
        for source in args.split()[:-1]
    }
    assert copied <= allowed
