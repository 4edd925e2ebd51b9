"""fqcheck.fix(): lint, plan, write crash-safely (in place or into --output), re-lint."""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..checkpoint import BACKUP_DIR, Checkpoint, CheckpointError
from ..options import Options
from .durable import create_new, fsync_dir, write_all
from .errors import FixError
from .lock import Lock
from .recovery import pending, recover
from .transaction import Transaction
from .errors import FixRefused
from .plan import Plan, make_plan
from .shard import write_shard


@dataclass
class FixResult:
    path: str
    plan: Plan
    dry_run: bool = False
    output: str | None = None
    written: list[str] = field(default_factory=list)   # files rewritten or created
    retired: list[str] = field(default_factory=list)
    backup: str | None = None                          # backup folder (relative to the checkpoint)
    recovered: str | None = None                       # what an interrupted earlier fix needed
    remaining: object = None                           # the Report of the re-lint (None for dry runs)

    @property
    def applied(self) -> list:
        """Findings whose edits were applied (planned, for a dry run)."""
        return self.plan.applied

    @property
    def changed(self) -> bool:
        return bool(self.written or self.retired)

    @property
    def ok(self) -> bool:
        return self.remaining is None or self.remaining.ok


def run(path: str | os.PathLike, options: Options, *, unsafe_fixes: bool = False, dry_run: bool = False,
        output: str | os.PathLike | None = None, backup: bool = True) -> FixResult:
    """Repair a checkpoint: lint with `options` (the same select, ignore, rules, deep, arch and
    severities as `fqcheck lint`), plan, write, re-lint. Raises FixRefused (unfixable errors;
    nothing changed), FixError (I/O failure, rolled back; or locked), CheckpointError."""
    from ..api import lint

    ckpt = Checkpoint.open(path)
    root = ckpt.root
    enabled = False if options.quiet else None

    def relint():
        return lint(path, options)

    if (dry_run or output is not None) and pending(root):  # neither writes into the folder
        raise FixError(f"{root}: an interrupted fix is pending; run `fqcheck fix` to finish it or "
                       "`fqcheck restore` to roll it back first")
    if dry_run:
        report = relint()
        return FixResult(str(path), _plan(Checkpoint.open(path), report.findings, unsafe_fixes, options), dry_run=True)
    if output is not None:
        _check_output(Path(output), root)
        report = relint()
        ckpt = Checkpoint.open(path)
        plan = _plan(ckpt, report.findings, unsafe_fixes, options)
        out = Path(output)
        res = FixResult(str(path), plan, output=str(out))
        res.written = _write_copy(ckpt, plan, out, enabled)
        res.retired = list(plan.retire)
        res.remaining = lint(out, options)
        return res

    with Lock(root):
        try:
            recovered = recover(root)
        except OSError as e:
            raise FixError(f"{root}: cannot finish an interrupted fix: {e.strerror or e}") from e
        report = relint()
        ckpt = Checkpoint.open(path)
        plan = _plan(ckpt, report.findings, unsafe_fixes, options)
        res = FixResult(str(path), plan, recovered=recovered)
        if not plan.empty:
            tx = Transaction(root, keep=backup)
            try:
                bar = _bar(ckpt, plan.shards, enabled)
                try:
                    _write_new_files(ckpt, plan, tx.new_file, tx.finish_file, tx.write_file, bar)
                finally:
                    if bar:
                        bar.stop()
                for name in plan.retire:
                    tx.retire(name)
            except BaseException as e:
                tx.abort()
                if isinstance(e, OSError):
                    raise FixError(f"{e.filename or root}: {e.strerror or e}; rolled back, nothing changed") from e
                raise
            tx.commit()
            res.written = plan.files_written()
            res.retired = list(plan.retire)
            res.backup = tx.stash if backup else None
        res.remaining = relint()
        return res


def _plan(ckpt, findings, unsafe: bool, options: Options) -> Plan:
    try:  # quant_format and device decide leaked weight amax (fix/evidence.py)
        return make_plan(ckpt, findings, unsafe, quant_format=options.quant_format, device=options.device)
    except UnicodeEncodeError as e:  # a JSON file holding a lone surrogate ("\\ud800"): not UTF-8 text
        raise FixRefused(f"refusing to fix: a JSON file to rewrite holds a lone surrogate "
                         f"({e.object[e.start:e.end]!a}), which cannot be written back as UTF-8; edit it by "
                         "hand (nothing was changed)") from e


def _bar(ckpt, names: Iterable[str], enabled: bool | None):
    from ..progress import bar
    names = list(names)
    return bar("fix", sum(os.stat(ckpt.path(n)).st_size for n in names), enabled, files=len(names))


def _write_new_files(ckpt, plan: Plan, new_file, finish_file, write_file, bar=None) -> None:
    for name in sorted(plan.shards):
        sp = plan.shards[name]
        fd, _ = new_file(name)
        try:
            os.fchmod(fd, stat.S_IMODE(os.stat(ckpt.path(name)).st_mode))  # keep the original's mode
            size = write_shard(ckpt.header(name), fd, sp.drop, sp.replace, sp.metadata)
        except BaseException:
            os.close(fd)
            raise
        finish_file(fd)
        if bar:
            bar.advance(size)
            bar.file_done()
    for name in sorted(plan.json_files):
        write_file(name, plan.json_files[name])


def _check_output(out: Path, root: Path) -> None:
    from ..checkpoint import inside
    if inside(os.path.realpath(out), [os.path.realpath(root)]):
        raise FixError(f"{out}: --output must be outside the checkpoint folder {root}")


def _write_copy(ckpt, plan: Plan, out: Path, enabled: bool | None) -> list[str]:
    """--output: build the repaired copy in a sibling temp folder, then rename it into place."""
    try:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise FixError(f"{out}: --output must be a new or empty directory")
        existing = next(p for p in out.parents if p.exists())
        if not existing.is_dir():
            raise FixError(f"{out}: cannot create the output folder: {existing} is not a directory")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.fqcheck-tmp.", dir=out.parent))
    except OSError as e:
        raise FixError(f"{out}: cannot create the output folder: {e.strerror or e}") from e
    try:
        def new_file(name):
            return create_new(tmp / name), name

        def finish_file(fd):
            os.fsync(fd)
            os.close(fd)

        def write_file(name, data):
            fd, _ = new_file(name)
            try:
                write_all(fd, data)
            finally:
                finish_file(fd)

        from .shard import copy_range
        skip = set(plan.files_written()) | set(plan.retire)
        copied = [n for n in ckpt.names if n not in skip]
        bar = _bar(ckpt, [*plan.shards, *copied], enabled)
        try:
            _write_new_files(ckpt, plan, new_file, finish_file, write_file, bar)
            for name in copied:
                # follows links into the folder or its cache blobs (the copy holds real files);
                # a link that leads outside is not in ckpt.names: it is kept as a link below
                with open(ckpt.path(name), "rb") as src:
                    fd, _ = new_file(name)
                    size = os.fstat(src.fileno()).st_size
                    try:
                        copy_range(src.fileno(), fd, 0, 0, size)
                    finally:
                        finish_file(fd)
                if bar:
                    bar.advance(size)
                    bar.file_done()
            for name, target in sorted(ckpt.outside.items()):
                os.symlink(target, tmp / name)  # never read: what lies outside stays outside
        finally:
            if bar:
                bar.stop()
        fsync_dir(tmp)
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise FixError(f"{e.filename or out}: {e.strerror or e}; no output written") from e
        raise
    return plan.files_written()


def restore(path: str | os.PathLike) -> tuple[str, list[str]]:
    from .restore import restore as _restore
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    return _restore(p)


__all__ = ["run", "restore", "FixResult", "FixRefused", "FixError", "BACKUP_DIR"]
