"""The python tool's sandbox: limits stop runaway code, writes and connections outside fail, the caller survives.

Each isolation layer is also tested alone (the others switched off) where this kernel provides it."""

import os
import re
import socket

import pytest

from dsv32.tools import default_registry
from dsv32.tools.sandbox import Limits, Sandbox, landlock_abi, netns_prefix, run_python

FAST = Limits(cpu_s=1, wall_s=15, memory_mb=256, output_bytes=2000, file_mb=1)
HAS_NETNS = bool(netns_prefix(Sandbox().python))
HAS_LANDLOCK = landlock_abi() > 0


def test_runs_code_in_a_private_directory_with_a_clean_environment(monkeypatch):
    monkeypatch.setenv("DSV32_TEST_SECRET", "hunter2")
    r = Sandbox(FAST).run("import os\nopen('note.txt', 'w').write('kept')\nprint(open('note.txt').read())\n"
                          "print(sorted(os.environ), os.getcwd())")
    assert r.ok and r.stdout.startswith("kept\n")
    assert "DSV32_TEST_SECRET" not in r.stdout and "hunter2" not in r.stdout
    workdir = r.stdout.split()[-1]
    assert "dsv32-sandbox-" in workdir and not os.path.exists(workdir)  # removed after the run


def test_infinite_loop_is_killed_at_the_cpu_limit():
    r = Sandbox(FAST).run("while True:\n    pass")
    assert r.killed == "cpu" and not r.ok and "cpu limit" in r.text()


def test_sleeping_code_is_killed_at_the_wall_limit():
    r = Sandbox(Limits(cpu_s=5, wall_s=1)).run("import time\ntime.sleep(60)")
    assert r.killed == "wall" and r.exit_code is None


@pytest.mark.parametrize("bomb", ["x = bytearray(8 * 1024 ** 3)", "a = []\nwhile True:\n    a.append(bytearray(10 ** 7))"])
def test_memory_bomb_is_stopped(bomb):
    r = Sandbox(FAST).run(bomb)
    assert r.killed == "memory" and "MemoryError" in r.stderr
    assert Sandbox(FAST).run("print(len(bytearray(10 ** 6)))").stdout == "1000000\n"  # the caller keeps running


def test_output_and_file_size_are_capped():
    r = Sandbox(FAST).run("while True:\n    print('x' * 1000)")
    assert r.truncated and r.killed == "output" and len(r.stdout) <= FAST.output_bytes
    r = Sandbox(FAST).run("open('big', 'wb').write(b'x' * (2 << 20))")
    assert r.killed == "file" and "File too large" in r.stderr


def escape_attempts(target: str, port: int) -> dict[str, str]:
    return {
        "write": f"open({target!r}, 'w').write('escaped')",
        "connect": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')",
        "subprocess": f"import subprocess\nsubprocess.run(['sh', '-c', 'echo escaped > {target}'])",
    }


@pytest.fixture
def listener():
    """A real local server: without the sandbox a connection to it succeeds."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    yield srv
    srv.close()


def accepted(srv) -> bool:
    try:
        srv.accept()[0].close()
        return True
    except (TimeoutError, socket.timeout):
        return False


LAYERS = [pytest.param({}, id="all-layers"),
          pytest.param({"landlock": False, "network_namespace": False}, id="audit-hook-only"),
          pytest.param({"audit_hook": False, "network_namespace": False}, id="landlock-only",
                       marks=pytest.mark.skipif(not HAS_LANDLOCK, reason="no Landlock in this kernel"))]


@pytest.mark.parametrize("layers", LAYERS)
def test_writes_outside_and_processes_fail(tmp_path, layers):
    target = str(tmp_path / "escaped.txt")
    sandbox = Sandbox(FAST, **layers)
    for name in ("write", "subprocess"):
        r = sandbox.run(escape_attempts(target, 0)[name])
        assert not r.ok and re.search("PermissionError|ImportError", r.stderr), (name, r)
        assert not os.path.exists(target), name
    open(target, "w").close()   # the test itself may write there: the sandbox is what stopped the code


@pytest.mark.parametrize("layers", LAYERS + [
    pytest.param({"audit_hook": False, "landlock": False}, id="netns-only",
                 marks=pytest.mark.skipif(not HAS_NETNS, reason="no network namespaces here"))])
def test_network_connection_fails(listener, layers):
    code = escape_attempts("", listener.getsockname()[1])["connect"]
    r = Sandbox(FAST, **layers).run(code)
    assert not r.ok and "connected" not in r.stdout and not accepted(listener), r
    # The same code outside every layer does connect, so the check above can fail.
    r = Sandbox(FAST, audit_hook=False, landlock=False, network_namespace=False).run(code)
    assert r.stdout == "connected\n" and accepted(listener)


def test_reads_are_limited_to_the_standard_library():
    if not HAS_LANDLOCK:
        pytest.skip("no Landlock in this kernel")
    here = os.path.abspath(__file__)
    r = Sandbox(FAST).run(f"import json, math, fractions\nprint(math.factorial(5))\nopen({here!r}).read()")
    assert r.stdout == "120\n" and "Permission denied" in r.stderr


def test_layers_report_and_the_python_tool():
    layers = Sandbox().layers()
    assert layers["audit_hook"] and layers["network_namespace"] == HAS_NETNS
    assert layers["landlock_abi"] == landlock_abi()
    assert run_python("print(sum(range(10)))").text() == "45\n"
    r = default_registry(limits=FAST).call("python", {"code": "1/0"})
    assert not r.error and "ZeroDivisionError" in r.content and "[exit code 1]" in r.content
    with pytest.raises(ValueError, match="cpu_s"):
        Limits(cpu_s=0)
