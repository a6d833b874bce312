"""Shared fixtures: one generated game per task type and split, played by the real ALFWorld engine."""
import pytest

import demo


@pytest.fixture(scope="session")
def alf_data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("alfworld"))
    for split in ("train", "valid_seen", "valid_unseen"):
        demo.generate_alfworld_games(root, 1, seed=0, split=split, max_receptacles=8, n_distractors=3)
    return root
