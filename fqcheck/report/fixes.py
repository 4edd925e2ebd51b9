"""What `fqcheck fix` prints: the plan per file, what it fixed and skipped (grouped like lint), what
remains, and where the backup is. Every name from the checkpoint goes through `printable`."""
from __future__ import annotations

from .escape import printable
from .text import finding_line, group_line, grouped


def describe(res, path, *, quiet: bool = False, verbose: bool = False, filtered: bool = False) -> str:
    """The text for one FixResult. quiet: one summary line and what remains."""
    plan, out = res.plan, []
    if res.recovered:
        out.append(f"note: {printable(res.recovered)}")
    if not quiet:
        if plan.empty:
            out.append("Nothing to fix.")
        else:
            head = ("Plan (dry run; nothing changed)" if res.dry_run else
                    f"Wrote a repaired copy to {printable(res.output)}" if res.output else "Changed")
            out += [f"{head}:", *(f"  {printable(line)}" for line in plan.describe())]
            out += _section("Fixed" if not res.dry_run else "Would fix", plan.applied, res, verbose)
        out += _section("Skipped (needs --unsafe-fixes or has no automatic edit)", plan.skipped, res, verbose)
    if res.dry_run:
        return "".join(line + "\n" for line in out)
    rem = res.remaining
    done = (f"fixed {len(plan.applied)} finding(s): {len(res.written)} file(s) written, "
            f"{len(res.retired)} retired") if not plan.empty else "nothing to fix"
    if rem.findings:
        out.append(f"{done}; {len(rem.findings)} finding(s) remain:")
        rules = rem.rules
        for run in grouped(rem.findings, verbose):
            f = run[0]
            where = f"{printable(f.file)}: " if f.file else ""
            out.append("  " + where + (finding_line(f) if len(run) == 1 else group_line(run, rules.get(f.code))))
    else:
        out.append(f"{done}; no findings remain" + (" among the selected rules" if filtered else "") + ".")
    if res.backup and not quiet:
        out.append(f"Originals kept in {printable(path)}/{printable(res.backup)}; undo with "
                   f"`fqcheck restore {printable(path)}`.")
    return "".join(line + "\n" for line in out)


def _section(title: str, findings, res, verbose: bool) -> list[str]:
    """Each finding with --verbose; else one line per rule: how many, what, in which files."""
    if not findings:
        return []
    lines = [f"{title}:"]
    if verbose:
        for f in sorted(findings, key=lambda f: (f.file or "", f.code, f.tensor or "")):
            lines.append("  " + (f"{printable(f.file)}: " if f.file else "") + finding_line(f))
        return lines
    rules = _rules(res)
    by_code: dict[str, list] = {}
    for f in findings:
        by_code.setdefault(f.code, []).append(f)
    for code in sorted(by_code):
        run = by_code[code]
        rule = rules.get(code)
        what = rule.summary if rule is not None else run[0].message
        files = sorted({f.file for f in run if f.file})
        where = f" ({', '.join(files[:3])}{', ...' if len(files) > 3 else ''})" if files else ""
        lines.append(f"  {code} {len(run)}× {printable(what)}{printable(where)}")
    return lines


def _rules(res) -> dict:
    """The rules that ran in the re-lint (user rules, severity overrides), and the built-in catalog
    for the rest (a fix may apply a deep rule that a plain re-lint does not run)."""
    from ..catalog import load_catalog
    return {**load_catalog(), **(res.remaining.rules if res.remaining is not None else {})}
