"""fqcheck.fix(): lint, plan, write crash-safely (in place or into --output), re-lint."""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..carry import Carry, fstamp, stamp
from ..checkpoint import BACKUP_DIR, Checkpoint, CheckpointError
from ..options import Options
from .durable import Syncs, create_new, fsync_dir, write_or_close
from .errors import FixError, FixRefused
from .lock import Lock
from .recovery import pending, recover
from .transaction import Transaction
from .plan import Plan, make_plan
from .refolds import ahead_of_writer
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
    from ..api import lint_checkpoint

    ckpt = Checkpoint.open(path)
    root = ckpt.root
    enabled = False if options.quiet else None

    def first_lint():
        """The lint the plan comes from, on a fresh Checkpoint that the plan and the re-lint's
        carry then share (its memo: the deep passes are not repeated for the evidence)."""
        fresh = Checkpoint.open(path)
        return fresh, _stamps(fresh), lint_checkpoint(fresh, options, path)

    if (dry_run or output is not None) and pending(root):  # neither writes into the folder
        raise FixError(f"{root}: an interrupted fix is pending; run `fqcheck fix` to finish it or "
                       "`fqcheck restore` to roll it back first")
    if dry_run:
        ckpt, _, report = first_lint()
        return FixResult(str(path), _plan(ckpt, report.findings, unsafe_fixes, options), dry_run=True)
    if output is not None:
        _check_output(Path(output), root)
        ckpt, before, report = first_lint()
        plan = _plan(ckpt, report.findings, unsafe_fixes, options)
        out = Path(output)
        res = FixResult(str(path), plan, output=str(out))
        carry = Carry(ckpt)

        def relint(tmp):  # the copy's bytes, linted while its last files are fsynced (then renamed to out)
            res.remaining = _relint(tmp, options, carry, shown_as=out)
        res.written = _write_copy(ckpt, plan, out, enabled, _workers(options, plan), carry, before, relint)
        res.retired = list(plan.retire)
        return res

    with Lock(root):
        try:
            recovered = recover(root)
        except OSError as e:
            raise FixError(f"{root}: cannot finish an interrupted fix: {e.strerror or e}") from e
        ckpt, before, report = first_lint()
        plan = _plan(ckpt, report.findings, unsafe_fixes, options)
        res = FixResult(str(path), plan, recovered=recovered)
        carry = Carry(ckpt)
        if not plan.empty:
            tx = Transaction(root, keep=backup)
            try:
                bar = _bar(ckpt, plan.shards, enabled)
                stamps: dict = {}
                try:
                    _write_new_files(ckpt, plan, tx.new_file, tx.finish_file, tx.write_file, bar,
                                     _workers(options, plan), stamps)
                finally:
                    if bar:
                        bar.stop()
                for name in plan.retire:
                    tx.retire(name)
                untouched = [n for n in ckpt.safetensors_names if n not in stamps and n not in plan.retire]
                _carry(carry, ckpt, plan, before, stamps, {n: _stamp_out(ckpt.path(n)) for n in untouched})
            except BaseException as e:
                tx.abort()
                if isinstance(e, OSError):
                    raise FixError(f"{e.filename or root}: {e.strerror or e}; rolled back, nothing changed") from e
                raise
            tx.commit()
            res.written = plan.files_written()
            res.retired = list(plan.retire)
            res.backup = tx.stash if backup else None
        else:
            _carry(carry, ckpt, plan, before, {}, {n: _stamp_out(ckpt.path(n)) for n in ckpt.safetensors_names})
        res.remaining = _relint(path, options, carry)
        return res


def _relint(path, options: Options, carry: "Carry", shown_as=None):
    """The re-lint: every rule on the result; tensors the fix copied verbatim keep the first lint's
    deep results (fqcheck/carry.py: why that is sound), every other tensor is read from the result.
    shown_as: the path the report names (--output lints its temp folder before renaming it)."""
    from ..api import lint_checkpoint
    out = Checkpoint.open(path)
    carry.attach(out)
    return lint_checkpoint(out, options, shown_as if shown_as is not None else path)


def _stamps(ckpt) -> dict:
    """The source shards' stamps before the first lint reads them (fqcheck/carry.py)."""
    return {n: stamp(ckpt.path(n)) for n in ckpt.safetensors_names}


def _stamp_out(path) -> tuple | None:
    return stamp(path, ctime=False)


def _carry(carry: "Carry", ckpt, plan: Plan, before: dict, written: dict, whole: dict) -> None:
    """Record, once the new files are written, which output tensors are verbatim copies of a source
    shard that has not changed since the first lint began. written: rewritten shard -> the output's
    stamp at the end of its writing; whole: shard copied or left as it is -> its output stamp."""
    for name, out_stamp in [*written.items(), *whole.items()]:
        if name not in before or before[name] is None or stamp(ckpt.path(name)) != before[name]:
            continue
        sp = plan.shards.get(name)
        names = None if sp is None else [t for t in ckpt.header(name).tensors if t not in sp.drop and t not in sp.replace]
        carry.add(name, name, names, out_stamp)


def _workers(options: Options, plan: Plan) -> list:
    """Where the re-folds run (--jobs, --device): only asked when there are re-folds (imports torch)."""
    if not any(sp.replace for sp in plan.shards.values()):
        return []
    from ..workers import devices
    return devices(options.device, options.jobs)


def _plan(ckpt, findings, unsafe: bool, options: Options) -> Plan:
    try:  # quant_format and device decide leaked weight amax (fix/evidence.py)
        return make_plan(ckpt, findings, unsafe, quant_format=options.quant_format, device=options.device,
                         jobs=options.jobs)
    except UnicodeEncodeError as e:  # a JSON file holding a lone surrogate ("\\ud800"): not UTF-8 text
        raise FixRefused(f"refusing to fix: a JSON file to rewrite holds a lone surrogate "
                         f"({e.object[e.start:e.end]!a}), which cannot be written back as UTF-8; edit it by "
                         "hand (nothing was changed)") from e


def _bar(ckpt, names: Iterable[str], enabled: bool | None):
    from ..progress import bar
    names = list(names)
    return bar("fix", sum(os.stat(ckpt.path(n)).st_size for n in names), enabled, files=len(names))


def _write_new_files(ckpt, plan: Plan, new_file, finish_file, write_file, bar=None, workers=(),
                     stamps: dict | None = None) -> None:
    """Write the rewritten shards in name order, each in file order; the re-folds are computed ahead
    by the workers (refolds.py) while the writer copies. stamps: shard -> the new file's stamp."""
    ahead = ahead_of_writer(ckpt, plan, workers)
    try:
        for name in sorted(plan.shards):
            sp = plan.shards[name]
            fd, _ = new_file(name)
            try:
                os.fchmod(fd, stat.S_IMODE(os.stat(ckpt.path(name)).st_mode))  # keep the original's mode
                size = write_shard(ckpt.header(name), fd, sp.drop, ahead.producers(name, sp.replace), sp.metadata)
                if stamps is not None:
                    stamps[name] = fstamp(fd)
            except BaseException:
                os.close(fd)
                raise
            finish_file(fd)
            if bar:
                bar.advance(size)
                bar.file_done()
    finally:
        ahead.close()
    for name in sorted(plan.json_files):
        write_file(name, plan.json_files[name])


def _check_output(out: Path, root: Path) -> None:
    from ..checkpoint import inside
    if inside(os.path.realpath(out), [os.path.realpath(root)]):
        raise FixError(f"{out}: --output must be outside the checkpoint folder {root}")


def _write_copy(ckpt, plan: Plan, out: Path, enabled: bool | None, workers=(), carry: "Carry | None" = None,
                before: dict | None = None, relint=None) -> list[str]:
    """--output: build the repaired copy in a sibling temp folder, then rename it into place. Files
    are fsynced by a background thread while the next one is written (all before the rename).
    carry/before: record for the re-lint which tensors were copied verbatim (fqcheck/carry.py).
    relint(tmp): called once every file is written, while the last ones are fsynced; if anything
    fails after it, no output is written and its report is thrown away with the error."""
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
    syncs = Syncs()
    try:
        def new_file(name):
            return create_new(tmp / name), name

        def write_file(name, data):
            fd, _ = new_file(name)
            write_or_close(fd, data)
            syncs.finish(fd)

        from .shard import copy_range
        skip = set(plan.files_written()) | set(plan.retire)
        copied = [n for n in ckpt.names if n not in skip]
        bar = _bar(ckpt, [*plan.shards, *copied], enabled)
        written: dict = {}
        whole: dict = {}
        try:
            _write_new_files(ckpt, plan, new_file, syncs.finish, write_file, bar, workers, written)
            for name in copied:
                # follows links into the folder or its cache blobs (the copy holds real files);
                # a link that leads outside is not in ckpt.names: it is kept as a link below
                with open(ckpt.path(name), "rb") as src:
                    fd, _ = new_file(name)
                    size = os.fstat(src.fileno()).st_size
                    try:
                        copy_range(src.fileno(), fd, 0, 0, size)
                        whole[name] = fstamp(fd)
                    except BaseException:
                        os.close(fd)
                        raise
                    syncs.finish(fd)
                if bar:
                    bar.advance(size)
                    bar.file_done()
            for name, target in sorted(ckpt.outside.items()):
                os.symlink(target, tmp / name)  # never read: what lies outside stays outside
        finally:
            if bar:
                bar.stop()
        if carry is not None and before is not None:
            _carry(carry, ckpt, plan, before, written, {n: s for n, s in whole.items() if n in before})
        if relint is not None:
            relint(tmp)
        syncs.wait()  # every file durable before the folder is
        fsync_dir(tmp)
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException as e:
        try:
            syncs.wait()
        except OSError:
            pass
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
