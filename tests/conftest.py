"""Session-wide test setup."""

import os
import signal

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


@pytest.fixture(scope="session", autouse=True)
def _sigint_deliverable():
    """Give SIGINT Python's default handler when pytest was started with SIGINT ignored.

    A shell without job control starts its background jobs (``cmd &`` in a script, ``nohup``) with
    SIGINT ignored (POSIX, "Asynchronous Lists"), and Python then installs no ``KeyboardInterrupt``
    handler; the children it starts inherit the ignore across ``exec``. The Ctrl-C tests
    (``tests/test_rollout.py``) would then fail for the runner's reason, not the code's: the signal
    never arrives. A handler (unlike ``SIG_IGN``) is reset to the default across ``exec``, so the CLI
    processes those tests start get Python's usual handler too. Restored at the end of the session.
    A side effect: such a background run can be stopped by a Ctrl-C meant for the foreground job
    of the same terminal (where it shares the terminal's process group). No effect on Windows.
    """
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    if previous is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
