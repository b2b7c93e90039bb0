"""``v3kit.diagnose``: the doctor's public API, kept at its documented import path (the checks live in
:mod:`v3kit.doctor`)."""

from .doctor import (
    DoctorContext,
    Finding,
    Thresholds,
    check,
    check_names,
    cmd_doctor,
    diagnose,
    evidence,
    evidence_order,
    format_report,
    load_run,
    register_cli,
    report_frame,
    switch_tokens,
)

__all__ = [
    "DoctorContext",
    "Finding",
    "Thresholds",
    "check",
    "check_names",
    "cmd_doctor",
    "diagnose",
    "evidence",
    "evidence_order",
    "format_report",
    "load_run",
    "register_cli",
    "report_frame",
    "switch_tokens",
]
