"""jaxcrystal's converted-weights files (all three model kinds share the layout).

A file is one `.npz`: every parameter array under its '/'-joined Flax path (e.g. `params/conv_0/kernel`), plus
`__metadata__`, a JSON string whose `format` tag names the model kind (e.g. "jaxcrystal-cgcnn-v1"). Loading uses
`allow_pickle=False`: nothing in the file can execute.
"""

import io
import json
import zipfile

import numpy as np

from jaxcrystal.errors import CheckpointError


def read_weights_file(source, expected_format: str, name: str | None = None) -> tuple[dict, dict]:
    """(variables as nested dicts of numpy arrays, metadata) of a converted-weights file.

    Args:
      source: a path or a binary file object.
      expected_format: the `format` tag the metadata must carry.
      name: how to call the source in messages (default `str(source)`).

    Raises `CheckpointError` naming the file when it is unreadable, has no metadata, or holds another format.
    """
    name = name or str(source)
    try:
        with np.load(source, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
        metadata = json.loads(str(arrays.pop("__metadata__"))) if "__metadata__" in arrays else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{name}: cannot read converted weights ({exc})") from exc
    if metadata is None:
        raise CheckpointError(f"{name}: no '__metadata__' entry; not a jaxcrystal weights file")
    found = metadata.get("format") if isinstance(metadata, dict) else None
    if found != expected_format:
        raise CheckpointError(f"{name}: format {found!r} is not {expected_format!r}")
    variables: dict = {}
    for key, value in arrays.items():
        *parents, leaf = key.split("/")
        node = variables
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return variables, metadata


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested dict of arrays -> {"a/b/c": array}, keys sorted."""
    out = {}
    for key in sorted(tree):
        value, path = tree[key], f"{prefix}{key}"
        out.update(flatten(value, path + "/") if isinstance(value, dict) else {path: value})
    return out


def weights_bytes(variables: dict, metadata: dict) -> bytes:
    """The bytes of a converted-weights file; they depend only on the arrays and the metadata.

    A standard `.npz` (readable by `np.load`): sorted members, no compression, fixed timestamps and attributes, the
    metadata as JSON with sorted keys, so a conversion is reproducible bit for bit.
    """
    arrays = flatten(variables)
    arrays["__metadata__"] = np.array(json.dumps(metadata, sort_keys=True))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for key in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.create_system = 3
            info.external_attr = 0o644 << 16
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()
