"""A real Triton Inference Server for the tests: the `tritonserver` binary that NVIDIA's `nvidia-pytriton` wheel ships
(Triton 2.51 with its Python backend and one backend stub per Python version), started on free loopback ports over a
model repository.

`make setup` installs the wheel into `.venv/pytriton` with `pip install --no-deps --target`: only its binary, its
libraries and its Python backend are used here, and pytriton's own Python dependencies pin numpy below 2, which the
rest of the environment does not take. An ordinary `pip install nvidia-pytriton` is found too.

How the server is run is read from pytriton (`pytriton/triton.py`, `pytriton/server/triton_server.py`):

- the libraries the binary links against are in `nvidia_pytriton.libs` beside the package: LD_LIBRARY_PATH;
- the Python backend starts `backends/python/triton_python_backend_stub` for every model instance, and the wheel
  keeps one stub per Python version in `python_backend_stubs/3.X/`: the backend folder is assembled from the
  wheel's Python backend and the stub of the models' Python version (below);
- the stub embeds Python and finds its environment the way a `python3` typed in a shell would, from PATH (pytriton
  puts its own environment's `bin` first): the environment whose `bin` comes first is the models' Python, its
  site-packages and .pth files (an editable edgepix) included. The stub links against `libpython3.X.so.1.0` (that
  Python's library folder goes first on LD_LIBRARY_PATH) and was built against numpy 1.x: under numpy 2 every tensor
  a model returns arrives empty (`binary_data_size: 0`, seen here with an x + 1 model), which is why pytriton pins
  numpy<2. This test environment has numpy 2, so the models run in the environment of the system's
  Python that make setup makes for the GStreamer tests (EDGEPIX_SYSTEM_OPENCV_ENV, .venv-system: the system's
  libpython, numpy<2, ONNX Runtime, OpenCV and this checkout's edgepix, editable): the server's Python, as a Triton
  container's Python is on a real server;
- every server gets its own shared-memory prefix for the Python backend, so two servers (two test runs) on one
  machine do not meet in /dev/shm.

The server runs in a process group of its own, so stopping it (SIGTERM, then SIGKILL) also ends its stubs: no
orphan processes. It also gets SIGKILL from the kernel if the thread that started it dies without stopping it (a
test process killed, a script that crashed; PR_SET_PDEATHSIG), and its stubs end when their server is gone.
`kill()` and `pause()` are the outages the tests need: a crash (SIGKILL of the group) and a stall (SIGSTOP of the
server process).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from edgepix.benchmarks.stream_bound import free_port

REPO = Path(__file__).resolve().parents[1]
#: glibc that the wheel's binaries are built for (manylinux_2_35)
MIN_GLIBC = (2, 35)
#: where `make setup` installs the wheel (pip --target), relative to the environment's prefix
TARGET_FOLDER = "pytriton"
READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 15.0
LOG_TAIL_LINES = 25


@dataclass(frozen=True)
class TritonInstall:
    server: Path  # .../pytriton/tritonserver/bin/tritonserver
    libs: Path  # .../nvidia_pytriton.libs
    python_backend: Path  # .../pytriton/tritonserver/backends/python
    stub: Path  # .../pytriton/tritonserver/python_backend_stubs/3.X/triton_python_backend_stub
    python_env: Path  # the models' Python environment (its bin/python3)
    libpython_dir: Path  # the folder of that Python's libpython3.X.so.1.0

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        libraries = [str(self.libpython_dir), str(self.libs)]
        if env.get("LD_LIBRARY_PATH"):
            libraries.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = ":".join(libraries)
        env["PATH"] = f"{self.python_env / 'bin'}:{env.get('PATH', '')}"
        return env


def _package_folder() -> Path | None:
    """The `pytriton` package folder: an installed package, or make setup's --target folder."""
    spec = importlib.util.find_spec("pytriton")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    target = Path(sys.prefix) / TARGET_FOLDER / "pytriton"
    return target if target.is_dir() else None


def _glibc() -> tuple[int, int] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (ValueError, OSError, AttributeError):
        return None


#: what the models' Python must have, read by that Python itself
_PROBE = """
import json, sys, sysconfig
facts = {"version": "%d.%d" % sys.version_info[:2], "shared": bool(sysconfig.get_config_var("Py_ENABLE_SHARED")),
         "libdir": sysconfig.get_config_var("LIBDIR"), "soname": sysconfig.get_config_var("INSTSONAME")}
try:
    import numpy, onnxruntime, cv2, edgepix.runtime
    facts.update(numpy=numpy.__version__, edgepix=edgepix.runtime.__file__)
except ImportError as e:
    facts["missing"] = str(e)
print(json.dumps(facts))
"""


def server_python_env() -> Path:
    """The models' Python environment: make setup's environment of the system's Python (see the module docstring)."""
    return Path(os.environ.get("EDGEPIX_SYSTEM_OPENCV_ENV", REPO / ".venv-system"))


def _check_python_env(env: Path) -> tuple[dict, str | None]:
    """(facts about the models' Python, or a reason it cannot serve edgepix models from this checkout)."""
    python = env / "bin" / "python3"
    if not python.exists():
        return {}, (f"no Python environment for the models at {env} (make system-opencv-env makes it: the system's "
                    "Python with numpy<2, ONNX Runtime and edgepix)")
    answer = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=120)
    if answer.returncode != 0:
        return {}, f"{python} does not run: {answer.stderr.strip().splitlines()[-1:]}"
    facts = json.loads(answer.stdout)
    if "missing" in facts:
        return facts, f"the models' Python {python} lacks what the edgepix runtime needs: {facts['missing']}"
    if int(facts["numpy"].split(".")[0]) >= 2:
        return facts, (f"the models' Python {python} has numpy {facts['numpy']}; the Python backend stub needs "
                       "numpy<2 (tensors come back empty otherwise)")
    if Path(facts["edgepix"]).resolve() != (REPO / "runtime" / "__init__.py").resolve():
        return facts, f"the models' Python {python} imports another edgepix ({facts['edgepix']}), not this checkout's"
    if not (facts["shared"] and facts["libdir"] and (Path(facts["libdir"]) / facts["soname"]).is_file()):
        return facts, f"the backend stub links against a shared libpython, and {python} is not a shared build"
    return facts, None


def find_install() -> TritonInstall | str:
    """The server from the installed wheel, or one line saying why it cannot run here."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return (f"the nvidia-pytriton tritonserver is built for x86_64 Linux, this is {sys.platform} "
                f"{platform.machine()}")
    glibc = _glibc()
    if glibc is None or glibc < MIN_GLIBC:
        return (f"the nvidia-pytriton tritonserver needs glibc >= {'.'.join(map(str, MIN_GLIBC))}, this system has "
                f"{'.'.join(map(str, glibc)) if glibc else 'no glibc'}")
    package = _package_folder()
    if package is None:
        target = Path(sys.prefix) / TARGET_FOLDER
        return (f"no tritonserver: the nvidia-pytriton wheel is not installed (make setup puts it in {target}: "
                f"pip install --no-deps --target {target} nvidia-pytriton)")
    root = package / "tritonserver"
    server = root / "bin" / "tritonserver"
    libs = package.parent / "nvidia_pytriton.libs"
    for path in (server, root / "backends" / "python" / "libtriton_python.so", libs):
        if not path.exists():
            return f"the nvidia-pytriton wheel in {package.parent} has no {path.relative_to(package.parent)}"
    env = server_python_env()
    facts, reason = _check_python_env(env)
    if reason is not None:
        return reason
    stub = root / "python_backend_stubs" / facts["version"] / "triton_python_backend_stub"
    if not stub.is_file():
        return f"the nvidia-pytriton wheel has no Python backend stub for Python {facts['version']} ({env})"
    return TritonInstall(server=server, libs=libs, python_backend=root / "backends" / "python", stub=stub,
                         python_env=env, libpython_dir=Path(facts["libdir"]))


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the thread that started it ends (prctl PR_SET_PDEATHSIG)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


class TritonServer:
    """tritonserver over `repository` on 127.0.0.1: `start()` returns once every model is ready (or fails with the
    log's last lines), `stop()` ends it and its backend stubs. `load_models`: serve only these (explicit model
    control: the others stay in the repository, not loaded); None: every model in the repository."""

    def __init__(self, install: TritonInstall, repository: Path, workdir: Path, *,
                 load_models: list[str] | None = None) -> None:
        self.install = install
        self.repository = Path(repository)
        self.workdir = Path(workdir)
        self.load_models = load_models
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.process: subprocess.Popen | None = None
        self.log_path = self.workdir / "tritonserver.log"
        self.starts = 0

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc_port}"

    def url(self, protocol: str) -> str:
        return self.grpc_url if protocol == "grpc" else self.http_url

    def _backend_folder(self) -> Path:
        """backends/python: the wheel's Python backend with this Python's stub (links, nothing copied)."""
        folder = self.workdir / "backends" / "python"
        folder.mkdir(parents=True, exist_ok=True)
        for source in [*self.install.python_backend.iterdir(), self.install.stub]:
            link = folder / source.name
            if not link.exists():
                link.symlink_to(source)
        return folder.parent

    def command(self) -> list[str]:
        control = ["--model-control-mode=none"]
        if self.load_models is not None:
            control = ["--model-control-mode=explicit", *(f"--load-model={m}" for m in self.load_models)]
        return [str(self.install.server), f"--model-repository={self.repository}",
                f"--backend-directory={self._backend_folder()}", *control,
                "--http-address=127.0.0.1", f"--http-port={self.http_port}",
                "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
                "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics_port}", "--allow-gpu-metrics=false",
                f"--backend-config=python,shm-region-prefix-name=edgepix{os.getpid()}x{uuid.uuid4().hex[:8]}",
                "--exit-timeout-secs=2", "--log-verbose=0"]

    def start(self) -> TritonServer:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("tritonserver is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child writes to it; closed right after the start
        try:
            log.write(f"\n==== start {self.starts}: {' '.join(self.command())}\n".encode())
            log.flush()
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.install.environment(),
                                            start_new_session=True, preexec_fn=_die_with_parent)
        finally:
            log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with status {self.process.returncode} before it was "
                                   f"ready; its log ends:\n{self.log_tail()}")
            if self.ready():
                return
            time.sleep(0.1)
        raise RuntimeError(f"tritonserver was not ready after {READY_TIMEOUT_S:.0f} s; its log ends:\n"
                           f"{self.log_tail()}")

    def ready(self) -> bool:
        """GET /v2/health/ready: 200 once every model that is to be loaded is."""
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=1.0) as answer:
                return answer.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The log's last lines, without the option and status tables Triton prints (which would fill them)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        kept = [line for line in text.splitlines() if line.strip() and not line.startswith(("+", "|"))]
        return "\n".join(kept[-lines:])

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL if it has not exited in STOP_TIMEOUT_S; then also every
        process left in the group (a stub whose server is gone)."""
        if self.process is None:
            return
        self._signal_group(signal.SIGCONT)  # a paused server cannot exit
        if self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        self._signal_group(signal.SIGKILL)
        self.process.wait()

    def kill(self) -> None:
        """A crash: SIGKILL to the server and its stubs at once."""
        self._signal_group(signal.SIGKILL)
        self.process.wait()

    def pause(self) -> None:
        """A stall: the server process stops (SIGSTOP); its sockets stay open and connections are still accepted by
        the kernel, but nothing answers."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
