"""Failure alerts: a Slack webhook post and/or an e-mail when a stage run fails (never on success).

A `run_failure_sensor` (running by default) reads what the run already
records: the run's tags (stage, partition) and the STEP_FAILURE event's
user metadata written by `execute_spec` (failure class, log tail, log path).
A run the monitoring daemon killed (max runtime exceeded, worker lost) has no
useful step failure; the alert then carries the run's own failure message.
A failed run that Dagster is about to retry (run_retries, tag
`dagster/will_retry`) is not alerted: only the last attempt is.

Secrets never sit in neuroflow.yaml: the config names the environment
variables that hold the webhook URL and the SMTP credentials. Delivery has
short timeouts so a dead mail server cannot stall the daemon; when every
configured channel fails the tick fails with the reasons (visible on the
sensor's page in the UI), when one of two fails it is logged and the other one
is enough.
"""

from __future__ import annotations

import json
import os
import smtplib
import ssl
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any, Protocol

import dagster as dg

from neuroflow_dagster import stages
from neuroflow_dagster.config import EmailConfig, NeuroflowConfig
from neuroflow_dagster.naming.partitions import SESSION_DIM, SUBJECT_DIM, is_session_key, split_session_key
from neuroflow_dagster.naming.tags import (
    FAILURE_CLASS_KEY,
    LOG_PATH_KEY,
    LOG_TAIL_KEY,
    PARTITION_TAG,
    RETRY_NUMBER_TAG,
    STAGE_TAG,
    WILL_RETRY_TAG,
    partition_dimension_tag,
)

SENSOR_NAME = "neuroflow_failure_alerts"
TIMEOUT_S = 15.0
MAX_TAIL_CHARS = 3000


class AlertDeliveryError(Exception):
    """Every configured channel failed; the message says which and why."""


class Alert(Protocol):
    """What `deliver` sends: a title (mail subject) and a text; ``ref`` names it in delivery errors
    (FailureAlert, DiscoveryAlert, the disk guard's DiskAlert)."""

    @property
    def ref(self) -> str: ...

    def title(self) -> str: ...

    def text(self) -> str: ...


@dataclass(frozen=True)
class FailureAlert:
    stage: str
    subject: str | None
    session: str | None
    failure_class: str
    reason: str
    run_id: str
    job_name: str
    log_path: str | None = None
    log_tail: str | None = None
    attempt: int = 1

    @property
    def where(self) -> str:
        if self.subject and self.session:
            return f"sub-{self.subject} ses-{self.session}"
        if self.subject:
            return f"sub-{self.subject} (all sessions)"
        return "no partition"

    @property
    def ref(self) -> str:
        return f"run {self.run_id}"

    def title(self) -> str:
        return f"[neuroflow] {self.stage} failed: {self.where} ({self.failure_class})"

    def text(self) -> str:
        lines = [
            self.title(),
            f"stage: {self.stage}",
            f"subject: {self.subject or '-'}",
            f"session: {self.session or '-'}",
            f"failure class: {self.failure_class}",
            f"reason: {self.reason}",
            f"run: {self.run_id} (job {self.job_name}"
            + (f", attempt {self.attempt}: automatic run retries exhausted)" if self.attempt > 1 else ")"),
            f"log file: {self.log_path or '-'}",
        ]
        if self.log_tail:
            lines += ["log tail:", "```", self.log_tail, "```"]
        return "\n".join(lines)


@dataclass(frozen=True)
class DiscoveryAlert:
    """New discovery problems an operator must act on (identity and mapping conflicts, unreadable or
    missing folders, registry problems): one message per tick that found new ones."""

    items: tuple[str, ...]
    report_at: str = ""
    max_items: int = 20

    @property
    def ref(self) -> str:
        return "discovery problems"

    def title(self) -> str:
        return f"[neuroflow] discovery: {len(self.items)} new problem(s) need an operator"

    def text(self) -> str:
        lines = [self.title(), f"discovery tick: {self.report_at or '-'}", ""]
        lines += [f"- {item}" for item in self.items[: self.max_items]]
        if len(self.items) > self.max_items:
            lines.append(f"- ... and {len(self.items) - self.max_items} more: `neuroflow status`")
        lines += ["", "Details and what to do: `neuroflow status`, docs/operations.md (What happens when...)."]
        return "\n".join(lines)


QC_STAGE = "image QC"  # how alerts name the image QC gate (not a registered stage)


def _stage_of_run(run: dg.DagsterRun, step_keys: list[str]) -> str | None:
    """The stage whose step failed; else the stage tag; else the stage asset it ran (UI launches carry no tag).

    The stage assets are single-op assets whose op is named after the asset, so a failed step's key
    names the asset. It comes first because a recon run also parcellates (one run per session): a
    failed parcellation step is a qsiparc failure although the run is tagged qsirecon.
    """
    for step in step_keys:
        if step == stages.QC_ASSET:  # the gate's step, in a recon run: not a reconstruction failure
            return QC_STAGE
        by_step = stages.by_asset(step)
        if by_step is not None:
            return by_step.name
    tagged = run.tags.get(STAGE_TAG)
    if tagged:
        by_tag = stages.by_tag(tagged)
        return by_tag.name if by_tag else None
    for key in run.asset_selection or ():
        stage = stages.by_asset(key.to_user_string())
        if stage is not None:
            return stage.name
    return None


def _partition_of_run(run: dg.DagsterRun) -> tuple[str | None, str | None]:
    tags = run.tags
    subject = tags.get(partition_dimension_tag(SUBJECT_DIM))
    session = tags.get(partition_dimension_tag(SESSION_DIM))
    if subject:
        return subject, session
    partition = tags.get(PARTITION_TAG)
    if partition and is_session_key(partition):
        try:
            return split_session_key(partition)
        except ValueError:  # a key from another partitioning: show it as is
            return partition, None
    return partition, None


def _plain(value: Any) -> Any:
    return getattr(value, "value", value)


def _strip_fence(text: str) -> str:
    text = text.strip()
    if text.startswith("```"):
        text = text[3:]
    if text.endswith("```"):
        text = text[:-3]
    return text.strip("\n")


def alert_from_failure(
    run: dg.DagsterRun, step_failures: list[dg.DagsterEvent], run_failure_message: str | None,
    qc_reason: str | None = None,
) -> FailureAlert | None:
    """What the alert says, from the failed run and its step failures; None if not a stage run.

    A run stopped by the image QC gate (its `image_qc_session` step failed on the blocking check,
    whose failed evaluation's description is ``qc_reason``) is a QC alert: class `qc`, the failing
    measures and how to let the session through. The gate's step failing otherwise (an error, no
    failed evaluation) is an ordinary failure of stage "image QC", with the step's error.
    """
    subject, session = _partition_of_run(run)
    if qc_reason is not None and any(e.step_key == stages.QC_ASSET for e in step_failures):
        scan = f"{session}|{subject}" if session else str(subject)
        return FailureAlert(
            stage=QC_STAGE, subject=subject, session=session, failure_class="qc",
            reason=(f"{qc_reason or 'image QC failed'}; reconstruction and parcellation are held. Look at "
                    f"{stages.QC_ASSET} {scan} in the UI; `neuroflow qc approve '{scan}' --reason ...` lets "
                    "it through")[:2000],
            run_id=run.run_id, job_name=run.job_name,
        )
    stage = _stage_of_run(run, [e.step_key for e in step_failures if e.step_key])
    if stage is None:
        return None
    failure_class = "run"
    reason = (run_failure_message or "the run failed").strip()
    log_path = log_tail = None
    if step_failures:
        data = step_failures[-1].step_failure_data
        user = data.user_failure_data if data else None
        meta = {k: _plain(v) for k, v in (user.metadata if user else {}).items()}
        failure_class = str(meta.get(FAILURE_CLASS_KEY) or "error")
        if user and user.description:
            reason = user.description
        elif data and data.error:
            reason = data.error.message.strip()
        log_path = str(meta[LOG_PATH_KEY]) if meta.get(LOG_PATH_KEY) else None
        tail = meta.get(LOG_TAIL_KEY)
        log_tail = _strip_fence(str(tail))[-MAX_TAIL_CHARS:] if tail else None
    if run_failure_message and "maximum runtime" in run_failure_message:
        # Killed by run monitoring (dagster/max_runtime or run_monitoring.max_runtime_seconds): the step
        # saw only the interruption, so the run's own message is the reason.
        failure_class = "max_runtime"
        first = (reason.splitlines() or [""])[0]
        step_reason = "" if not first or first == run_failure_message.strip() else f" (step: {first})"
        reason = run_failure_message.strip() + step_reason
    return FailureAlert(
        stage=stage,
        subject=subject,
        session=session,
        failure_class=failure_class,
        reason=reason[:2000],
        run_id=run.run_id,
        job_name=run.job_name,
        log_path=log_path,
        log_tail=log_tail,
        attempt=int(run.tags.get(RETRY_NUMBER_TAG, "0")) + 1,
    )


def will_be_retried(run: dg.DagsterRun) -> bool:
    """Dagster tags a failed run it is about to retry (run_retries); only the last attempt is alerted."""
    return run.tags.get(WILL_RETRY_TAG, "").lower() == "true"


def _env(environ: Mapping[str, str], name: str, what: str) -> str:
    value = environ.get(name, "")
    if not value:
        raise AlertDeliveryError(f"{what}: environment variable {name} is not set")
    return value


def post_slack(url: str, text: str, timeout: float = TIMEOUT_S) -> None:
    """POST {"text": ...} to an incoming-webhook URL; raise naming the status or the network error."""
    request = urllib.request.Request(
        url, data=json.dumps({"text": text}).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if not 200 <= response.status < 300:
                raise AlertDeliveryError(f"Slack webhook answered HTTP {response.status}")
    except urllib.error.HTTPError as exc:
        raise AlertDeliveryError(f"Slack webhook answered HTTP {exc.code}: {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise AlertDeliveryError(f"Slack webhook not reachable: {exc}") from exc


def send_email(
    cfg: EmailConfig, subject: str, body: str, environ: Mapping[str, str], timeout: float = TIMEOUT_S
) -> None:
    """One plain-text message to every recipient; STARTTLS and login when configured."""
    message = EmailMessage()
    message["Subject"] = subject
    message["From"] = cfg.sender
    message["To"] = ", ".join(cfg.recipients)
    message.set_content(body)
    user = _env(environ, cfg.username_env, "e-mail username") if cfg.username_env else None
    password = _env(environ, cfg.password_env, "e-mail password") if cfg.password_env else None
    try:
        with smtplib.SMTP(cfg.smtp_host, cfg.smtp_port, timeout=timeout) as smtp:
            smtp.ehlo()
            if cfg.starttls:
                smtp.starttls(context=ssl.create_default_context())
                smtp.ehlo()
            if user is not None or password is not None:
                smtp.login(user or "", password or "")
            smtp.send_message(message)
    except (smtplib.SMTPException, OSError) as exc:
        raise AlertDeliveryError(f"e-mail via {cfg.smtp_host}:{cfg.smtp_port} failed: {exc}") from exc


def deliver(config: NeuroflowConfig, alert: Alert, environ: Mapping[str, str] | None = None) -> list[str]:
    """Send on every configured channel; returns the channels that worked; raises if none did."""
    environ = os.environ if environ is None else environ
    sent: list[str] = []
    errors: list[str] = []
    if config.alerts.slack is not None:
        try:
            post_slack(_env(environ, config.alerts.slack.webhook_url_env, "Slack webhook URL"), alert.text())
            sent.append("slack")
        except AlertDeliveryError as exc:
            errors.append(str(exc))
    if config.alerts.email is not None:
        try:
            send_email(config.alerts.email, alert.title(), alert.text(), environ)
            sent.append("email")
        except AlertDeliveryError as exc:
            errors.append(str(exc))
    if errors and not sent:
        raise AlertDeliveryError(f"alert for {alert.ref} not delivered: " + "; ".join(errors))
    if errors:
        dg.get_dagster_logger().warning(f"alert for {alert.ref}: " + "; ".join(errors))
    return sent


def build_alert_sensor(config: NeuroflowConfig) -> dg.SensorDefinition | None:
    """The failure-alert sensor, or None when neither Slack nor e-mail is configured."""
    if config.alerts.slack is None and config.alerts.email is None:
        return None
    channels = [name for name, cfg in (("Slack", config.alerts.slack), ("e-mail", config.alerts.email)) if cfg]

    @dg.run_failure_sensor(
        name=SENSOR_NAME,
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=15,
        description=f"Sends a {' and '.join(channels)} alert when a stage run fails (not on success).",
    )
    def neuroflow_failure_alerts(context: dg.RunFailureSensorContext) -> None:
        if will_be_retried(context.dagster_run):
            context.log.info(f"run {context.dagster_run.run_id} failed and will be retried: no alert yet")
            return
        failures = list(context.get_step_failure_events())
        qc_reason = None
        if any(e.step_key == stages.QC_ASSET for e in failures):
            checks = context.instance.all_logs(
                context.dagster_run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION
            )
            qc_reason = next((str(e.dagster_event.event_specific_data.description or "") for e in checks
                              if e.dagster_event and e.dagster_event.step_key == stages.QC_ASSET
                              and not e.dagster_event.event_specific_data.passed), None)
        alert = alert_from_failure(context.dagster_run, failures, context.failure_event.message, qc_reason)
        if alert is None:
            context.log.info(f"run {context.dagster_run.run_id} is not a stage run: no alert")
            return
        sent = deliver(config, alert)
        context.log.info(f"alert for {alert.stage} {alert.where} sent via {', '.join(sent)}")

    return neuroflow_failure_alerts


DISCOVERY_ALERT_SENSOR = "neuroflow_discovery_alerts"


def new_discovery_alert(report: dict[str, Any], alerted: list[str]) -> tuple[DiscoveryAlert | None, list[str]]:
    """(alert for the items not alerted yet or None, the keys to remember).

    Keys of problems that are gone are forgotten, so a problem that comes back is alerted again.
    """
    from neuroflow_dagster.discovery.status_report import alert_items

    items = alert_items(report)
    new = [text for key, text in items.items() if key not in set(alerted)]
    alert = DiscoveryAlert(tuple(new), str(report.get("at") or "")) if new else None
    return alert, sorted(items)


def build_discovery_alert_sensor(config: NeuroflowConfig) -> dg.SensorDefinition | None:
    """Alerts on new discovery problems (read from the last tick's report), once each; None without channels.

    A sensor of its own, so a slow mail server never delays discovery. The keys already alerted are its
    cursor, advanced only after delivery: a failed delivery fails the tick (visible in the UI) and is
    tried again on the next one.
    """
    if config.alerts.slack is None and config.alerts.email is None:
        return None
    from neuroflow_dagster.discovery.status_report import read_status_report

    @dg.sensor(
        name=DISCOVERY_ALERT_SENSOR,
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=max(15, min(300, config.discovery.interval_seconds)),
        description="Sends an alert when discovery holds a folder for a reason an operator must act on "
        "(identity or mapping conflict, unreadable or missing folder, registry problem); once per problem.",
    )
    def neuroflow_discovery_alerts(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        try:
            alerted = json.loads(context.cursor) if context.cursor else []
        except ValueError:
            alerted = []
        alert, keys = new_discovery_alert(read_status_report(config), alerted if isinstance(alerted, list) else [])
        if alert is None:
            return dg.SensorResult(skip_reason="no new discovery problem", cursor=json.dumps(keys))
        sent = deliver(config, alert)
        context.log.info(f"alert for {len(alert.items)} new discovery problem(s) sent via {', '.join(sent)}")
        return dg.SensorResult(cursor=json.dumps(keys))

    return neuroflow_discovery_alerts
