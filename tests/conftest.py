"Shared pytest fixtures: the real data samples beside the project, skipped when absent."
import pytest

from tpad.data import shared_data_dir


@pytest.fixture(scope='session')
def shared():
    "The `shared/data` folder with the real samples; tests that need it skip without it."
    path = shared_data_dir()
    if path is None: pytest.skip('real data samples (../shared/data) not present')
    return path
