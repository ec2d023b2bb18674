"""The pieces of ``bench/peer_trl.py`` (the command line and the order of the runs), one file
per side of the race and per phase after it:

- ``trl_side``: TRL's ``DistillationTrainer`` on opdplus's prompts, its settings and clock;
- ``opdplus_side``: the opdplus arms' configs and ``services.driver.train`` with a checkpoint
  hook that exports HF weights and times the pause;
- ``evaluate``: ``opdplus eval`` of every checkpoint, in a child process;
- ``report``: the figures, the opdplus/TRL ratios and the printed table.

Imported as ``peer.<module>``: bench/ is first on ``sys.path`` when a bench script runs.
"""


class BenchError(SystemExit):
    """A problem the user can fix (missing TRL, a bad override): one line, no traceback."""

    def __init__(self, message: str):
        super().__init__(f"peer_trl: {message}")
