"""A failed run leaves no half output where results live: stage in the run's folder, publish on success.

Unit level: `tools.publish` on real folders. Dagster level: a real in-process
materialization runs a real process through `execute_spec` that writes part
of its outputs and then crashes or hangs past its hard timeout; the published
tree must be exactly the previous good one, and the failure must say where
the partial outputs are.
"""

from __future__ import annotations

import sys
from pathlib import Path

import dagster as dg
import pytest

from neuroflow_dagster.config import NeuroflowConfig
from neuroflow_dagster.defs.execution import execute_spec, staging_for
from neuroflow_dagster.tools import layout
from neuroflow_dagster.tools.publish import STAGING, PublishError, publish_outputs, staging_dir
from neuroflow_dagster.tools.spec import ToolSpec

PY = sys.executable


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): p.read_text()
        for p in sorted(root.rglob("*"))
        if p.is_file() and STAGING not in p.parts and ".lock" not in p.name
    }


def test_units_replace_whole_folders_and_shared_files_merge(tmp_path: Path) -> None:
    target = tmp_path / "qsirecon-nf"
    write(target / "derivatives/qsirecon-DKI/sub-A/ses-01/dwi/old_model.nii.gz", "old")
    write(target / "derivatives/qsirecon-DKI/sub-A/ses-02/dwi/keep.nii.gz", "other session")
    write(target / "atlases/atlas-X/atlas-X_dseg.tsv", "old table")
    write(target / "dataset_description.json", "{}")
    staged = staging_dir(target, "01|A", "run-one-xyz")
    write(staged / "derivatives/qsirecon-DKI/sub-A/ses-01/dwi/new_model.nii.gz", "new")
    write(staged / "sub-A/ses-01/dwi/sub-A_ses-01_seg-X_dseg.nii.gz", "seg")
    write(staged / "atlases/atlas-X/atlas-X_dseg.tsv", "new table")
    done = publish_outputs(staged, target, ["sub-A/ses-01", "**/sub-A/ses-01"], partition="01|A")
    assert sorted(done.units) == ["derivatives/qsirecon-DKI/sub-A/ses-01", "sub-A/ses-01"]
    assert tree(target) == {
        "atlases/atlas-X/atlas-X_dseg.tsv": "new table",
        "dataset_description.json": "{}",
        # the unit was replaced as a whole: the old version's file is gone, the sibling session untouched
        "derivatives/qsirecon-DKI/sub-A/ses-01/dwi/new_model.nii.gz": "new",
        "derivatives/qsirecon-DKI/sub-A/ses-02/dwi/keep.nii.gz": "other session",
        "sub-A/ses-01/dwi/sub-A_ses-01_seg-X_dseg.nii.gz": "seg",
    }
    assert not staged.exists()
    assert not [p for p in target.rglob(".*old-*")], "the previous version must be deleted once replaced"


def test_leftovers_of_earlier_failed_attempts_go_with_the_next_success(tmp_path: Path) -> None:
    target = tmp_path / "qsiprep"
    failed = staging_dir(target, "A", "run-failed")
    write(failed / "sub-A/partial.nii.gz", "half")
    other = staging_dir(target, "B", "run-other")
    ours = staging_dir(target, "A", "run-good")
    write(ours / "sub-A/done.nii.gz", "full")
    done = publish_outputs(ours, target, ["sub-A"], partition="A")
    assert failed.name in done.removed_leftovers and not failed.exists()
    assert other.exists()  # another partition's folder is not ours to delete


def test_publishing_nothing_is_an_error_and_changes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "qsiparc"
    write(target / "sub-A/ses-01/x.tsv", "good")
    with pytest.raises(PublishError, match="nothing to publish"):
        publish_outputs(tmp_path / "missing", target, ["sub-A/ses-01"], partition="01|A")
    assert tree(target) == {"sub-A/ses-01/x.tsv": "good"}


CRASH = "import pathlib, sys; o = pathlib.Path(sys.argv[1]); (o / 'sub-A/ses-01').mkdir(parents=True); " \
        "(o / 'sub-A/ses-01/half.tsv').write_text('partial'); sys.exit(int(sys.argv[2]))"
HANG = "import pathlib, sys, time; o = pathlib.Path(sys.argv[1]); (o / 'sub-A/ses-01').mkdir(parents=True); " \
       "(o / 'sub-A/ses-01/half.tsv').write_text('partial'); time.sleep(600)"


@pytest.mark.parametrize("how", ["crash", "timeout", "success"])
def test_a_failed_run_leaves_the_published_outputs_as_they_were(
    tmp_path: Path, make_config: object, how: str
) -> None:
    config: NeuroflowConfig = make_config(  # type: ignore[operator]
        pipelines={"qsiparc": {"runtime": "local", "timeout_minutes": 0.05, "retry": {"max_retries": 0}}}
    )
    target = layout.qsiparc_dir(config)
    write(target / "sub-A/ses-01/good.tsv", "previous good")
    code = {"crash": "1", "success": "0"}.get(how, "0")
    script = HANG if how == "timeout" else CRASH

    @dg.asset(partitions_def=dg.StaticPartitionsDefinition(["01|A"]))
    def parc(context) -> None:  # unannotated: Dagster checks the annotation, which postponed evaluation hides
        staging = staging_for(context, target)
        spec = ToolSpec(tool="qsiparc", argv=(PY, "-c", script, str(staging), code), output_dir=staging,
                        outputs=("sub-A/ses-01/*.tsv",), **layout.publish_plan(staging, target, ["sub-A/ses-01"]))
        execute_spec(context, config, "qsiparc", spec)

    result = dg.materialize([parc], partition_key="01|A", raise_on_error=False)
    if how == "success":
        assert result.success
        assert tree(target) == {"sub-A/ses-01/half.tsv": "partial"}
        return
    assert not result.success
    assert tree(target) == {"sub-A/ses-01/good.tsv": "previous good"}
    failure = result.all_events[-1] if result.all_events[-1].is_failure else next(
        e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
    message = str(failure.event_specific_data.error.message if failure.event_specific_data else failure.message)
    staged = sorted((target / STAGING).glob("01_A.*"))
    assert len(staged) == 1 and (staged[0] / "sub-A/ses-01/half.tsv").read_text() == "partial"
    assert f"partial outputs kept in {staged[0]}" in message and "unchanged" in message
