"""What every benchmark's result file shares: its header (machine, load, versions, date) and name.

Results are named ``<benchmark>-<device>-<preset>-<date>.json`` and written atomically into
``benchmarks/results/``; ``--quick`` runs (smoke tests of the benchmark itself, not measurements)
go to a temporary folder instead.
"""

import datetime
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

from verse_jax.io.files import write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
QUICK_RESULTS = Path(tempfile.gettempdir()) / "verse-jax-benchmarks"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name() -> str:
    """The JAX backend of the default device: ``cpu``, ``gpu`` or ``tpu``."""
    import jax

    return jax.default_backend()


def header(benchmark: str, preset: str, argv=None) -> dict:
    """The fields every result starts with.

    Args:
        benchmark: the script's name without ``.py``.
        preset: the configuration measured (e.g. ``paper``, ``demo``, ``quick``).
        argv: the command-line arguments (default ``sys.argv[1:]``).

    Returns:
        ``{"benchmark", "preset", "date" (UTC, ISO 8601), "command", "device", "machine" (cpus,
        processor, load averages), "versions" (python, jax, jaxlib, numpy, flax, verse-jax)}``.
    """
    import jax

    device = jax.devices()[0]
    args = sys.argv[1:] if argv is None else list(argv)
    return {
        "benchmark": benchmark,
        "preset": preset,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", f"benchmarks/{benchmark}.py", *args]),
        "device": f"{device.platform}:{device.device_kind}",
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "load_average": list(os.getloadavg()),
        },
        "versions": {
            "python": platform.python_version(),
            **{name: _version(name) for name in ("jax", "jaxlib", "numpy", "flax", "verse-jax")},
        },
    }


def result_path(benchmark: str, preset: str, *, quick: bool = False, out=None) -> Path:
    """``out`` if given, else ``<folder>/<benchmark>-<device>-<preset>-<date>.json`` in
    ``benchmarks/results`` (``quick``: a temporary folder)."""
    if out:
        return Path(out)
    day = datetime.datetime.now(datetime.UTC).date().isoformat()
    folder = QUICK_RESULTS if quick else RESULTS
    return folder / f"{benchmark}-{device_name()}-{preset}-{day}.json"


def write_result(path, result: dict, indent: int = 1) -> Path:
    """Writes ``result`` as JSON to ``path`` (atomic; the folder is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=indent, default=str, allow_nan=True) + "\n"
    write_text_atomic(path, text)
    return path
