"""The `python` tool: run untrusted code in a subprocess with limits, no network and a private directory.

Layers (each one alone stops the attack it names; `Sandbox.layers()` says which are active here):
- resource limits set by the child before user code runs: CPU seconds (RLIMIT_CPU -> SIGXCPU), address space
  (RLIMIT_AS -> MemoryError), file size (RLIMIT_FSIZE, also caps stdout/stderr, which go to files), no core
  dumps; a wall-clock timeout kills the whole process group;
- a fresh network namespace (`unshare --net`, with `--user --map-root-user` when not root): no interfaces but a
  down loopback, so no connection can leave;
- Landlock (Linux >= 5.13, ABI probed): writes, deletes and creates only inside the private working directory,
  reads only there and in the interpreter's standard library, no execve, no TCP bind/connect (ABI >= 4), no
  signals or abstract sockets outside the sandbox (ABI >= 6);
- a Python audit hook installed before user code: sockets, subprocesses, fork/exec, kill, ctypes, rlimit
  changes and writes outside the working directory raise PermissionError (the portable first line; the
  kernel layers hold even if it is bypassed);
- `python -I -S -B`: no site-packages, no environment variables (the child gets a fixed minimal environment, so
  no secrets are inherited), no bytecode writes.

    result = run_python("print(sum(range(10)))")
    result.stdout, result.killed, result.text()      # '45\\n', None, '45\\n'
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

# The child's entry point: limits, Landlock and the audit hook, then the user's main.py. argv: landlock ABI,
# audit hook flag, cpu seconds, address-space bytes, file-size bytes.
_CHILD = r'''
import os, resource, sys, traceback
WORK = os.path.realpath(os.getcwd())
ABI, HOOK, CPU, AS, FSIZE = int(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
resource.setrlimit(resource.RLIMIT_CPU, (CPU, CPU + 1))
resource.setrlimit(resource.RLIMIT_AS, (AS, AS))
resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE, FSIZE))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

def landlock(abi):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    u64, cint, u32 = ctypes.c_uint64, ctypes.c_int, ctypes.c_uint32
    class Ruleset(ctypes.Structure):
        _fields_ = [("fs", u64), ("net", u64), ("scoped", u64)]
    class Beneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", u64), ("fd", ctypes.c_int32)]
    def check(ret, what):
        if ret < 0:
            err = ctypes.get_errno()
            raise OSError(err, "landlock " + what + ": " + os.strerror(err))
        return ret
    fs = (1 << 13) - 1 | (abi >= 2) << 13 | (abi >= 3) << 14 | (abi >= 5) << 15
    attr = Ruleset(fs, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)   # net: bind+connect TCP; scope: unix+signal
    ruleset = check(syscall(444, ctypes.byref(attr), ctypes.c_size_t(8 if abi < 4 else 16 if abi < 6 else 24),
                            u32(0)), "create_ruleset")
    FILE = (1 << 0 | 1 << 1 | 1 << 2 | 1 << 14 | 1 << 15)   # rights that apply to files (not directories)
    def allow(path, access):
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            access &= fs if os.path.isdir(path) else fs & FILE
            check(syscall(445, cint(ruleset), cint(1), ctypes.byref(Beneath(access, fd)), u32(0)), "add_rule " + path)
        finally:
            os.close(fd)
    allow(WORK, fs & ~1)                       # everything but execve
    allow("/dev/null", 1 << 1 | 1 << 2 | 1 << 14 | 1 << 15)
    for path in sorted({*sys.path, sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}):
        if path and os.path.exists(path):
            allow(path, 1 << 2 | 1 << 3)      # read files and directories of the standard library
    check(libc.prctl(38, 1, 0, 0, 0), "no_new_privs")
    check(syscall(446, cint(ruleset), u32(0)), "restrict_self")
    os.close(ruleset)

if ABI > 0:
    landlock(ABI)
    del landlock
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]

BLOCKED = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill", "os.killpg",
           "subprocess.Popen", "signal.pthread_kill", "resource.setrlimit", "resource.prlimit", "os.chroot"}
BLOCKED_MODULES = {"ctypes", "_ctypes", "_posixsubprocess"}
PATH_ARGS = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.rename": 2, "os.link": 2, "os.symlink": 2,
             "os.chmod": 1, "os.chown": 1, "os.truncate": 1, "os.utime": 1, "os.setxattr": 1, "os.removexattr": 1,
             "os.chflags": 1, "os.lchflags": 1, "os.lchmod": 1}
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def inside(path):
    if isinstance(path, int):
        return True                          # an already open descriptor
    real = os.path.realpath(os.path.join(WORK, os.fsdecode(path)))
    return real == WORK or real.startswith(WORK + os.sep)

def hook(event, args):
    if event in BLOCKED or event.startswith(("socket.", "ctypes.")):
        raise PermissionError("sandbox: " + event + " is not allowed (no network, processes or native calls)")
    if event == "import" and args[0] in BLOCKED_MODULES:
        raise ImportError("sandbox: module " + args[0] + " is not available")
    paths = ()
    if event == "open":
        path, mode, flags = args
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & WRITE:
            paths = (path,)
    elif event in PATH_ARGS:
        paths = args[:PATH_ARGS[event]]
    for path in paths:
        if path is not None and not inside(path):
            raise PermissionError("sandbox: writing outside the working directory is not allowed: " + str(path))

if HOOK:
    sys.addaudithook(hook)
with open("main.py", encoding="utf-8") as f:
    source = f.read()
try:
    exec(compile(source, "main.py", "exec"), {"__name__": "__main__", "__file__": "main.py"})
except SystemExit:
    raise
except BaseException as e:
    traceback.print_exception(type(e), e, e.__traceback__.tb_next)
    sys.exit(1)
'''


@dataclass(frozen=True)
class Limits:
    """Per-run limits; the defaults suit a model's tool call, tests use ~1 s."""
    cpu_s: int = 5
    wall_s: float = 10.0
    memory_mb: int = 512
    output_bytes: int = 16_384     # kept of stdout and of stderr each
    file_mb: int = 16              # largest file (stdout/stderr included)

    def __post_init__(self):
        for name in ("cpu_s", "wall_s", "memory_mb", "output_bytes", "file_mb"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Limits.{name} must be positive, got {getattr(self, name)}")


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    exit_code: int | None          # negative: killed by that signal
    killed: str | None             # "cpu" | "wall" | "memory" | "output" | "file" | "signal" | None
    truncated: bool                # output longer than Limits.output_bytes
    wall_s: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.killed is None

    def text(self) -> str:
        """What the model sees: stdout, then stderr and the reason it stopped, if any."""
        parts = [self.stdout] if self.stdout else []
        if self.stderr:
            parts.append("stderr:\n" + self.stderr)
        if self.truncated:
            parts.append("[output truncated]")
        if self.killed:
            parts.append(f"[stopped: {self.killed} limit]" if self.killed != "signal"
                         else f"[stopped by signal {-(self.exit_code or 0)}]")
        elif self.exit_code:
            parts.append(f"[exit code {self.exit_code}]")
        return "\n".join(p.rstrip("\n") for p in parts) + "\n" if parts else "[no output]\n"


@functools.lru_cache(maxsize=None)
def landlock_abi() -> int:
    """The kernel's Landlock ABI version (0 when unavailable)."""
    if not sys.platform.startswith("linux"):
        return 0
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return max(0, int(libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))))


@functools.lru_cache(maxsize=None)
def netns_prefix(python: str) -> tuple[str, ...]:
    """The command prefix that runs `python` in a new network namespace, () when that is not possible here.
    Verified by listing the interfaces inside: only the loopback may exist."""
    unshare = shutil.which("unshare")
    if not unshare:
        return ()
    for prefix in ((unshare, "--net", "--"), (unshare, "--user", "--map-root-user", "--net", "--")):
        probe = [*prefix, python, "-I", "-S", "-c", "import socket; print(sorted(n for _, n in socket.if_nameindex()))"]
        try:
            out = subprocess.run(probe, capture_output=True, text=True, timeout=20, env={"PATH": "/usr/bin:/bin"})
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0 and out.stdout.strip() == "['lo']":
            return prefix
    return ()


class Sandbox:
    """Runs Python code under `limits`; the three isolation layers can be turned off only to test the others."""

    def __init__(self, limits: Limits | None = None, *, python: str | None = None, network_namespace: bool = True,
                 landlock: bool = True, audit_hook: bool = True):
        self.limits = limits or Limits()
        self.python = python or sys.executable
        self.prefix = netns_prefix(self.python) if network_namespace else ()
        self.abi = landlock_abi() if landlock else 0
        self.audit_hook = audit_hook

    def layers(self) -> dict:
        return {"network_namespace": bool(self.prefix), "landlock_abi": self.abi, "audit_hook": self.audit_hook}

    def run(self, code: str) -> SandboxResult:
        if not isinstance(code, str):
            raise TypeError(f"Sandbox.run: code must be a string, got {type(code).__name__}")
        lim = self.limits
        root = tempfile.mkdtemp(prefix="dsv32-sandbox-")
        work = os.path.join(root, "work")
        os.mkdir(work, 0o700)
        try:
            with open(os.path.join(work, "main.py"), "w", encoding="utf-8") as f:
                f.write(code)
            argv = [*self.prefix, self.python, "-I", "-S", "-B", "-X", "utf8", "-c", _CHILD, str(self.abi),
                    "1" if self.audit_hook else "0", str(int(lim.cpu_s)), str(lim.memory_mb << 20),
                    str(lim.file_mb << 20)]
            env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
            start = time.monotonic()
            with open(os.path.join(root, "stdout"), "wb+") as out, open(os.path.join(root, "stderr"), "wb+") as err:
                proc = subprocess.Popen(argv, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                        start_new_session=True)
                timed_out = threading.Event()
                timer = threading.Timer(lim.wall_s, lambda: (timed_out.set(), _kill_group(proc.pid)))
                timer.start()
                try:   # wait for the exit without reaping, so the group id cannot be reused before the kill
                    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
                finally:
                    timer.cancel()
                    timer.join()
                    _kill_group(proc.pid)   # nothing the code started may outlive the call
                    proc.wait()
                wall = time.monotonic() - start
                stdout, cut_out, out_size = _read(out, lim.output_bytes)
                stderr, cut_err, err_size = _read(err, lim.output_bytes)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        code_ = proc.returncode
        killed = None
        if timed_out.is_set():
            killed, code_ = "wall", None
        elif code_ in (-signal.SIGXCPU, -signal.SIGKILL):   # soft CPU limit, or the hard one 1 s later
            killed = "cpu"
        elif "MemoryError" in stderr:
            killed = "memory"
        elif max(out_size, err_size) >= lim.file_mb << 20:
            killed = "output"
        elif "File too large" in stderr:
            killed = "file"
        elif code_ is not None and code_ < 0:
            killed = "signal"
        return SandboxResult(stdout, stderr, code_, killed, cut_out or cut_err, wall)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read(f, limit: int) -> tuple[str, bool, int]:
    """The first `limit` bytes of an output file as text, whether it was longer, and its size."""
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    return f.read(limit).decode("utf-8", errors="replace"), size > limit, size


def run_python(code: str, limits: Limits | None = None) -> SandboxResult:
    """Run `code` in a fresh sandbox with the given limits (defaults: `Limits()`)."""
    return Sandbox(limits).run(code)


PYTHON_SCHEMA = {"type": "function", "function": {
    "name": "python",
    "description": "Run a Python program (standard library only, no network, no files kept between calls) and "
                   "return what it prints.",
    "parameters": {"type": "object", "properties": {"code": {"type": "string", "description": "the program"}},
                   "required": ["code"], "additionalProperties": False}}}
