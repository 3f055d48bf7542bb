"""Alerts as OCSF Detection Findings (class 2004), so a SIEM ingests them without a custom parser.

One function, :func:`finding`, renders an :class:`~smtpguard.core.alert.Alert` (and the DNSBL answers
about its source, when given) as an object of the Open Cybersecurity Schema Framework, version
:data:`OCSF_VERSION`. ``alerts list|show --format ocsf`` print it and the optional topic
``kafka.topics.ocsf`` carries it; the mapping of every alert field is in docs/ARCHITECTURE.md
("Alerts as OCSF findings") and the tests validate the output against the OCSF schema of this
version.

OCSF 1.1.0 is the version Amazon Security Lake takes from custom sources; Splunk, Elastic and
Microsoft Sentinel read any 1.x object.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

import msgspec

from .alert import Alert, address_of
from .record import SEVERITIES
from .records import ms_of

OCSF_VERSION = "1.1.0"
CLASS_UID = 2004  # Detection Finding
CATEGORY_UID = 2  # Findings
#: smtpguard severity -> OCSF severity_id (1 Informational ... 5 Critical)
SEVERITY_ID = {s: i + 1 for i, s in enumerate(SEVERITIES)}
#: alert status -> OCSF finding status_id (1 New, 2 In Progress, 3 Suppressed, 4 Resolved, 99 Other)
STATUS_ID = {"new": 1, "acknowledged": 2, "confirmed": 4, "dismissed": 4}
_STATUS_NAME = {1: "New", 2: "In Progress", 3: "Suppressed", 4: "Resolved", 99: "Other"}
_ACTIVITY_NAME = {1: "Create", 2: "Update"}


def _version() -> str:
    try:
        return metadata.version("smtpguard")
    except metadata.PackageNotFoundError:
        return "0"


_PRODUCT = {"name": "smtpguard", "vendor_name": "smtpguard", "version": _version()}


def finding(alert: Alert, dnsbl: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The OCSF Detection Finding of ``alert``. ``dnsbl``: the stored DNSBL answers about its source
    (``zone``, ``status``, ``codes``, ``meaning``, ``txt``, ``checked_at``, ``delist_url``), which
    become enrichments."""
    start, end = ms_of(alert.window_start), ms_of(alert.window_end)
    created = ms_of(alert.created_at) or end
    status_id = 3 if alert.suppressed else STATUS_ID.get(alert.status, 99)
    activity_id = 1 if alert.status == "new" else 2
    ev = alert.evidence or {}
    subject = alert.src_ip or f"tenant {alert.tenant}"
    out: dict[str, Any] = {
        "class_uid": CLASS_UID,
        "class_name": "Detection Finding",
        "category_uid": CATEGORY_UID,
        "category_name": "Findings",
        "activity_id": activity_id,
        "activity_name": _ACTIVITY_NAME[activity_id],
        "type_uid": CLASS_UID * 100 + activity_id,
        "severity_id": SEVERITY_ID[alert.severity],
        "severity": alert.severity.capitalize(),
        "status_id": status_id,
        "status": _STATUS_NAME[status_id],
        "time": created,
        "start_time": start,
        "end_time": end,
        "confidence_score": round(alert.score * 100),
        "message": f"{alert.detector} ({alert.severity}) from {subject}: " + "; ".join(alert.reasons),
        "metadata": {
            "version": OCSF_VERSION,
            "product": _PRODUCT,
            "uid": alert.alert_id,
            "correlation_uid": alert.incident_id or None,
            "tenant_uid": alert.tenant or None,
            "labels": ["smtp-abuse", alert.detector],
        },
        "finding_info": {
            "uid": alert.alert_id,
            "title": f"{alert.detector} from {subject}",
            "desc": "; ".join(alert.reasons),
            "types": [alert.detector],
            "analytic": {"uid": alert.detector, "name": alert.detector, "type_id": 1, "type": "Rule"},
            "first_seen_time": start,
            "last_seen_time": end,
            "created_time": created,
        },
        "resources": [_resource(alert)],
        "unmapped": {
            "src_key": alert.src_ip,
            "exempted": alert.exempted,
            "suppressed": alert.suppressed,
            "alert_status": alert.status,
            "evidence": ev,
        },
    }
    address = address_of(alert.src_ip, ev)
    if address:
        src = {"ip": address}
        if ev.get("instance_id"):
            src["instance_uid"] = ev["instance_id"]
        evidence: dict[str, Any] = {"src_endpoint": src}
        if ev.get("top_dst"):
            evidence["dst_endpoint"] = {"ip": ev["top_dst"]}
        out["evidences"] = [evidence]
        out["observables"] = [{"name": "evidences[0].src_endpoint.ip", "type_id": 2, "type": "IP Address",
                               "value": address}]
    if alert.next_step:
        out["remediation"] = {"desc": alert.next_step}
    if dnsbl:
        out["enrichments"] = [
            {"name": f"dnsbl:{d['zone']}", "value": d["status"], "provider": d["zone"], "type": "dnsbl",
             "data": {k: d.get(k) for k in ("codes", "meaning", "txt", "checked_at", "delist_url")}}
            for d in dnsbl
        ]
    return _drop_empty(out)


def _resource(alert: Alert) -> dict[str, Any]:
    if alert.src_ip is None:
        return {"uid": f"tenant:{alert.tenant}", "type": "tenant", "name": alert.tenant}
    kind = "ipv6_prefix" if "/" in alert.src_ip else "ip_address"
    res = {"uid": alert.src_ip, "type": kind, "name": alert.src_ip}
    if alert.tenant:
        res["group"] = {"uid": alert.tenant, "name": alert.tenant, "type": "tenant"}
    return res


def _drop_empty(v: Any) -> Any:
    """OCSF leaves absent what is unknown: no nulls."""
    if isinstance(v, dict):
        return {k: _drop_empty(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [_drop_empty(x) for x in v]
    return v


_encoder = msgspec.json.Encoder()


def to_json(alert: Alert, dnsbl: list[dict[str, Any]] | None = None) -> bytes:
    """The finding as one JSON object (a message on the OCSF topic, a line of ``--format ocsf``)."""
    return _encoder.encode(finding(alert, dnsbl))
