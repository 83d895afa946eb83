"""Reference statistics for FID (Heusel et al. 2017): ``mu``, ``sigma`` and what makes them comparable.

A ``.npz`` file holds ``mu`` (D,), ``sigma`` (D, D) in float64 and ``metadata``, a JSON string with
:data:`METADATA_FIELDS`: the extractor's name, its feature layer and dimension, the resize protocol, the
sha256 of its weights file and the number of images. Statistics of another extractor, layer, resize or
weights give a different FID scale, so loading with expectations, and :meth:`ReferenceStats.fid`,
refuse any mismatch with an error naming the field, the stored value and the expected one (torch-
fidelity's cache keys ignore all of these). Files are written atomically (temporary file, then rename).
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastgen.atomic import atomic_path
from fastgen.errors import InputError, MissingPathError
from fastgen.eval.fid import FeatureStats, frechet_distance, image_statistics

EXTRACTOR_FIELDS = ("extractor", "feature_layer", "feature_dim", "resize", "weights_sha256")
METADATA_FIELDS = EXTRACTOR_FIELDS + ("num_images",)


class ReferenceMismatchError(InputError):
    """Reference statistics were made under another protocol than the one asked for."""


@dataclass(frozen=True)
class ReferenceStats:
    mu: np.ndarray
    sigma: np.ndarray
    metadata: dict

    def check(self, **expected) -> None:
        """Raise :class:`ReferenceMismatchError` on the first field whose stored value differs."""
        unknown = sorted(set(expected) - set(METADATA_FIELDS))
        if unknown:
            raise ValueError(f"reference expectations: unknown field(s) {unknown}, expected some of {METADATA_FIELDS}")
        for field, value in expected.items():
            if self.metadata[field] != value:
                raise ReferenceMismatchError(
                    f"reference statistics: {field} is {self.metadata[field]!r}, expected {value!r}"
                )

    def fid(self, images, extractor, batch_size: int = 50, value_range=None, num_images: int | None = None,
            progress: bool = False) -> float:
        """FID of ``images`` against this reference, after checking ``extractor.metadata()`` matches."""
        self.check(**{k: v for k, v in extractor.metadata().items() if k in EXTRACTOR_FIELDS})
        stats = image_statistics(images, extractor, batch_size, value_range, num_images, progress)
        return frechet_distance(stats.mean, stats.cov, self.mu, self.sigma)


def save_reference(path: str | os.PathLike, stats: FeatureStats, metadata: dict) -> ReferenceStats:
    """Write ``stats`` with ``metadata`` (the :data:`EXTRACTOR_FIELDS`, e.g. ``extractor.metadata()``)."""
    missing = [field for field in EXTRACTOR_FIELDS if field not in metadata]
    extra = sorted(set(metadata) - set(EXTRACTOR_FIELDS))
    if missing or extra:
        raise ValueError(f"save_reference: metadata lacks {missing} and has unknown {extra}, "
                         f"expected exactly {EXTRACTOR_FIELDS}")
    if metadata["feature_dim"] != stats.dim:
        raise ValueError(f"save_reference: metadata feature_dim is {metadata['feature_dim']!r}, "
                         f"expected {stats.dim} (the dimension of stats)")
    reference = ReferenceStats(stats.mean, stats.cov, {**metadata, "num_images": stats.count})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        np.savez(handle, mu=reference.mu, sigma=reference.sigma,
                 metadata=np.array(json.dumps(reference.metadata, sort_keys=True)))
    return reference


def load_reference(path: str | os.PathLike, **expected) -> ReferenceStats:
    """Read reference statistics; every keyword (a :data:`METADATA_FIELDS` name) must match the stored value."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"reference statistics: {path} does not exist")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise InputError(f"reference statistics: {path} cannot be read ({err}); expected a .npz written by "
                         "fastgen.eval.reference.save_reference") from err
    with data:
        missing = [key for key in ("mu", "sigma", "metadata") if key not in data.files]
        if missing:
            raise InputError(f"reference statistics: {path} lacks {missing}, expected mu, sigma and metadata "
                             f"(written by fastgen.eval.reference.save_reference)")
        reference = ReferenceStats(data["mu"], data["sigma"], json.loads(str(data["metadata"])))
    absent = [field for field in METADATA_FIELDS if field not in reference.metadata]
    if absent:
        raise InputError(f"reference statistics: {path} metadata lacks {absent}, expected {METADATA_FIELDS}")
    reference.check(**expected)
    return reference
