"""What docker/Dockerfile does, done without a Docker daemon (there is none on these machines):
stage exactly the files its build stage's COPY lines name, build the wheels there as its RUN
line does, install them into a fresh virtual environment, lay out the runtime stage's working
directory (its COPY lines, its state directory owned by the image's user, its ENV), and run
the image's ENTRYPOINT and CMD as a non-root user against the local broker. Its HEALTHCHECK
command must pass, the job must produce its outputs and keep its state in the image's state
directory, and SIGTERM must stop it with exit code 0.

A file the image forgets (a package not copied, a dependency not declared, a directory the
user cannot write) fails here as it would in the image."""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.helpers import ROOT, free_port, make_topics, produce, read_topic, unique, wait_until

pytestmark = pytest.mark.slow

DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _instructions(stage: str) -> list[tuple[str, str]]:
    """(instruction, arguments) of a stage, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", stage)
    return [(m.group(1), m.group(2).strip())
            for m in re.finditer(r"^([A-Z]+) (.*)$", text, re.M)]


def _stages() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    build, runtime = DOCKERFILE.read_text().split("\nFROM ")[1:3]
    return _instructions("FROM " + build), _instructions("FROM " + runtime)


def _copy(args: str, workdir: Path, context: Path) -> None:
    """COPY [--flags] src... dest, relative to the build context and the working directory."""
    words = [w for w in shlex.split(args) if not w.startswith("--")]
    *sources, dest = words
    target = workdir / dest
    for src in sources:
        path = context / src
        assert path.exists(), f"the Dockerfile copies {src}, which does not exist"
        into = target / Path(src).name if dest.endswith("/") or len(sources) > 1 else target
        if path.is_dir():
            shutil.copytree(path, into, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            into.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, into)


def _public_python() -> str:
    """A Python of this minor version that a non-root user can run (the suite's own may live
    under /root, as with pyenv)."""
    minor = f"python3.{sys.version_info.minor}"
    base = getattr(sys, "_base_executable", sys.executable)
    for cand in (os.path.realpath(base), f"/usr/local/bin/{minor}",
                 f"/usr/bin/{minor}"):
        path = Path(cand)
        if path.exists() and all(os.stat(p).st_mode & 0o005 == 0o005
                                 for p in [path, *path.parents] if p != Path("/")):
            probe = subprocess.run([cand, "-c", "import venv, ensurepip"], capture_output=True)
            if probe.returncode == 0:
                return cand
    pytest.skip(f"no {minor} with venv that a non-root user can run")


def _image_user() -> tuple[int, int] | None:
    """(uid, gid) to run as when we are root (None: we already are a non-root user)."""
    if os.geteuid() != 0:
        return None
    name = "streamcore-test"
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", name], check=True)
        entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


def _chown(path: Path, user: tuple[int, int]) -> None:
    for p in [path, *path.rglob("*")]:
        os.chown(p, *user)



@pytest.fixture
def root_dir() -> Iterator[Path]:
    """A directory every user can reach (pytest's tmp_path is private to its user)."""
    d = Path(tempfile.mkdtemp(prefix="streamcore-image-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_the_image_builds_and_its_cmd_runs_as_a_non_root_user(bootstrap: str,
                                                                root_dir: Path) -> None:
    build, runtime = _stages()
    python = _public_python()
    user = _image_user()
    venv = root_dir / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]

    # ---- build stage: its COPY lines, then its RUN line's pip wheel ----------------------
    src = root_dir / "src"
    src.mkdir()
    wheels = root_dir / "wheels"
    runs = []
    for op, args in build:
        if op == "COPY":
            _copy(args, src, ROOT)
        elif op == "RUN":
            runs.append(args)
    assert runs == ["pip wheel --no-cache-dir --wheel-dir /wheels ."], \
        f"the build stage's RUN changed; update this test: {runs}"
    subprocess.run([*pip, "wheel", "--wheel-dir", str(wheels), str(src)], check=True,
                   cwd=src, capture_output=True)
    ours = list(wheels.glob("streamcore-*.whl"))
    assert len(ours) == 1, list(wheels.iterdir())

    # ---- runtime stage: install the wheels, lay out /app, ENV, USER ----------------------
    subprocess.run([*pip, "install", *map(str, wheels.glob("*.whl"))], check=True,
                   capture_output=True)
    app = root_dir / "app"
    env: dict[str, str] = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(app)}
    image_user = entrypoint = cmd = healthcheck = None
    for op, args in runtime:
        if op == "WORKDIR":
            assert args == "/app", args
            app.mkdir()
        elif op == "COPY" and "--from=" not in args:
            _copy(args, app, ROOT)
            if "--chown=" in args and user is not None:
                _chown(app / shlex.split(args)[-1], user)
        elif op == "ENV":
            env.update(dict(kv.split("=", 1) for kv in shlex.split(args)))
        elif op == "USER":
            image_user = args
        elif op == "ENTRYPOINT":
            entrypoint = orjson.loads(args)
        elif op == "CMD":
            cmd = orjson.loads(args)
        elif op == "HEALTHCHECK":
            healthcheck = orjson.loads(args.split(" CMD ", 1)[1])
        elif op == "RUN":  # the runtime stage's commands on /app, as root
            for command in (shlex.split(c) for c in args.split("&&")):
                paths = [Path(a.replace("/app", str(app))) for a in command if "/app" in a]
                if command[:2] == ["mkdir", "-p"]:
                    for d in paths:
                        d.mkdir(parents=True, exist_ok=True)
                elif command[:2] == ["chown", "-R"] and user is not None:
                    for d in paths:
                        _chown(d, user)
    assert image_user and image_user != "root"
    assert entrypoint and entrypoint[:2] == ["tini", "--"], entrypoint
    assert cmd and healthcheck
    # The image's paths, moved under root_dir.
    env = {k: v.replace("/app", str(app)) for k, v in env.items()}
    assert env["STREAMCORE_STATE_DIR"] == str(app / "state")
    # No daemon, no network namespace: the image's port may be taken here.
    port = free_port()
    env["STREAMCORE_HTTP_PORT"] = str(port)
    healthcheck = [c.replace("9108", str(port)) for c in healthcheck]

    # ---- docker run <image> (ENTRYPOINT + CMD) --bootstrap <local broker> -----------------
    views, clicks, sections = unique("img-views"), unique("img-clicks"), unique("img-sections")
    make_topics(bootstrap, views, clicks, sections)
    env.update(PAGEVIEWS_TOPIC=views, CLICKS_TOPIC=clicks, SECTIONS_TOPIC=sections,
               DEMO_JOB=unique("img"))
    argv = [str(venv / "bin" / entrypoint[2]), *entrypoint[3:], *cmd, "--bootstrap", bootstrap]
    log = root_dir / "worker.log"
    run_as: dict[str, Any] = {} if user is None else {"user": user[0], "group": user[1],
                                                     "extra_groups": []}
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=app, env=env, stdout=out, stderr=subprocess.STDOUT,
                                **run_as)
        try:
            def healthy() -> bool:
                assert proc.poll() is None, f"the worker exited:\n{log.read_text()[-3000:]}"
                check = [str(venv / "bin" / healthcheck[0]), *healthcheck[1:]]
                return subprocess.run(check, env=env, capture_output=True,
                                      **run_as).returncode == 0

            wait_until(healthy, 60, "the HEALTHCHECK to pass")
            users = [f"u{i % 5}" if i % 7 else f"bot-{i}" for i in range(200)]
            produce(bootstrap, views, (
                (None, {"user": u, "url": "https://shop.example/item/42", "ts": 1}, None)
                for u in users))
            humans = sum(1 for u in users if not u.startswith("bot-"))
            assert len(read_topic(bootstrap, clicks, expect=humans, timeout=60)) == humans
            counts = read_topic(bootstrap, sections, expect=humans, timeout=60)
            assert max(orjson.loads(m.value()) for m in counts) == humans
            proc.send_signal(signal.SIGTERM)  # what tini passes on from `docker stop`
            assert proc.wait(60) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    # The count's store lives in the image's state directory, written by the image's user.
    stores = [p for p in (app / "state").rglob("*") if p.is_file()]
    assert stores, f"nothing under {app / 'state'}"
    if user is not None:
        assert all(p.stat().st_uid == user[0] for p in stores)
