"""A tool that speaks Dagster Pipes, run inside a Docker container (the host's Python bind-mounted).

``python pipes_tool.py ok|fail|sleep [PIDFILE]``: logs through Pipes, prints plain lines,
then reports a materialization (ok), fails with a disk-full error (fail) or starts a
``sleep 60`` child, writes both pids to PIDFILE and waits (sleep, for cancellation tests).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from dagster_pipes import open_dagster_pipes


def main() -> None:
    mode = sys.argv[1]
    with open_dagster_pipes() as pipes:
        pipes.log.info("hello from pipes")
        print("plain output line", flush=True)
        print(f"NF_SPEC_ENV={os.environ.get('NF_SPEC_ENV')} HOST_ONLY={os.environ.get('NF_HOST_ONLY')}",
              flush=True)
        if mode == "fail":
            print("OSError: [Errno 28] No space left on device: '/work/qsiprep_wf'", flush=True)
            sys.exit(1)
        if mode == "sleep":
            child = subprocess.Popen(["sleep", "60"])
            pidfile = Path(sys.argv[2])
            pidfile.with_suffix(".tmp").write_text(f"{os.getpid()} {child.pid}")
            pidfile.with_suffix(".tmp").rename(pidfile)
            time.sleep(60)
        pipes.report_asset_materialization(metadata={"volumes": 3})


if __name__ == "__main__":
    main()
