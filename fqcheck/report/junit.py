"""JUnit XML for CI test reports (GitLab, Jenkins, Azure): one testsuite, one testcase per rule
that ran. A rule with findings at or above --fail-on is a failed testcase carrying them; a clean
rule passes; findings below the bar are listed in the passing testcase's system-out."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from itertools import groupby

from ..api import Report
from ..engine import SEVERITY_RANK
from .paths import locator


def _line(locate, f) -> str:
    where = f":{f.tensor}" if f.tensor else ""
    return f"{locate(f)}{where}: {f.code} {f.severity}: {f.message}"


def render(report: Report, *, fail_on: str = "error", **_) -> str:
    by_code = {c: list(g) for c, g in groupby(sorted(report.findings, key=lambda f: f.code), key=lambda f: f.code)}
    codes = sorted(set(report.rules_run) | set(by_code))
    locate = locator(report)
    floor = None if fail_on == "never" else SEVERITY_RANK[fail_on]
    suites = ET.Element("testsuites", name="fqcheck")
    suite = ET.SubElement(suites, "testsuite", name=f"fqcheck {report.path}")
    failures = 0
    for code in codes:
        rule = report.rules.get(code)
        case = ET.SubElement(suite, "testcase", classname=f"fqcheck.{code[:3].lower()}",
                             name=f"{code} {rule.name}" if rule else code, file=report.path)
        found = by_code.get(code, [])
        fails = [floor is not None and SEVERITY_RANK[f.severity] >= floor for f in found]
        failing = [f for f, bad in zip(found, fails) if bad]
        if failing:
            failures += 1
            fail = ET.SubElement(case, "failure", type=code,
                                 message=f"{len(failing)} finding(s): {failing[0].message}")
            fail.text = "\n".join(_line(locate, f) for f in failing)
        rest = [f for f, bad in zip(found, fails) if not bad]
        if rest:
            ET.SubElement(case, "system-out").text = "\n".join(_line(locate, f) for f in rest)
    for el in (suites, suite):
        el.set("tests", str(len(codes)))
        el.set("failures", str(failures))
        el.set("errors", "0")
    suite.set("skipped", "0")
    ET.indent(suites)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"
