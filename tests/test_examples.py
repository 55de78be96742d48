"""The examples run as documented and actually train (tiny random model, CPU, no downloads)."""
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(autouse=True)
def examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))


def test_plain_loop_learns_the_preference():
    import plain_loop
    loss, metrics = plain_loop.main(steps=12)
    assert loss < 0.1                                   # from log 2 = 0.693 at step 0
    assert metrics["rewards/accuracies"].item() == 1.0


def test_hf_trainer_compute_loss_swap_trains():
    import hf_trainer
    assert hf_trainer.main(steps=10) < 0.6931 * 0.5

