"""Found in review of the bulk-jobs registry (audit/pace.py Peers): a
``bulk-jobs`` directory or file of another user, or a file system without
locks, made every paced verify, export and purge fail. Each failed before
the fix; now the job runs (alone, at worst)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from audit import pace as pace_module
from audit.pace import PEERS_DIR, Pace

# The server's user (uid 10001 in the image); here nobody.
SERVICE_UID = 65534
# A Python the service user may run (the venv's lives under /root).
PYTHON = "/usr/bin/python3"
PACE_PY = str(Path(pace_module.__file__).resolve())

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists(PYTHON),
    reason="runs a job as another user: needs root and a system Python",
)


@pytest.fixture
def service_data_dir() -> Iterator[Path]:
    """A data dir as deployed: mode 700, owned by the server's user."""
    base = Path(tempfile.mkdtemp(dir="/tmp"))
    os.chmod(base, 0o755)  # noqa: S103 - the server's user must reach its data dir below
    # pace.py where that user can read it (the checkout may be under /root).
    shutil.copy(PACE_PY, base / "pace.py")
    data = base / "data"
    data.mkdir(mode=0o700)
    os.chown(data, SERVICE_UID, SERVICE_UID)
    try:
        yield data
    finally:
        shutil.rmtree(base)


def as_service_user(data_dir: Path, code: str, *args: str) -> subprocess.Popen[str]:
    """A paced job of the server (its worker imports pace.py by path, as
    chain_walk.py and export_walk.py do), run as the server's user."""
    return subprocess.Popen(
        [
            PYTHON,
            "-c",
            "import runpy, sys; Pace = runpy.run_path(sys.argv[1])['Pace']\n" + code,
            str(data_dir.parent / "pace.py"),
            *args,
        ],
        user=SERVICE_UID,
        group=SERVICE_UID,
        extra_groups=[],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@needs_root
def test_a_bulk_jobs_dir_left_by_a_root_cli_run_does_not_break_the_servers_paced_jobs(
    service_data_dir: Path,
) -> None:
    """`videoconsult retention run` run once as root (bare metal with sudo,
    `docker exec -u root`) leaves <data_dir>/bulk-jobs behind, root's, mode
    700. Before this change the server's paced verify, export and purge did
    not touch it; now every one of them must still run (at worst unshared)."""
    peers = str(service_data_dir / PEERS_DIR)
    with Pace(0.1, peers=peers):  # the root CLI's purge
        pass
    job = as_service_user(
        service_data_dir, "p = Pace(0.1, peers=sys.argv[2]); print(p.part()); p.close()", peers
    )
    out, err = job.communicate(timeout=30)
    assert job.returncode == 0, err.strip().splitlines()[-1]
    assert out.strip() == "0.1"


@needs_root
def test_a_job_of_another_user_in_bulk_jobs_does_not_break_the_servers_count(
    service_data_dir: Path,
) -> None:
    """The server's paced job registered first (the directory is its user's);
    a purge by the command line as root registers beside it. The server's
    next count must go on (counting it or not), not raise."""
    peers = str(service_data_dir / PEERS_DIR)
    job = as_service_user(
        service_data_dir,
        "p = Pace(0.3, peers=sys.argv[2]); print('ready', flush=True); "
        "sys.stdin.readline(); print(p.part(), flush=True); p.close()",
        peers,
    )
    try:
        assert job.stdout is not None
        assert job.stdin is not None
        assert job.stdout.readline() == "ready\n"
        with Pace(0.3, peers=peers):  # the root CLI's purge, at work
            out, err = job.communicate("count\n", timeout=30)
    finally:
        job.kill()
    assert job.returncode == 0, err.strip().splitlines()[-1]
    assert float(out) == pytest.approx(0.15)


def test_a_data_dir_without_flock_neither_breaks_a_paced_job_nor_leaves_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system that refuses flock (ENOLCK: NFS mounted nolock, some
    FUSE and CIFS mounts): the job runs (unshared), and Peers leaves no
    hidden file behind (a hidden file is never removed by any count)."""
    import errno
    import fcntl

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    peers = tmp_path / PEERS_DIR
    raised: OSError | None = None
    try:
        Pace(0.1, peers=str(peers)).close()
    except OSError as err:
        raised = err
    assert (raised, os.listdir(peers)) == (None, [])
