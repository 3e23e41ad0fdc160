"""Fixtures shared by every test module (pytest finds them here; nothing imports this file).

Plain helper functions and constants are in `helpers.py` and the helper modules it lists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for each test module: the models under test are tiny, and a second thread only adds
    contention on a shared 2-core machine, where it made the mixer tests 10x slower. A test that measures threading
    sets its own count and restores it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny De-focus LLaVA saved to disk (`evaluation_helpers.build_saved_tiny_llava`), once per test module that
    asks for it."""
    # imported here, so that collecting a test module costs no model imports
    from evaluation_helpers import build_saved_tiny_llava

    path = tmp_path_factory.mktemp("tiny_llava")
    build_saved_tiny_llava(path)
    return path


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """Two different models saved in folders of the same name, `a/final` and `b/final`."""
    from evaluation_helpers import build_saved_tiny_llava as _build_tiny_llava, eval_run_script

    run = eval_run_script()
    root = tmp_path_factory.mktemp("models")
    _build_tiny_llava(root / "a" / "final")
    model, processor = run.load_model(str(root / "a" / "final"), "float32")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    model.save_pretrained(root / "b" / "final")
    processor.save_pretrained(root / "b" / "final")
    return root / "a" / "final", root / "b" / "final"
