"""What a tool run needs, independent of where it runs.

A ToolSpec is built by each tool module (heudiconv, qsiprep, qsirecon,
qsiparc) from the configuration and one partition. A runtime (local, docker,
apptainer, builtin) executes it. Keeping "what" apart from "where" is what
lets an operator switch a stage between Docker, Apptainer and local in
config without touching the tool's logic.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Mount:
    """A bind mount; ``container`` is the path the tool sees (same as host for local runs)."""

    host: Path
    container: str
    read_only: bool = True


@dataclass(frozen=True)
class ToolSpec:
    """One tool invocation: the exact argument list plus everything around it.

    ``argv`` uses container paths (the ``container`` side of ``mounts``). For
    local and builtin runs the mounts are identity mappings, so argv paths are
    host paths. ``outputs`` are glob patterns relative to ``output_dir`` that
    must each match at least one file after a successful run (golden lists,
    as QSIPrep's own tests keep them).
    """

    tool: str
    argv: tuple[str, ...]
    output_dir: Path
    image: str | None = None
    mounts: tuple[Mount, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    workdir: Path | None = None
    outputs: tuple[str, ...] = ()
    nprocs: int | None = None
    mem_mb: int | None = None
    # True for the embedded stand-ins (python -m neuroflow_dagster.tools.builtin.*):
    # recorded so that no output is ever presented as the real tool's.
    stand_in: bool = False
    # Set when ``output_dir`` is the run's staging folder: after a successful run its outputs are
    # published into ``publish_to``, each ``publish_units`` folder replaced as a whole (tools/publish.py).
    publish_to: Path | None = None
    publish_units: tuple[str, ...] = ()
    # An exclusive lock per piece of work (stage x partition), held by the tool's processes for as
    # long as any of them lives, so two processes of the same work never run at once; ``lock_owner``
    # (e.g. the Dagster run id) is written into it for whoever has to wait.
    lock: Path | None = None
    lock_owner: str = ""
    # The tool's scratch folder on the host (the NiPreps ``-w``): deleted once the run's outputs are
    # published, kept after a failure for debugging until the retention prunes it (retention.py).
    scratch_dir: Path | None = None

    @property
    def final_dir(self) -> Path:
        """Where the outputs live once the run succeeded (the published tree, else ``output_dir``)."""
        return self.publish_to if self.publish_to is not None else self.output_dir

    def missing_outputs(self) -> list[str]:
        """Golden patterns that matched nothing: a run that 'succeeded' without them failed."""
        missing = []
        for pattern in self.outputs:
            if not glob.glob(str(self.output_dir / pattern), recursive=True):
                missing.append(pattern)
        return missing

    def command_line(self) -> str:
        """Display form of argv, for metadata and logs only (never executed through a shell)."""
        import shlex

        return shlex.join(self.argv)
