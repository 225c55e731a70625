"""One error convention for every entry point (the trainer, every tool): exit codes and one line.

    0  done
    1  a bug (the traceback is printed: it is needed)
    2  a user's mistake or damaged input, or an OS error the user can fix (no space, no
       permission, a path that is a file, a file-size limit): one `error: ...` line on stderr
       naming the thing and the fix, nothing half-written
    3  the trainer stopped itself (too many non-finite steps in a row)

`user_error_line(exc)` decides whether an exception is a user's (and words its line);
`cli_main(main, argv)` runs a tool's main() under that rule. docs/reliability.md has the table.
Ground floor: the standard library only.
"""

from __future__ import annotations

import errno
import re
import sys
from collections.abc import Callable

EXIT_OK, EXIT_BUG, EXIT_USER, EXIT_STOPPED = 0, 1, 2, 3


class UserError(ValueError):
    """A mistake the user can fix; its message is the one line (names the thing and the fix)."""


#: errno -> (what happened, the fix), for OS errors a user can fix
_FIXABLE = {
    errno.ENOSPC: ("no space left on the device", "free space there or choose another place"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space there or choose another place"),
    errno.EFBIG: ("a file grew beyond the file-size limit (`ulimit -f`) or the file system's",
                  "raise the limit (`ulimit -f unlimited`) or choose another file system"),
    errno.EACCES: ("permission denied", "fix the permissions or choose another place"),
    errno.EPERM: ("operation not permitted", "fix the permissions or choose another place"),
    errno.EROFS: ("the file system is read-only", "choose a writable place"),
    errno.ENOTDIR: ("a part of the path is a file, not a directory", "choose another path"),
    errno.EEXIST: ("a part of the path exists as a file", "choose another path"),
    errno.EISDIR: ("the path is a directory, a file was expected", "choose another path"),
    errno.ENOENT: ("no such file or directory", "check the path"),
    errno.ENAMETOOLONG: ("the path is too long", "choose a shorter path"),
    errno.EMFILE: ("too many open files", "raise the limit (`ulimit -n`)"),
}
_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\] ([^:\n]+)(?:: '([^'\n]*)')?")


def os_error_line(e: OSError, what: str = "") -> str | None:
    """One line for an OS error the user can fix, naming the path (and `what` it is, e.g.
    'train.save_dir'); None for other OS errors."""
    if e.errno not in _FIXABLE:
        return None
    happened, fix = _FIXABLE[e.errno]
    path = e.filename if e.filename is not None else "?"
    where = f" ({what})" if what else ""
    return f"{path}{where}: {happened} ({e.strerror or errno.errorcode.get(e.errno, e.errno)}); {fix}"


def find_os_error(exc: BaseException) -> OSError | None:
    """The user-fixable OSError inside `exc`: itself, its causes, the per-rank failures of a
    torch.distributed.checkpoint CheckpointException, or (when only text came back from a writer
    process) an `[Errno N] ...: 'path'` in the message."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FIXABLE:
            return e
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):  # CheckpointException: {rank: (exception, traceback)}
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    m = _ERRNO_TEXT.search(str(exc))
    if m and int(m.group(1)) in _FIXABLE:
        return OSError(int(m.group(1)), m.group(2).strip(), m.group(3))
    return None


def diagnose_write_failure(path, need_bytes: int) -> OSError | None:
    """A write of about `need_bytes` into directory `path` failed somewhere we cannot see (megatron's
    checkpoint writer reports "unexpected pos 704 vs 598" from torch's zip writer, no errno): the
    OSError a file-size limit or a full disk would have been, or None if neither explains it."""
    import os
    import resource
    import shutil

    def mib(n):
        return f"{n / 2**20:,.1f} MiB"

    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY and soft < need_bytes:
        return OSError(errno.EFBIG, f"the file-size limit is {mib(soft)}, the checkpoint needs about {mib(need_bytes)}",
                       str(path))
    p = os.fspath(path)
    while p and not os.path.exists(p):
        p = os.path.dirname(p)
    try:
        free = shutil.disk_usage(p or ".").free
    except OSError:
        return None
    if free < need_bytes:
        return OSError(errno.ENOSPC, f"{mib(free)} free, the checkpoint needs about {mib(need_bytes)}; the unfinished "
                                     f"{os.path.basename(os.fspath(path))} may be deleted", str(path))
    return None


def user_error_line(exc: BaseException, what: str = "") -> str | None:
    """The one line (without `error: `) for an exception that is the user's to fix, else None.
    ValueError (and so UserError, ConfigError, FormatError, CheckpointError ...), an OSError raised
    with a message only (`FileNotFoundError("no config at ...")`) and user-fixable OS errors are the
    user's; anything else is a bug."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return None
    os_err = find_os_error(exc)
    if os_err is not None:
        return os_error_line(os_err, what)
    if isinstance(exc, ValueError) or (isinstance(exc, OSError) and exc.errno is None):  # the latter: our own message
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


def cli_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None, what: str = "") -> int:
    """Run a tool's main(argv): its own return code, or EXIT_USER with one line for a user's
    error, or the traceback and EXIT_BUG for a bug. argparse's usage errors exit 2 by themselves."""
    try:
        return main(argv)
    except Exception as exc:
        line = user_error_line(exc, what)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return EXIT_USER


def report_user_error(exc: BaseException, what: str = "") -> bool:
    """Print the one `error: ...` line of an exception that is the user's to fix (user_error_line) on
    stderr and return True; False for anything else (a bug: the caller re-raises it)."""
    import sys

    line = user_error_line(exc, what)
    if line is None:
        return False
    print(f"error: {line}", file=sys.stderr)
    return True
