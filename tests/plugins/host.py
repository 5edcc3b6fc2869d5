"""Building PluginHosts for unit tests, and installing the example plugin for a test session."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from lorag.config import Settings
from lorag.plugins.host import PluginHost, RequestHooks
from lorag.plugins.manager import add_plugin, load_plugins

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
EXAMPLE = ROOT / "examples" / "lorag-plugin-legal"


def make_host(plugins: dict[str, Any] | None = None, *, load: str = "", **plugin_settings: Any) -> PluginHost:
    """A host with built-ins, `plugins` (name -> object with hookimpls) and [plugins] settings.

    Entry points are off by default (load=""), so what is installed does not leak in.
    """
    settings = Settings.model_validate({"plugins": plugin_settings})
    loaded = load_plugins(settings.plugins.modules, load=load)
    for name, plugin in (plugins or {}).items():
        record = add_plugin(loaded, name, plugin)
        assert record.ok or record.error, record
    return PluginHost(loaded, settings.plugins)


def hooks_for(host: PluginHost, domain: str = "d", request_id: str = "req-1") -> RequestHooks:
    return host.for_request(request_id=request_id, domain=domain)


def run_stream(hooks: RequestHooks, chunks: list[str]) -> tuple[str, str | None]:
    """Feed chunks through a fresh output stream: (everything sent, block message)."""
    stream = hooks.output_stream()
    sent = "".join(stream.feed(chunk) for chunk in chunks)
    sent += stream.finish()
    return sent, stream.blocked


def example_plugin_installed() -> bool:
    return any(ep.name == "legal" for ep in metadata.entry_points(group="lorag"))


_installed_at: Path | None = None


def install_example_plugin(target: Path) -> Path | None:
    """Make the example plugin importable with its entry point, as `pip install` would.

    Installed in the environment (a developer may have): nothing to do, returns None.
    Otherwise pip installs it once per session (no network: --no-deps,
    --no-build-isolation) into `target`, which goes on sys.path here; the path is
    returned for the PYTHONPATH of servers you start.
    """
    global _installed_at
    if _installed_at is not None:
        return _installed_at
    if example_plugin_installed():
        return None
    source = target.parent / f"{target.name}-src"  # a copy: the build leaves files behind
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(source)],
        check=True, capture_output=True,
    )
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    _installed_at = target
    return target
