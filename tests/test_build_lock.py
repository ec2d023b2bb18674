"""A rank killed while holding DeepSpeed's op build lock must not hang every later rank."""

import os
import shutil
import time
from pathlib import Path

from learner.engine import clear_stale_build_lock


def test_only_a_stale_build_lock_is_removed():
    from torch.utils.cpp_extension import _get_build_directory

    folder = Path(_get_build_directory("opdplus_lock_test", verbose=False))
    lock = folder / "lock"
    try:
        assert clear_stale_build_lock("opdplus_lock_test") is False  # no lock at all
        lock.touch()
        assert clear_stale_build_lock("opdplus_lock_test") is False  # a live build's lock
        assert lock.exists()
        os.utime(lock, (time.time() - 3600,) * 2)
        assert clear_stale_build_lock("opdplus_lock_test") is True
        assert not lock.exists()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
