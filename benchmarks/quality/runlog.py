"""The run log a quality benchmark resumes from: one JSON object per finished run, appended at once."""
from __future__ import annotations

import json
from pathlib import Path


class RunLog:
    """``runs.jsonl`` in a work directory: ``done`` maps each logged run's key to the run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, dict] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                run = json.loads(line)
                self.done[run["key"]] = run

    def record(self, key: str, **fields) -> dict:
        """Append the run ``key`` with ``fields`` to the log (flushed before the next run starts)."""
        run = {"key": key, **fields}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(run) + "\n")
        self.done[key] = run
        return run
