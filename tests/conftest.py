"""Session-wide test setup."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _sb3_log_dir(tmp_path_factory):
    """Send SB3's default loggers into the session's temporary directory.

    ``model.learn`` without a logger calls SB3's ``configure()``, which makes an empty
    ``SB3-<date>`` folder under ``$SB3_LOGDIR`` or, unset, the system temp directory; tests that
    train SB3 models directly would leave hundreds of them behind. Set for the whole session (and
    inherited by worker processes), removed with pytest's other temporary files.
    """
    previous = os.environ.get("SB3_LOGDIR")
    os.environ["SB3_LOGDIR"] = str(tmp_path_factory.mktemp("sb3-logs"))
    yield
    if previous is None:
        os.environ.pop("SB3_LOGDIR", None)
    else:
        os.environ["SB3_LOGDIR"] = previous
