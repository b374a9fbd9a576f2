"""One configuration model: ``neuroflow.yaml`` plus ``NEUROFLOW_<SECTION>__<KEY>`` overrides.

Plain Python (pydantic, no Dagster import) so every layer, the CLI and the
tests share the same validated object. Unknown keys are errors, and every
error names the key and the file it came from, because an operator editing
YAML on a server must be told exactly which line to fix.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from neuroflow_dagster.errors import ConfigError
from neuroflow_dagster.naming import qsirecon as qsirecon_names
from neuroflow_dagster.naming.bids import is_label
from neuroflow_dagster.naming.subjects import code_key, label_fold


class RuntimeEntry(NamedTuple):
    implementation: str  # "module:Class", imported only when a stage uses it
    container: bool  # runs an image: the tool sees container paths and needs one


# Where a stage's tool can run (`pipelines.<stage>.runtime`). A new runtime is one entry here plus
# its module under runtimes/; a worker without the docker package still runs the other runtimes.
RUNTIMES: dict[str, RuntimeEntry] = {
    "builtin": RuntimeEntry("neuroflow_dagster.runtimes.local:BuiltinRuntime", container=False),
    "local": RuntimeEntry("neuroflow_dagster.runtimes.local:LocalRuntime", container=False),
    "docker": RuntimeEntry("neuroflow_dagster.runtimes.docker:DockerRuntime", container=True),
    "apptainer": RuntimeEntry("neuroflow_dagster.runtimes.apptainer:ApptainerRuntime", container=True),
    # One Slurm job per run; what runs inside the job is pipelines.<stage>.slurm.inside (tool_runtime).
    "slurm": RuntimeEntry("neuroflow_dagster.runtimes.slurm:SlurmRuntime", container=False),
}
RuntimeName = Literal[tuple(RUNTIMES)]  # type: ignore[valid-type]  # pydantic checks values against RUNTIMES

ENV_PREFIX = "NEUROFLOW_"
CONFIG_ENV = "NEUROFLOW_CONFIG"
CONFIG_FILENAME = "neuroflow.yaml"


# A version in an image reference: "pennlinc/qsiprep:1.1.1", "qsiprep_26.1.1.sif", "...:1.1.1@sha256:..".
_VERSION = re.compile(r"(?<![\d.])v?(\d+)\.(\d+)(?:\.(\d+))?(?!\d)")


def image_version(image: str | None) -> tuple[int, ...] | None:
    """The tool version an image reference names (``pennlinc/qsiprep:1.1.1`` -> (1, 1, 1)), if any.

    The registry path is ignored (a host such as ``registry:5000`` is not a version),
    so only the last path component - the name, tag or .sif file name - is read.
    """
    if not image:
        return None
    last = image.split("@", 1)[0].rsplit("/", 1)[-1]
    match = _VERSION.search(last.split(":", 1)[1] if ":" in last else last)
    if not match:
        return None
    return tuple(int(part) for part in match.groups() if part is not None)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PathsConfig(_Section):
    dicom_incoming: Path
    bids_root: Path
    derivatives: Path
    work_dir: Path
    log_dir: Path
    # Holds the ScanID registry and the last good mapping: must persist, unlike work_dir.
    state_dir: Path | None = None
    # The site's TemplateFlow copy (QSIPrep and QSIRecon both read their templates through TemplateFlow):
    # bound read-only into their containers and exported as TEMPLATEFLOW_HOME (docs/deployment.md).
    templateflow_home: Path | None = None

    @property
    def state(self) -> Path:
        return self.state_dir if self.state_dir is not None else self.work_dir / "state"


class GoogleSheetConfig(_Section):
    spreadsheet_key: str
    worksheet_name: str = "Sheet1"
    service_account_file: Path
    scan_id_column: str = "ScanID"
    subject_code_column: str = "SubjectCode"


class MappingConfig(_Section):
    csv_file: Path | None = None
    scan_id_column: str = "ScanID"
    subject_code_column: str = "SubjectCode"
    google_sheet: GoogleSheetConfig | None = None
    # SubjectCode -> participant label, for codes that would otherwise clean to a label another person
    # owns (CLM_L_01 and CLML01 both clean to CLML01). One label per person: validated below.
    label_overrides: dict[str, str] = Field(default_factory=dict)

    @field_validator("label_overrides", mode="before")
    @classmethod
    def _overrides_are_one_label_per_person(cls, value: Any) -> Any:

        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError("must be a mapping of SubjectCode: participant label")
        problems: list[str] = []
        by_code: dict[str, str] = {}
        by_label: dict[str, str] = {}
        for code, label in value.items():
            if not isinstance(code, str) or not isinstance(label, str):
                bad = code if not isinstance(code, str) else label
                problems.append(
                    f"{code!r}: {bad!r} is not text; quote SubjectCodes and labels (YAML reads an unquoted "
                    "0075 as the octal number 61 and 75 as a number)"
                )
                continue
            if not code.strip():
                problems.append(f"{code!r}: an empty SubjectCode")
                continue
            if not is_label(label):
                problems.append(f"{code!r}: label {label!r} is not a valid BIDS label (ASCII letters and digits only)")
                continue
            key = code_key(code)
            if key in by_code:
                problems.append(f"{code!r} and {by_code[key]!r} are the same SubjectCode; keep one of them")
                continue
            by_code[key] = code
            fold = label_fold(label)
            if fold in by_label:
                problems.append(
                    f"{code!r}: label {label!r} is also given to {by_label[fold]!r} (labels that differ only in "
                    "case count as one); two codes never share a participant label"
                )
                continue
            by_label[fold] = code
        if problems:
            raise ValueError("; ".join(problems))
        return value


class DiscoveryConfig(_Section):
    layout: Literal["flat", "subject_session"] = "flat"
    # Only for layout subject_session: root/SUBJECT/SESSION (true) or root/SESSION/SUBJECT.
    participant_first: bool = True
    stability_wait_minutes: float = Field(180, ge=0)
    interval_seconds: int = Field(60, ge=1)
    # Files rewritten in place (same name, new content) do not touch their folder's times: registered
    # folders are re-fingerprinted (size, mtime, inode of every file) round-robin, at most this many
    # file stats per tick (0 = off), half of them for folders registered in the last `recent_days`.
    rewrite_check_files_per_tick: int = Field(2000, ge=0)
    rewrite_check_recent_days: float = Field(14, ge=0)


class ScanRule(_Section):
    name: str
    series_description_pattern: str
    min_files: int = Field(1, ge=0)
    max_files: int | None = Field(None, ge=1)

    @field_validator("series_description_pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from exc
        return value


class ProtocolConfig(_Section):
    bids_conversion_min_files: int = Field(10, ge=0)
    required_scans: list[ScanRule] = Field(default_factory=list)
    optional_scans: list[ScanRule] = Field(default_factory=list)


class RetryConfig(_Section):
    """docs/domain-rules.md#failures: 3 retries, 300 s x 2^(n-1) capped at 3600 s, +-20 % jitter."""

    max_retries: int = Field(3, ge=0)
    delay_seconds: float = Field(300, ge=0)
    max_delay_seconds: float = Field(3600, ge=0)
    jitter: float = Field(0.2, ge=0, le=1)


# sbatch options that SlurmConfig sets from its own keys or that the runtime owns (output file,
# parsable job id): refused in extra_args so that a job is never submitted with two answers.
_SBATCH_OWNED = {
    "--output": "set by neuroflow (the job's output file in log_dir)",
    "-o": "set by neuroflow (the job's output file in log_dir)",
    "--error": "set by neuroflow (stderr goes to the same file as stdout)",
    "-e": "set by neuroflow (stderr goes to the same file as stdout)",
    "--parsable": "set by neuroflow",
    "--wrap": "neuroflow submits its own batch script",
    "--array": "one job per tool run",
    "-a": "one job per tool run",
    "--time": "use slurm.time_limit_minutes (default: timeout_minutes)",
    "-t": "use slurm.time_limit_minutes (default: timeout_minutes)",
    "--mem": "use slurm.mem_mb",
    "--cpus-per-task": "use slurm.cpus",
    "-c": "use slurm.cpus",
    "--partition": "use slurm.partition",
    "-p": "use slurm.partition",
    "--account": "use slurm.account",
    "-A": "use slurm.account",
    "--qos": "use slurm.qos",
    "-q": "use slurm.qos",
    "--job-name": "set by neuroflow (nf-<stage>-<partition>)",
    "-J": "set by neuroflow (nf-<stage>-<partition>)",
}


class SlurmConfig(_Section):
    """``pipelines.<stage>.slurm``: how a stage's tool runs become Slurm jobs (``runtime: slurm``)."""

    # What runs inside the job: the stage's usual way (None: builtin for the QSI stages' stand-ins,
    # local for conversion), the locally installed tool, or the stage's image with apptainer exec.
    inside: Literal["builtin", "local", "apptainer"] | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    # --time in minutes; None: the stage's timeout_minutes (rounded up).
    time_limit_minutes: int | None = Field(None, ge=1)
    # --mem (MB) and --cpus-per-task; None: the stage's memory_mb / cpus, else the cluster's defaults.
    mem_mb: int | None = Field(None, gt=0)
    cpus: int | None = Field(None, ge=1)
    # More sbatch options, one per item ("--constraint=avx2", "--gres=gpu:1"); never a shell string.
    extra_args: list[str] = Field(default_factory=list)
    # inside: apptainer only: the executable on the nodes, and binds beyond the tool's own mounts.
    apptainer: str = "apptainer"
    binds: list[str] = Field(default_factory=list)
    # How often the run worker asks Slurm about its job and copies new output lines to the run's log.
    poll_seconds: float = Field(10, gt=0, le=600)

    @field_validator("extra_args")
    @classmethod
    def _extra_args(cls, value: list[str]) -> list[str]:
        for arg in value:
            if not arg.startswith("-") or any(c in arg for c in "\n\r\0"):
                raise ValueError(
                    f"{arg!r}: each item must be one sbatch option starting with '-' (e.g. --constraint=avx2)"
                )
            name = arg.split("=", 1)[0]
            if name in _SBATCH_OWNED:
                raise ValueError(f"{arg!r}: {name} is {_SBATCH_OWNED[name]}")
        return value

    @field_validator("binds")
    @classmethod
    def _binds(cls, value: list[str]) -> list[str]:
        for bind in value:
            parts = bind.split(":")
            if not 1 <= len(parts) <= 3 or not all(parts[:2]) or "," in bind or not bind.startswith("/"):
                raise ValueError(f"{bind!r}: expected /host/path[:/container/path[:ro|rw]] without commas")
            if len(parts) == 3 and parts[2] not in ("ro", "rw"):
                raise ValueError(f"{bind!r}: the mode must be ro or rw")
        return value


class StageConfig(_Section):
    """Settings every stage has: where it runs, how much at once, how long, how often."""

    runtime: RuntimeName = "local"
    image: str | None = None
    max_concurrent: int = Field(1, ge=1)
    soft_timeout_minutes: float | None = Field(None, gt=0)
    timeout_minutes: float = Field(60, gt=0)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    # Container resources (docker/apptainer); None = no limit.
    cpus: float | None = Field(None, gt=0)
    memory_mb: int | None = Field(None, gt=0)
    # Run containers as this "uid:gid"; None = the current user's.
    user: str | None = None
    requires_bids_suffixes: list[str] = Field(default_factory=list)
    # runtime: slurm only (see docs/runtimes.md).
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)

    @property
    def tool_runtime(self) -> str:
        """The runtime the tool's command line is built for: for slurm, what runs inside the job.

        ``slurm.inside`` when set, else the stage's default runtime (the stand-ins for the QSI
        stages, the local HeudiConv for conversion), so ``runtime: slurm`` alone moves exactly
        what the stage ran before onto the cluster.
        """
        if self.runtime != "slurm":
            return self.runtime
        if self.slurm.inside is not None:
            return self.slurm.inside
        default = type(self).model_fields["runtime"].default
        return default if default != "slurm" else "local"

    @property
    def timeout_s(self) -> float:
        """The hard limit of one attempt: the run is stopped after it."""
        return float(self.timeout_minutes) * 60

    @property
    def soft_timeout_s(self) -> float | None:
        """After this a warning is logged; the run goes on."""
        return float(self.soft_timeout_minutes) * 60 if self.soft_timeout_minutes else None

    @property
    def containerized(self) -> bool:
        """The tool runs in a container image, so it sees container paths, not host paths."""
        return RUNTIMES[self.tool_runtime].container


class BidsConversionConfig(StageConfig):
    runtime: RuntimeName = "local"
    image: str | None = "nipy/heudiconv:1.3.4"
    heuristic: str = "neuroflow_default"
    converter: Literal["dcm2niix"] = "dcm2niix"
    bids_validator: bool = True
    overwrite: bool = True
    max_concurrent: int = Field(4, ge=1)
    timeout_minutes: float = Field(60, gt=0)
    retry: RetryConfig = Field(default_factory=lambda: RetryConfig(max_retries=2))


OUTPUT_RESOLUTION_AUTO = "auto"
# QSIPrep from this version on names --session-label and --hmc-method and takes no --fs-license-file;
# 26.0.0's parser is still 1.1.1's (both read in their wheels).
QSIPREP_NEW_DIALECT = (26, 1)


class QsiprepPreflightConfig(_Section):
    """``pipelines.qsiprep.preflight``: QSIPrep's own input handling on each run's inputs before it starts
    (docs/tools.md, "The QSIPrep preflight")."""

    enabled: bool = True
    # The pinned tools venvs (one per QSIPrep version); None: work_dir/preflight/venvs.
    venvs_dir: Path | None = None
    # The interpreter `neuroflow preflight install` builds them with; None: the one running neuroflow.
    python: str | None = None
    timeout_seconds: float = Field(600, gt=0)


class QsiprepConfig(StageConfig):
    runtime: RuntimeName = "builtin"
    image: str | None = "pennlinc/qsiprep:1.1.1"
    fs_license: Path | None = None
    # --output-resolution in mm, or "auto": the finest voxel edge of the DWI going into the run
    # (tools/qsiprep.py, native_resolution; docs/configuration.md says why auto is the default).
    output_resolution: float | Literal["auto"] = OUTPUT_RESOLUTION_AUTO
    nprocs: int = Field(8, ge=1)
    omp_nthreads: int | None = Field(None, ge=1)
    mem_mb: int = Field(16000, ge=1)
    anatomical_template: list[str] = Field(default_factory=lambda: ["MNI152NLin2009cAsym"])
    # The anatomical reference QSIPrep needs (--anat-modality; the choices of QSIPrep's parser, 1.1.1 to
    # 26.1.1); "none" preprocesses the DWI alone.
    anat_modality: Literal["T1w", "T2w", "none"] = "T1w"
    # --subject-anatomical-reference: one unbiased template from every session's anatomy (QSIPrep's own
    # default, first-lex, aligns everything to the first session's image), or one space per session.
    subject_anatomical_reference: Literal["first-lex", "unbiased", "sessionwise"] = "unbiased"
    denoise_method: str | None = None
    unringing_method: str | None = None
    hmc_model: str | None = None
    bids_filters: dict[str, Any] = Field(default_factory=dict)
    skip_bids_validation: bool = True
    extra_args: list[str] = Field(default_factory=list)
    max_concurrent: int = Field(1, ge=1)
    soft_timeout_minutes: float | None = Field(12 * 60, gt=0)
    timeout_minutes: float = Field(24 * 60, gt=0)
    requires_bids_suffixes: list[str] = Field(default_factory=lambda: ["dwi"])
    # eager: as soon as a subject's wave of sessions is converted; cron: only at `cron`.
    trigger: Literal["eager", "cron"] = "eager"
    cron: str = "0 2 */3 * *"
    # How long a publish waits for the runs still reading the subject's previous output (and such a
    # reader for a publish) before failing as transient, which is retried (docs/domain-rules.md#state).
    publish_wait_minutes: float = Field(60, gt=0)
    preflight: QsiprepPreflightConfig = Field(default_factory=QsiprepPreflightConfig)

    @field_validator("output_resolution", mode="before")
    @classmethod
    def _resolution(cls, value: Any) -> Any:
        """A voxel size in mm, or auto; said in one line (a union's errors would name both branches)."""
        if isinstance(value, str) and value.strip().lower() == OUTPUT_RESOLUTION_AUTO:
            return OUTPUT_RESOLUTION_AUTO
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if isinstance(value, bool) or not math.isfinite(number) or number <= 0:
            raise ValueError(
                f"{value!r}: give a voxel size in mm (e.g. 1.6) or {OUTPUT_RESOLUTION_AUTO} (the DWI's own voxel size)"
            )
        return number

    @field_validator("anatomical_template")
    @classmethod
    def _template(cls, value: list[str]) -> list[str]:
        """QSIPrep takes one --anatomical-template and knows one (its parser's choices, 1.1.1 to 26.1.1;
        infants get MNIInfant through --infant, not through this option)."""
        if value != ["MNI152NLin2009cAsym"]:
            raise ValueError(f"{value}: QSIPrep accepts exactly one template, MNI152NLin2009cAsym")
        return value

    @property
    def new_dialect(self) -> bool:
        """The image names QSIPrep 26.1 or later; an image without a readable version is taken as 1.x."""
        version = image_version(self.image)
        return version is not None and version[:2] >= QSIPREP_NEW_DIALECT

    @property
    def sessionwise(self) -> bool:
        """One anatomical space per session: every session needs its own anatomical image."""
        return self.subject_anatomical_reference == "sessionwise"


class ReconSpecsConfig(_Section):
    """``pipelines.qsirecon.recon_specs``: the recon spec for each shell scheme of a session's gradient table.

    A built-in spec of QSIRecon 1.1.1 (naming/qsirecon.py) or a spec file; null: sessions of that scheme are
    not reconstructed (not applicable, with the reason). docs/tools.md ("QSIRecon") explains the defaults.
    """

    single_shell: str | None = qsirecon_names.DEFAULT_SPECS[qsirecon_names.SINGLE_SHELL]
    multi_shell: str | None = qsirecon_names.DEFAULT_SPECS[qsirecon_names.MULTI_SHELL]
    cartesian: str | None = qsirecon_names.DEFAULT_SPECS[qsirecon_names.CARTESIAN]

    @field_validator("single_shell", "multi_shell", "cartesian")
    @classmethod
    def _known_for_scheme(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or qsirecon_names.is_spec_file(value):
            return value
        spec = qsirecon_names.BUILTIN_SPECS.get(value)
        if spec is None:
            raise ValueError(
                f"{value!r} is neither a built-in recon spec of QSIRecon 1.1.1 "
                f"({', '.join(sorted(qsirecon_names.BUILTIN_SPECS, key=str.lower))}) nor a spec file "
                "(a path, or a .yaml/.yml/.json name)"
            )
        scheme = str(info.field_name)
        if scheme not in spec.schemes:
            works = ", ".join(qsirecon_names.SCHEME_TEXT[s] for s in qsirecon_names.SCHEMES if s in spec.schemes)
            raise ValueError(
                f"QSIRecon's documentation lists {value} for {works} data only, not "
                f"{qsirecon_names.SCHEME_TEXT[scheme]}; choose a spec that works with it, or null (not reconstructed)"
            )
        return value

    def for_scheme(self, scheme: str) -> str | None:
        return getattr(self, scheme)

    def named(self) -> dict[str, str]:
        """scheme -> spec for the schemes that have one."""
        return {s: v for s in qsirecon_names.SCHEMES if (v := self.for_scheme(s)) is not None}


# A name for QSIRecon's --datasets NAME=PATH: no '=' (QSIRecon splits on it), nothing a path or argv could misread.
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def atlas_dataset_problem(path: Path) -> str | None:
    """Why QSIRecon would not search ``path`` for atlases (it skips a dataset that is not DatasetType atlas)."""
    if not path.is_dir():
        return f"{path} does not exist or is not a folder"
    desc = path / "dataset_description.json"
    try:
        kind = json.loads(desc.read_text(encoding="utf-8")).get("DatasetType")
    except (OSError, ValueError, AttributeError) as exc:
        return f"cannot read {desc} ({exc}); QSIRecon reads atlases only from a dataset with one"
    if kind != "atlas":
        return f"{desc} says DatasetType {kind!r}; QSIRecon skips every dataset that is not DatasetType 'atlas'"
    return None


def dataset_atlases(path: Path) -> set[str]:
    """Atlases QSIRecon would find in a BIDS-Atlas dataset: ``atlas-<Name>_..._space-<ATLAS_SPACE>_..._dseg.nii[.gz]``
    (the space of QSIPrep's template) with an ``atlas-<Name>..._dseg.tsv`` beside it."""
    found: set[str] = set()
    space = f"_space-{qsirecon_names.ATLAS_SPACE}_"
    for image in path.rglob("atlas-*_dseg.nii*"):
        if space not in image.name or not image.name.endswith((".nii", ".nii.gz")):
            continue
        name = image.name.split("_", 1)[0][len("atlas-") :]
        if any(image.parent.glob(f"atlas-{name}*_dseg.tsv")):
            found.add(name)
    return found


class QsireconConfig(StageConfig):
    runtime: RuntimeName = "builtin"
    image: str | None = "pennlinc/qsirecon:1.1.1"
    # Name of the derivatives folder suffix: derivatives/qsirecon-<workflow_name>.
    workflow_name: str = "neuroflow"
    fs_license: Path | None = None
    nprocs: int = Field(4, ge=1)
    mem_mb: int = Field(8000, ge=1)
    # A site's own atlases: BIDS-Atlas datasets given to QSIRecon as --datasets NAME=PATH (read-only).
    datasets: dict[str, Path] = Field(default_factory=dict)
    atlases: list[str] = Field(default_factory=lambda: list(qsirecon_names.DEFAULT_ATLASES))
    # Built-in stand-in only: a labelled atlas image in the subject's space, and its label table.
    atlas_file: Path | None = None
    atlas_labels: Path | None = None
    extra_args: list[str] = Field(default_factory=list)
    recon_specs: ReconSpecsConfig = Field(default_factory=ReconSpecsConfig)
    max_concurrent: int = Field(2, ge=1)
    soft_timeout_minutes: float | None = Field(8 * 60, gt=0)
    timeout_minutes: float = Field(12 * 60, gt=0)
    requires_bids_suffixes: list[str] = Field(default_factory=lambda: ["dwi"])

    @model_validator(mode="before")
    @classmethod
    def _one_spec_for_all(cls, data: Any) -> Any:
        """The old ``recon_spec`` (one spec for every session) is read as the spec of each scheme it works
        with; the other schemes keep their defaults, so an old ``recon_spec: dipy_dki`` no longer sends
        single-shell sessions to DKI. A spec file applies to every scheme."""
        if not isinstance(data, dict) or "recon_spec" not in data:
            return data
        data = dict(data)
        old = data.pop("recon_spec")
        if "recon_specs" in data:
            raise ValueError("recon_spec and recon_specs are both set: recon_specs (one spec per shell scheme) "
                             "replaces recon_spec; keep recon_specs only")
        if not isinstance(old, str) or not old:
            raise ValueError(f"recon_spec: {old!r} is not a recon spec name or file (use recon_specs)")
        if qsirecon_names.is_spec_file(old):
            data["recon_specs"] = dict.fromkeys(qsirecon_names.SCHEMES, old)
        elif old in qsirecon_names.BUILTIN_SPECS:
            data["recon_specs"] = dict.fromkeys(qsirecon_names.BUILTIN_SPECS[old].schemes, old)
        else:
            raise ValueError(f"recon_spec: {old!r} is neither a built-in recon spec of QSIRecon 1.1.1 nor a spec "
                             "file (use recon_specs: {single_shell: ..., multi_shell: ..., cartesian: ...})")
        return data

    @field_validator("datasets")
    @classmethod
    def _atlas_datasets(cls, value: dict[str, Path]) -> dict[str, Path]:
        problems = []
        for name, path in value.items():
            if not _DATASET_NAME.match(str(name)):
                problems.append(f"{name!r}: a dataset name is letters, digits, '_' and '-' (QSIRecon reads NAME=PATH)")
            elif name in qsirecon_names.RESERVED_DATASETS:
                problems.append(f"{name!r}: {qsirecon_names.RESERVED_DATASETS[name]}; choose another name")
            elif "=" in str(path):
                problems.append(f"{name}: {path} has '=' in it, which QSIRecon's NAME=PATH cannot carry")
            elif (problem := atlas_dataset_problem(path)) is not None:
                problems.append(f"{name}: {problem}")
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("atlases")
    @classmethod
    def _atlases_exist(cls, value: list[str], info: ValidationInfo) -> list[str]:
        """An atlas QSIRecon cannot find is only a log line and an empty result after hours of compute: refuse
        it now. Known = shipped in QSIRecon 1.1.1's image, or found in exactly one configured dataset."""
        bad = [a for a in value if not is_label(a)]
        if bad:
            raise ValueError(f"{', '.join(map(repr, bad))}: an atlas name is letters and digits only")
        twice = sorted({a for a in value if value.count(a) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} listed twice (QSIRecon then fails: 'Multiple datasets contain "
                             "the same atlas')")
        datasets = info.data.get("datasets")
        if datasets is None:
            return value  # the datasets key is wrong: reported there
        holders: dict[str, list[str]] = {}
        for name, path in datasets.items():
            for atlas in dataset_atlases(path) & set(value):
                holders.setdefault(atlas, []).append(name)
        problems = []
        for atlas in value:
            where = holders.get(atlas, [])
            if atlas in qsirecon_names.SHIPPED_ATLASES and where:
                problems.append(f"{atlas} is shipped with QSIRecon and also in dataset {where[0]}: QSIRecon refuses "
                                "an atlas found in two datasets; rename the site's copy")
            elif len(where) > 1:
                problems.append(f"{atlas} is in datasets {', '.join(where)}: QSIRecon refuses an atlas found twice")
            elif atlas not in qsirecon_names.SHIPPED_ATLASES and not where:
                searched = ", ".join(f"{n} ({p})" for n, p in datasets.items()) or "none configured"
                problems.append(
                    f"{atlas} is neither an atlas QSIRecon 1.1.1 ships ({', '.join(qsirecon_names.SHIPPED_ATLASES)}) "
                    f"nor in a dataset of pipelines.qsirecon.datasets ({searched}) as "
                    f"atlas-{atlas}/atlas-{atlas}_space-{qsirecon_names.ATLAS_SPACE}_..._dseg.nii.gz with its "
                    f"atlas-{atlas}_dseg.tsv"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @model_validator(mode="after")
    def _specs_can_run(self) -> QsireconConfig:
        """What a chosen spec needs that this configuration does not give: QSIRecon would refuse it at the
        first session (or the stand-in cannot stand in for it)."""
        problems = []
        for scheme, value in self.recon_specs.named().items():
            key = f"pipelines.qsirecon.recon_specs.{scheme}"
            if self.tool_runtime == "builtin" and value not in qsirecon_names.STAND_IN_SPECS:
                problems.append(
                    f"{key}: {value} cannot run on the built-in stand-in, which implements "
                    f"{', '.join(sorted(qsirecon_names.STAND_IN_SPECS))}; run the real QSIRecon (runtime: docker, "
                    "apptainer, or slurm with slurm.inside: apptainer) for other specs"
                )
                continue
            spec = qsirecon_names.BUILTIN_SPECS.get(value)
            if spec is None:
                continue
            if spec.connectivity and not self.atlases:
                problems.append(f"{key}: {value} builds connectivity matrices, which QSIRecon refuses without atlases "
                                "(pipelines.qsirecon.atlases is empty)")
            if spec.needs_fs_subjects_dir and "--fs-subjects-dir" not in self.extra_args:
                problems.append(f"{key}: {value} needs FreeSurfer outputs (--fs-subjects-dir DIR in "
                                "pipelines.qsirecon.extra_args); the *_noACT specs need none")
        if self.tool_runtime != "builtin":
            for field in ("atlas_file", "atlas_labels"):
                if getattr(self, field) is not None:
                    problems.append(
                        f"pipelines.qsirecon.{field}: the built-in stand-in's atlas (in subject space); QSIRecon "
                        "takes pipelines.qsirecon.atlases (shipped, or from pipelines.qsirecon.datasets) instead"
                    )
        if problems:
            raise ValueError("; ".join(problems))
        return self


class QsiparcConfig(StageConfig):
    runtime: RuntimeName = "builtin"
    image: str | None = None
    mask: str = "gm"
    force: bool = False
    n_jobs: int = Field(1, ge=1)
    stat_tier: str | None = None
    extra_args: list[str] = Field(default_factory=list)
    max_concurrent: int = Field(4, ge=1)
    timeout_minutes: float = Field(4 * 60, gt=0)
    requires_bids_suffixes: list[str] = Field(default_factory=lambda: ["dwi"])


class PipelinesConfig(_Section):
    bids_conversion: BidsConversionConfig = Field(default_factory=BidsConversionConfig)
    qsiprep: QsiprepConfig = Field(default_factory=QsiprepConfig)
    qsirecon: QsireconConfig = Field(default_factory=QsireconConfig)
    qsiparc: QsiparcConfig = Field(default_factory=QsiparcConfig)


class SlackConfig(_Section):
    # Name of the environment variable that holds the webhook URL: secrets never sit in files.
    webhook_url_env: str = "NEUROFLOW_SLACK_WEBHOOK_URL"


class EmailConfig(_Section):
    smtp_host: str = "localhost"
    smtp_port: int = 25
    sender: str
    recipients: list[str]
    username_env: str | None = None
    password_env: str | None = None
    starttls: bool = False


class AlertsConfig(_Section):
    slack: SlackConfig | None = None
    email: EmailConfig | None = None


class DiskFloorsConfig(_Section):
    """Per-folder floors (GB) that replace ``disk.min_free_gb`` for one guarded folder."""

    work_dir: float | None = Field(None, ge=0)
    derivatives: float | None = Field(None, ge=0)
    bids_root: float | None = Field(None, ge=0)


class KeepFailedRunsConfig(_Section):
    """What failed runs leave behind (staging folders with their partial outputs, work folders) is kept
    for debugging, then pruned by the disk_guard sensor (docs/operations.md, "What a run leaves behind")."""

    # The newest this many per stage and partition are kept (None: no limit by count) ...
    count: int | None = Field(3, ge=0)
    # ... and none longer than this many days (None: no limit by age).
    days: float | None = Field(14, ge=0)


class DiskConfig(_Section):
    """The disk-space guard (docs/operations.md): below a floor, no new stage run starts."""

    # Free space every guarded folder (paths.work_dir, paths.derivatives, paths.bids_root) must keep;
    # 0 switches the guard off for that folder.
    min_free_gb: float = Field(10, ge=0)
    per_path: DiskFloorsConfig = Field(default_factory=DiskFloorsConfig)
    # How often the disk_guard sensor looks (the discovery sensor looks on each of its ticks too).
    interval_seconds: int = Field(60, ge=1)
    keep_failed_runs: KeepFailedRunsConfig = Field(default_factory=KeepFailedRunsConfig)


# The numeric columns of QSIPrep's image QC table (tools/qc_table.py documents them; a test keeps the
# two in step): DSI Studio's measures of the raw (raw_) and ACPC-resampled (t1_) series, the motion
# summary, t1_dice_distance, and the optional CNR / fieldmap / t1post / gradient-table columns.
_DSI = ("dimension_[xyz]|voxel_size_[xyz]|max_b|neighbor_corr|masked_neighbor_corr|dwi_contrast|"
        "num_bad_slices|num_directions|coherence_index")
QC_METRIC_NAME = re.compile(
    rf"^(?:(?:raw|t1)_(?:{_DSI})|mean_fd|max_fd|max_rotation|max_translation|max_rel_rotation|"
    r"max_rel_translation|t1_dice_distance|CNR\w*|fieldmap_hz_\w+|t1post_\w+|\w*gradient_table_ratio)$"
)


class QcMetricConfig(_Section):
    """Thresholds of one image QC measure: a value beyond ``fail_*`` blocks the session, beyond ``warn_*``
    only warns. A value equal to a threshold is not beyond it."""

    warn_below: float | None = None
    fail_below: float | None = None
    warn_above: float | None = None
    fail_above: float | None = None
    # The cohort rule's smallest spread (the measure's units): a very uniform cohort (a count that is
    # 0 in most sessions) must not hold a session for a difference nobody would see.
    min_spread: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> QcMetricConfig:
        if all(v is None for v in (self.warn_below, self.fail_below, self.warn_above, self.fail_above)):
            raise ValueError("give at least one of warn_below, fail_below, warn_above, fail_above")
        if self.warn_below is not None and self.fail_below is not None and self.fail_below > self.warn_below:
            raise ValueError(f"fail_below ({self.fail_below:g}) is above warn_below ({self.warn_below:g}): "
                             "a value must warn before it fails")
        if self.warn_above is not None and self.fail_above is not None and self.fail_above < self.warn_above:
            raise ValueError(f"fail_above ({self.fail_above:g}) is below warn_above ({self.warn_above:g}): "
                             "a value must warn before it fails")
        lows = [v for v in (self.warn_below, self.fail_below) if v is not None]
        highs = [v for v in (self.warn_above, self.fail_above) if v is not None]
        if lows and highs and max(lows) > min(highs):
            raise ValueError("the *_below thresholds are above the *_above thresholds: no value could pass")
        return self


def _default_qc_metrics() -> dict[str, QcMetricConfig]:
    # Measured on the demo: good sessions 0.90-0.99 and 0 bad slices, the poor one 0.17 and 39.
    return {
        "raw_masked_neighbor_corr": QcMetricConfig(warn_below=0.8, fail_below=0.5, min_spread=0.02),
        "raw_num_bad_slices": QcMetricConfig(warn_above=0, fail_above=5, min_spread=2),
    }


# BIDS sidecar keys (dcm2niix writes them from the DICOM headers): letters and digits, as BIDS spells them.
SIDECAR_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")


class QcCohortConfig(_Section):
    """The cohort rule of the image QC gate (docs/domain-rules.md#image-qc): each measure against the
    study's own sessions of the same acquisition group, in scaled MADs from their median."""

    # Below this many other sessions in the group (with the measure), the absolute thresholds apply.
    min_sessions: int = Field(20, ge=5)
    warn_mads: float = Field(3.0, gt=0)
    # null: the cohort only warns; only the absolute fail_* thresholds hold a session.
    fail_mads: float | None = Field(4.0, gt=0)
    # The acquisition group: keys of the DWI's BIDS sidecar (a missing key is "unknown").
    group_by: list[str] = Field(default_factory=lambda: ["SeriesDescription", "ManufacturersModelName"])

    @field_validator("group_by")
    @classmethod
    def _sidecar_keys(cls, value: list[str]) -> list[str]:
        bad = [k for k in value if not SIDECAR_KEY.match(k)]
        if bad:
            raise ValueError(f"{', '.join(map(repr, bad))}: not a BIDS sidecar key (letters and digits, e.g. "
                             "SeriesDescription, ProtocolName, ManufacturersModelName, MagneticFieldStrength)")
        if len(set(value)) != len(value):
            raise ValueError("a key is listed twice")
        return value

    @model_validator(mode="after")
    def _ordered(self) -> QcCohortConfig:
        if self.fail_mads is not None and self.fail_mads < self.warn_mads:
            raise ValueError(f"fail_mads ({self.fail_mads:g}) is below warn_mads ({self.warn_mads:g}): "
                             "a session must warn before it fails")
        return self


class QcConfig(_Section):
    """The image QC gate after preprocessing (docs/operations.md, "The QC gate")."""

    # false: every session passes (the QC asset still records the measures).
    enabled: bool = True
    # cohort: the study's own distribution per acquisition group once it has cohort.min_sessions
    # sessions (the fail_* thresholds stay floors); absolute: only the fixed thresholds.
    mode: Literal["cohort", "absolute"] = "cohort"
    cohort: QcCohortConfig = Field(default_factory=QcCohortConfig)
    metrics: dict[str, QcMetricConfig] = Field(default_factory=_default_qc_metrics)
    # A session QSIPrep preprocessed but without an image QC table, and a configured measure a table
    # does not have (or has as n/a): what that counts as.
    missing_table: Literal["pass", "warn", "fail"] = "fail"
    missing_metric: Literal["pass", "warn", "fail"] = "warn"

    @field_validator("metrics", mode="before")
    @classmethod
    def _known_measures(cls, value: Any) -> Any:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError("must be a mapping of measure name: {warn_below, fail_below, warn_above, fail_above}")
        unknown = [str(k) for k in value if not isinstance(k, str) or not QC_METRIC_NAME.match(k)]
        if unknown:
            raise ValueError(
                f"{', '.join(map(repr, unknown))}: not a measure of QSIPrep's image QC table (e.g. "
                "raw_masked_neighbor_corr, raw_num_bad_slices, t1_neighbor_corr, mean_fd, max_fd, t1_dice_distance)"
            )
        return value


class NeuroflowConfig(_Section):
    paths: PathsConfig
    mapping: MappingConfig = Field(default_factory=MappingConfig)
    discovery: DiscoveryConfig = Field(default_factory=DiscoveryConfig)
    protocol: ProtocolConfig = Field(default_factory=ProtocolConfig)
    pipelines: PipelinesConfig = Field(default_factory=PipelinesConfig)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)
    disk: DiskConfig = Field(default_factory=DiskConfig)
    qc: QcConfig = Field(default_factory=QcConfig)
    # The file this was loaded from (None when built in code); not a YAML key.
    source: Path | None = Field(default=None, exclude=True)

    def stage(self, name: str) -> StageConfig:
        try:
            return getattr(self.pipelines, name)
        except AttributeError:
            raise ConfigError(f"unknown pipeline stage {name!r}") from None


# --------------------------------------------------------------------------- loading


def find_config_file(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Search order: ``--config``, ``$NEUROFLOW_CONFIG``, ./, ~/.config/neuroflow/, /etc/neuroflow/."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (given with --config)")
        return path
    env = os.environ.get(CONFIG_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (from ${CONFIG_ENV})")
        return path
    candidates = [
        Path.cwd() / CONFIG_FILENAME,
        Path.home() / ".config" / "neuroflow" / CONFIG_FILENAME,
        Path("/etc/neuroflow") / CONFIG_FILENAME,
    ]
    for path in candidates:
        if path.is_file():
            return path
    searched = ", ".join(str(p) for p in candidates)
    raise ConfigError(
        f"no {CONFIG_FILENAME} found (searched --config, ${CONFIG_ENV}, {searched}); "
        "create one with `neuroflow init DIR`"
    )


def _parse_scalar(text: str) -> Any:
    """Env values are YAML scalars/flow collections, so `4`, `true`, `[a, b]` keep their types."""
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def apply_env_overrides(data: dict[str, Any], environ: Mapping[str, str]) -> list[str]:
    """Apply ``NEUROFLOW_<SECTION>__<KEY>[__<SUBKEY>]`` to ``data`` in place; return what was applied."""
    applied: list[str] = []
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name or name == CONFIG_ENV:
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if not all(parts):
            raise ConfigError(f"environment variable {name}: empty key segment")
        node: dict[str, Any] = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"environment variable {name}: {part!r} is not a section")
            node = child
        node[parts[-1]] = _parse_scalar(value)
        applied.append(".".join(parts))
    return applied


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Relative paths in the file are relative to the file's folder, not to the cwd."""

    def fix(container: dict[str, Any], key: str) -> None:
        value = container.get(key)
        if isinstance(value, str) and value and not os.path.isabs(os.path.expanduser(value)):
            container[key] = str((base / value).resolve())
        elif isinstance(value, str):
            container[key] = os.path.expanduser(value)

    paths = data.get("paths")
    if isinstance(paths, dict):
        for key in list(paths):
            fix(paths, key)
    mapping = data.get("mapping")
    if isinstance(mapping, dict):
        fix(mapping, "csv_file")
        sheet = mapping.get("google_sheet")
        if isinstance(sheet, dict):
            fix(sheet, "service_account_file")
    pipelines = data.get("pipelines")
    if isinstance(pipelines, dict):
        for stage in pipelines.values():
            if isinstance(stage, dict):
                for key in ("fs_license", "atlas_file", "atlas_labels"):
                    fix(stage, key)
                if isinstance(stage.get("preflight"), dict):
                    fix(stage["preflight"], "venvs_dir")
                datasets = stage.get("datasets")
                if isinstance(datasets, dict):
                    for name in list(datasets):
                        fix(datasets, name)
                specs = stage.get("recon_specs")
                for holder, key in [(stage, "recon_spec")] + [(specs, k) for k in (specs or {})]:
                    value = holder.get(key) if isinstance(holder, dict) else None
                    if isinstance(value, str) and qsirecon_names.is_spec_file(value):
                        fix(holder, key)
                heuristic = stage.get("heuristic")
                if isinstance(heuristic, str) and heuristic.endswith(".py"):
                    fix(stage, "heuristic")


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = err["msg"]
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def load_config(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> NeuroflowConfig:
    """Find, read, override from the environment and validate; raise ConfigError naming key and file."""
    environ = os.environ if environ is None else environ
    if path is None and environ is not os.environ and environ.get(CONFIG_ENV):
        path = environ[CONFIG_ENV]
    file = find_config_file(path)
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: the top level must be a mapping of sections")
    applied = apply_env_overrides(raw, environ)
    _resolve_paths(raw, file.parent.resolve())
    source = str(file) + (f" (with environment overrides: {', '.join(applied)})" if applied else "")
    try:
        config = NeuroflowConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
    config.source = file.resolve()
    return config


def check_paths(config: NeuroflowConfig) -> list[str]:
    """Start-up checks: inputs readable, outputs creatable and writable. Returns problems."""
    problems: list[str] = []
    incoming = config.paths.dicom_incoming
    if not incoming.is_dir():
        problems.append(f"paths.dicom_incoming: {incoming} does not exist or is not a folder")
    elif not os.access(incoming, os.R_OK | os.X_OK):
        problems.append(f"paths.dicom_incoming: {incoming} is not readable")
    writable = {
        "paths.bids_root": config.paths.bids_root,
        "paths.derivatives": config.paths.derivatives,
        "paths.work_dir": config.paths.work_dir,
        "paths.log_dir": config.paths.log_dir,
        "paths.state_dir": config.paths.state,
    }
    for key, path in writable.items():
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            problems.append(f"{key}: cannot create {path}: {exc.strerror}")
            continue
        if not os.access(path, os.W_OK | os.X_OK):
            problems.append(f"{key}: {path} is not writable")
    csv_file = config.mapping.csv_file
    if csv_file is not None and not csv_file.is_file():
        problems.append(f"mapping.csv_file: {csv_file} does not exist")
    sheet = config.mapping.google_sheet
    if sheet is not None and not sheet.service_account_file.is_file():
        problems.append(f"mapping.google_sheet.service_account_file: {sheet.service_account_file} does not exist")
    if csv_file is None and sheet is None:
        problems.append("mapping: set mapping.csv_file or mapping.google_sheet (no way to map ScanID -> subject)")
    heuristic = config.pipelines.bids_conversion.heuristic
    if heuristic.endswith(".py") and not Path(heuristic).is_file():
        problems.append(f"pipelines.bids_conversion.heuristic: {heuristic} does not exist")
    for scheme, spec in config.pipelines.qsirecon.recon_specs.named().items():
        if qsirecon_names.is_spec_file(spec) and not Path(spec).expanduser().is_file():
            problems.append(f"pipelines.qsirecon.recon_specs.{scheme}: {spec} does not exist")
    problems += templateflow_problems(config)
    for section, cfg in config.pipelines:
        # The FreeSurfer licence: every section that has the setting needs it inside a container (QSIPrep
        # only before 26.1, which has no --fs-license-file).
        takes_license = not (isinstance(cfg, QsiprepConfig) and cfg.new_dialect)
        if "fs_license" in type(cfg).model_fields and cfg.containerized and cfg.fs_license is None and takes_license:
            how = cfg.runtime if cfg.runtime != "slurm" else "slurm with slurm.inside: apptainer"
            problems.append(f"pipelines.{section}.fs_license: required when runtime is {how}")
        if cfg.runtime == "slurm" and shutil.which("sbatch") is None:
            problems.append(
                f"pipelines.{section}.runtime: slurm, but sbatch is not on PATH of this host "
                "(run the services on a login/submit node with Slurm's client commands)"
            )
    return problems


# The stages whose tools read templates through TemplateFlow (QSIPrep's and QSIRecon's GetTemplate).
TEMPLATEFLOW_STAGES = ("qsiprep", "qsirecon")


def templateflow_files(template: str, anat_modality: str) -> list[str]:
    """The TemplateFlow files QSIPrep and QSIRecon fetch at run time, relative to TEMPLATEFLOW_HOME.

    QSIPrep's ``GetTemplate`` (qsiprep/interfaces/anatomical.py, 1.1.1 to 26.1.1) takes the template's
    1 mm image of the anatomical modality (T1w for ``none``) and its brain mask; QSIRecon's
    (qsirecon/interfaces/anatomical.py, 1.1.1) the 1 mm T1w and the brain mask of MNI152NLin2009cAsym.
    """
    modality = "T1w" if anat_modality == "none" else anat_modality
    needs = {(template, modality), (template, "T1w"), ("MNI152NLin2009cAsym", "T1w")}
    files = set()
    for name, suffix in needs:
        files.add(f"tpl-{name}/tpl-{name}_res-01_{suffix}.nii.gz")
        files.add(f"tpl-{name}/tpl-{name}_res-01_desc-brain_mask.nii.gz")
    return sorted(files)


def templateflow_problems(config: NeuroflowConfig) -> list[str]:
    """``paths.templateflow_home``: a readable folder holding what the tools fetch; required where a
    container would otherwise look in the node's own home (apptainer, also inside a Slurm job)."""
    home = config.paths.templateflow_home
    qsiprep = config.pipelines.qsiprep
    if home is None:
        needing = [s for s in TEMPLATEFLOW_STAGES if config.stage(s).tool_runtime == "apptainer"]
        if not needing:
            return []
        return [
            f"paths.templateflow_home: required when {', '.join(f'pipelines.{s}' for s in needing)} runs in "
            "apptainer (the container gets the host's $HOME, so TemplateFlow would look for its templates in the "
            "node's ~/.cache/templateflow and download what is missing, which fails on nodes without internet); "
            "pre-fetch them as docs/deployment.md (\"TemplateFlow\") shows"
        ]
    if not home.is_dir():
        return [f"paths.templateflow_home: {home} does not exist or is not a folder"]
    if not os.access(home, os.R_OK | os.X_OK):
        return [f"paths.templateflow_home: {home} is not readable"]
    used = [s for s in TEMPLATEFLOW_STAGES if config.stage(s).tool_runtime != "builtin"]
    if not used:
        return []
    missing = [
        f for f in templateflow_files(qsiprep.anatomical_template[0], qsiprep.anat_modality) if not (home / f).is_file()
    ]
    if missing:
        return [
            f"paths.templateflow_home: {home} lacks {', '.join(missing)} (bound read-only, so the tools cannot "
            "download them); pre-fetch them as docs/deployment.md (\"TemplateFlow\") shows"
        ]
    return []
