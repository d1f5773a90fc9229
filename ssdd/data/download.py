"""Explicit downloads of the official dataset files (only ever run by ``ssdd datasets --download NAME`` or
``load_dataset(..., download=True)``), each checked against its published MD5 before it is kept."""

from __future__ import annotations

import hashlib
import http.client
import shutil
import urllib.request
from pathlib import Path

from ssdd.errors import DataError
from ssdd.io import atomic_path
from ssdd.progress import progress_bar


def download_file(url: str, dest: Path, md5: str) -> None:
    """Stream ``url`` to ``dest`` with a progress bar; ``dest`` appears only once the whole file has arrived with
    the MD5 ``md5`` (a broken or altered download leaves nothing behind)."""
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, atomic_path(dest) as tmp:
            total = int(response.headers.get("Content-Length") or 0) or None
            with open(tmp, "wb") as fh, progress_bar(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
                while chunk := response.read(1 << 20):
                    fh.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            if digest.hexdigest() != md5:
                raise DataError(f"download of {url} has MD5 {digest.hexdigest()}, not the published {md5}; nothing "
                                f"was kept: try again, or fetch it by hand into {dest}")
    except (OSError, http.client.HTTPException) as exc:
        raise DataError(f"download of {url} failed ({exc}); fetch it by hand into {dest}") from None


def download_dataset(spec, root: Path) -> None:  # noqa: ANN001 - DatasetSpec (import cycle)
    """Fetch every official file of ``spec`` that is not yet under ``root``."""
    if not spec.downloads:
        from ssdd.data.catalog import DATASETS

        public = ", ".join(name for name in DATASETS.names() if DATASETS.get(name).downloads)
        raise DataError(f"dataset {spec.name!r} has no public download (these have: {public}); put a copy under {root}")
    existing = next(p for p in (root, *root.parents) if p.exists())
    if shutil.disk_usage(existing).free < 1 << 30:
        raise DataError(f"less than 1 GiB free under {root}; free some space before downloading {spec.name}")
    for url, name, md5 in spec.downloads:
        dest = root / name
        if not dest.exists():
            download_file(url, dest, md5)
