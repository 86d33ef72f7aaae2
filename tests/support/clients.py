"""Real clients driven from async tests without blocking the loop the mirror runs on."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


class CommandFailed(AssertionError):
    pass


async def run(*args: str, timeout: float = 180) -> str:
    process = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise CommandFailed(f"{args[0]} timed out after {timeout}s") from None
    if process.returncode != 0:
        raise CommandFailed(f"{' '.join(args)} failed ({process.returncode}):\n{err.decode()}")
    return out.decode()


async def skopeo(*args: str, timeout: float = 180) -> str:
    return await run("skopeo", "--insecure-policy", *args, timeout=timeout)


async def skopeo_copy_to_dir(source: str, target: Path, *extra: str) -> str:
    """`skopeo copy docker://source dir:target`; returns the digest of the manifest it wrote."""
    await skopeo("copy", "--src-tls-verify=false", *extra, f"docker://{source}", f"dir:{target}")
    return "sha256:" + hashlib.sha256((target / "manifest.json").read_bytes()).hexdigest()


@contextlib.contextmanager
def podman_command(root: Path) -> Iterator[list[str]]:
    """The podman command line with throwaway storage under `root` (vfs, no cgroups)."""
    runroot = Path(tempfile.mkdtemp(prefix="podman-", dir="/tmp"))  # podman wants it short
    try:
        yield [
            "podman",
            "--root", str(root),
            "--runroot", str(runroot),
            "--storage-driver", "vfs",
            "--cgroup-manager", "cgroupfs",
            "--events-backend", "file",
        ]  # fmt: skip
    finally:
        shutil.rmtree(runroot, ignore_errors=True)
