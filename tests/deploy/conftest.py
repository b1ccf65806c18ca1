"""The overlays, rendered once per session with the kubectl of .venv-deploy."""

from __future__ import annotations

import pytest

from tests.deploy.manifests import OVERLAYS, Manifests, parse, render


@pytest.fixture(scope="session")
def rendered() -> dict[str, str]:
    """overlay name -> the YAML `kubectl kustomize deploy/overlays/NAME` prints."""
    return {overlay: render(overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="session")
def overlays(rendered: dict[str, str]) -> dict[str, Manifests]:
    """overlay name -> its documents."""
    return {overlay: parse(text) for overlay, text in rendered.items()}
