"""JUnit XML for CI test reports (GitLab, Jenkins, Azure): one testsuite, one testcase per rule
that ran. A rule with findings at or above --fail-on is a failed testcase carrying them; a clean
rule passes; findings below the bar are listed in the passing testcase's system-out."""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from itertools import groupby

from ..api import Report
from ..engine import SEVERITY_RANK
from .escape import printable
from .paths import locator


# Characters XML 1.0 cannot carry at all; a hostile header's tensor names may hold them.
_NOT_XML = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml(text: str) -> str:
    return _NOT_XML.sub(lambda m: f"\\x{ord(m.group()):02x}", printable(text))


def _line(locate, f) -> str:
    where = f":{f.tensor}" if f.tensor else ""
    return _xml(f"{locate(f)}{where}: {f.code} {f.severity}: {f.message}")


def render(report: Report, *, fail_on: str = "error", **_) -> str:
    by_code = {c: list(g) for c, g in groupby(sorted(report.findings, key=lambda f: f.code), key=lambda f: f.code)}
    codes = sorted(set(report.rules_run) | set(by_code))
    locate = locator(report)
    floor = None if fail_on == "never" else SEVERITY_RANK[fail_on]
    suites = ET.Element("testsuites", name="fqcheck")
    suite = ET.SubElement(suites, "testsuite", name=_xml(f"fqcheck {report.path}"))
    failures = 0
    for code in codes:
        rule = report.rules.get(code)
        case = ET.SubElement(suite, "testcase", classname=f"fqcheck.{code[:3].lower()}",
                             name=f"{code} {rule.name}" if rule else code, file=_xml(report.path))
        found = by_code.get(code, [])
        fails = [floor is not None and SEVERITY_RANK[f.severity] >= floor for f in found]
        failing = [f for f, bad in zip(found, fails) if bad]
        if failing:
            failures += 1
            fail = ET.SubElement(case, "failure", type=code,
                                 message=_xml(f"{len(failing)} finding(s): {failing[0].message}"))
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
