"""The checkout never shadows an installed package: fastdpo's Triton kernels live in a top-level `kernels/` folder,
and Hugging Face's `kernels` package (which transformers imports) must still win from the repository root."""
import importlib.util
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_checkout_kernels_folder_is_not_a_regular_package():
    # a regular package (with __init__.py) first on sys.path would win over any installed `kernels`
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert not (ROOT / "kernels.py").exists()


@pytest.mark.skipif(importlib.util.find_spec("kernels") is None, reason="Hugging Face's kernels is not installed")
def test_from_the_repository_root_transformers_gets_hf_kernels_and_fastdpo_its_own():
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"   # imports transformers' hub_kernels
        "import kernels, fastdpo.kernels.logps as fk\n"
        "assert hasattr(kernels, 'CUDAProperties'), kernels\n"
        "print(kernels.__file__); print(fk.__file__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(ROOT)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    hf_file, fastdpo_file = done.stdout.split()
    assert pathlib.Path(hf_file).resolve().parent != ROOT / "kernels"
    assert pathlib.Path(fastdpo_file).resolve() == ROOT / "kernels" / "logps.py"


def test_the_kernels_are_importable_as_fastdpo_kernels():
    from fastdpo.kernels import config, logps
    assert pathlib.Path(logps.__file__).resolve().parent == ROOT / "kernels"
    assert hasattr(config, "INTERPRETING")
