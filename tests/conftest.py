"""Shared fixtures: tiny random-init models of both families, built once per session."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

FAMILIES = ("smolvlm", "llava")


@pytest.fixture(scope="session")
def nano_models(tmp_path_factory) -> dict:
    """{family: model_dir} for nano models written by `init_model` (a few seconds each)."""
    from training.init_model import init_model

    root = tmp_path_factory.mktemp("models")
    return {f: init_model(f, "nano", root / f, seed=0) for f in FAMILIES}


def png_bytes(size=(96, 80), seed=0, mode="L") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(size[1], size[0]), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="PNG")
    return buf.getvalue()
