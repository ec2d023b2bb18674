"""A progress bar with the live key figures (tqdm; quiet when disabled or not a terminal)."""

from __future__ import annotations

KEYS = (
    ("distill/divergence", "div", "{:.4f}"),
    ("learner/loss", "loss", "{:+.4f}"),
    ("eval/greedy_acc", "acc", "{:.3f}"),
    ("rollout/staleness_mean", "stale", "{:.2f}"),
    ("perf/samples_per_s", "samp/s", "{:.1f}"),
)


class Progress:
    def __init__(
        self, *, total: int, initial: int = 0, enabled: bool = True, desc: str = ""
    ) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            from services.console import console

            # The terminal, also when the quiet console sends stderr to the engine log.
            self.bar = tqdm(
                total=total, initial=initial, desc=desc, dynamic_ncols=True, file=console()
            )
        self.last: dict = {}

    def update(self, row: dict) -> None:
        for key, short, fmt in KEYS:
            if row.get(key) is not None:
                self.last[short] = fmt.format(row[key])
        if self.bar is not None:
            self.bar.set_postfix(self.last, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
