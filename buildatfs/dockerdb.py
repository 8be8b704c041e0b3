"""Docker's image metadata inside a store: images, their layers, layer directories.

When a store is mounted as a dockerd data-root, Docker keeps there, for its
storage driver DRIVER (overlay2, or vfs as the fallback)::

    image/DRIVER/repositories.json               {"Repositories": {repo: {ref: image id}}}
    image/DRIVER/imagedb/content/sha256/ID       the image config: rootfs.diff_ids
    image/DRIVER/layerdb/sha256/CHAIN/cache-id   the layer's directory name
    overlay2/CACHE/diff                          a layer's files (overlay2)
    vfs/dir/CACHE                                a layer's files (vfs)

The chain id of a layer names it together with every layer below it:
chain[0] = diff_id[0], chain[n] = sha256(chain[n-1] + " " + diff_id[n]).
Everything is read through the index (paths.Tree and paths.read_data_sync),
so this works on an unmounted store. Damaged or missing pieces of Docker's
metadata leave an image out, or a layer without a directory, never an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import Any, Final

import lmdb

from buildatfs.errors import ChunkError
from buildatfs.paths import Tree, read_data_sync
from buildatfs.store import Store

log = logging.getLogger(__name__)

META_LIMIT: Final = 16 * 1024 * 1024
# Where each driver keeps a layer's files, relative to the data-root.
LAYER_DIRS: Final = {"overlay2": "overlay2/{}/diff", "vfs": "vfs/dir/{}"}


@dataclasses.dataclass
class Layer:
    chain_id: str
    cache_id: str | None
    inode: int | None  # the layer's directory in the store, if found


@dataclasses.dataclass
class Image:
    image_id: str  # "sha256:<hex>"
    driver: str
    tags: list[str]
    layers: list[Layer]


def chain_ids(diff_ids: list[str]) -> list[str]:
    """Return the chain id of each layer of an image with these diff ids."""
    chains: list[str] = []
    for diff_id in diff_ids:
        if not chains:
            chains.append(diff_id)
        else:
            digest = hashlib.sha256(f"{chains[-1]} {diff_id}".encode()).hexdigest()
            chains.append(f"sha256:{digest}")
    return chains


def find_images(store: Store, txn: lmdb.Transaction, tree: Tree) -> list[Image] | None:
    """Return the images of the Docker data-root at the top of the store.

    None if the top holds no ``image/DRIVER`` directory for a known driver.
    Reads the metadata files' chunks from the packs (blocking).
    """
    image_root = tree.resolve(b"image")
    if image_root is None:
        return None
    drivers = [d for d in LAYER_DIRS if d.encode() in tree.children(image_root)]
    if not drivers:
        return None
    images = []
    for driver in drivers:
        images += _driver_images(store, txn, tree, driver)
    return images


def _driver_images(store: Store, txn: lmdb.Transaction, tree: Tree, driver: str) -> list[Image]:
    base = f"image/{driver}"
    tags = _tags(_read_json(store, txn, tree, f"{base}/repositories.json") or {})
    content = tree.resolve(f"{base}/imagedb/content/sha256")
    images = []
    for name in sorted(tree.children(content) if content is not None else {}):
        image_id = "sha256:" + name.decode(errors="replace")
        config = _read_json(store, txn, tree, f"{base}/imagedb/content/sha256/{name.decode()}")
        if not isinstance(config, dict):
            continue
        diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
        layers = []
        for chain in chain_ids([str(d) for d in diff_ids]):
            layers.append(_layer(store, txn, tree, driver, chain))
        images.append(Image(image_id, driver, sorted(tags.get(image_id, [])), layers))
    return images


def _layer(store: Store, txn: lmdb.Transaction, tree: Tree, driver: str, chain: str) -> Layer:
    hex_id = chain.partition(":")[2]
    raw = _read(store, txn, tree, f"image/{driver}/layerdb/sha256/{hex_id}/cache-id")
    if raw is None:
        return Layer(chain, None, None)
    cache_id = raw.decode(errors="replace").strip()
    inode = tree.resolve(LAYER_DIRS[driver].format(cache_id))
    return Layer(chain, cache_id, inode)


def _tags(repositories: Any) -> dict[str, list[str]]:
    """Map image id -> references from Docker's repositories.json."""
    tags: dict[str, list[str]] = {}
    repos = repositories.get("Repositories") if isinstance(repositories, dict) else None
    for refs in (repos or {}).values():
        if not isinstance(refs, dict):
            continue
        for ref, image_id in refs.items():
            if "@" not in ref:  # digests repeat the tags' images
                tags.setdefault(str(image_id), []).append(str(ref))
    return tags


def _read(store: Store, txn: lmdb.Transaction, tree: Tree, path: str) -> bytes | None:
    inode = tree.resolve(path)
    if inode is None:
        return None
    try:
        return read_data_sync(store, txn, inode, limit=META_LIMIT)
    except (KeyError, ValueError, ChunkError) as exc:
        log.warning(
            "Cannot read Docker's %s from the store (%s); run `buildatfs scrub`.", path, exc
        )
        return None


def _read_json(store: Store, txn: lmdb.Transaction, tree: Tree, path: str) -> Any:
    raw = _read(store, txn, tree, path)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        log.warning("Docker's %s in the store is not valid JSON; it is left out.", path)
        return None
