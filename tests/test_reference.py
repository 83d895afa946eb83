"""Reference statistics: round trip, metadata checks, atomic writes, FID against a reference."""

import json

import numpy as np
import pytest
import torch

from fastgen.eval.fid import FeatureStats, frechet_distance, image_statistics
from fastgen.eval.reference import ReferenceMismatchError, load_reference, save_reference

METADATA = {"extractor": "pixels", "feature_layer": "flat", "feature_dim": 4, "resize": "none",
            "weights_sha256": "ab" * 32}


def make_stats(seed=0, count=20):
    stats = FeatureStats()
    stats.update(np.random.default_rng(seed).normal(size=(count, 4)))
    return stats


def test_round_trip(tmp_path):
    stats = make_stats()
    path = tmp_path / "nested" / "ref.npz"
    saved = save_reference(path, stats, METADATA)
    loaded = load_reference(path, **METADATA, num_images=20)
    np.testing.assert_array_equal(loaded.mu, stats.mean)
    np.testing.assert_array_equal(loaded.sigma, stats.cov)
    assert loaded.mu.dtype == loaded.sigma.dtype == np.float64
    assert loaded.metadata == saved.metadata == {**METADATA, "num_images": 20}
    assert [p.name for p in path.parent.iterdir()] == ["ref.npz"]


@pytest.mark.parametrize(
    "field, expected",
    [("extractor", "inception"), ("feature_layer", "pool3"), ("feature_dim", 2048), ("resize", "clean"),
     ("weights_sha256", "cd" * 32), ("num_images", 50000)],
)
def test_each_mismatch_names_field_stored_and_expected(tmp_path, field, expected):
    save_reference(tmp_path / "ref.npz", make_stats(), METADATA)
    stored = {**METADATA, "num_images": 20}[field]
    with pytest.raises(ReferenceMismatchError) as error:
        load_reference(tmp_path / "ref.npz", **{field: expected})
    assert str(error.value) == f"reference statistics: {field} is {stored!r}, expected {expected!r}"


def test_bad_expectations_and_bad_files(tmp_path):
    save_reference(tmp_path / "ref.npz", make_stats(), METADATA)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['resolution'\]"):
        load_reference(tmp_path / "ref.npz", resolution=299)
    with pytest.raises(FileNotFoundError, match="missing.npz does not exist"):
        load_reference(tmp_path / "missing.npz")
    np.savez(tmp_path / "foreign.npz", mu=np.zeros(4), sigma=np.eye(4))
    with pytest.raises(ValueError, match=r"lacks \['metadata'\]"):
        load_reference(tmp_path / "foreign.npz")
    np.savez(tmp_path / "old.npz", mu=np.zeros(4), sigma=np.eye(4), metadata=np.array(json.dumps({"extractor": "x"})))
    with pytest.raises(ValueError, match=r"metadata lacks \['feature_layer'"):
        load_reference(tmp_path / "old.npz")


def test_save_validates_metadata(tmp_path):
    with pytest.raises(ValueError, match=r"lacks \['resize'\] and has unknown \['size'\]"):
        save_reference(tmp_path / "ref.npz", make_stats(), {**{k: v for k, v in METADATA.items() if k != "resize"},
                                                            "size": 1})
    with pytest.raises(ValueError, match="feature_dim is 8, expected 4"):
        save_reference(tmp_path / "ref.npz", make_stats(), {**METADATA, "feature_dim": 8})
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "ref.npz"
    save_reference(path, make_stats(seed=1), METADATA)
    before = path.read_bytes()

    def broken_savez(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        save_reference(path, make_stats(seed=2), METADATA)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["ref.npz"]


class FlatExtractor:
    """A stand-in extractor: the first four pixel values, with reference metadata."""

    def __init__(self, resize="none"):
        self.resize = resize

    def __call__(self, images):
        return images.flatten(1)[:, :4].double()

    def metadata(self):
        return {**METADATA, "resize": self.resize}


def test_fid_against_reference_checks_the_extractor(tmp_path):
    generator = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (16, 3, 4, 4), generator=generator, dtype=torch.uint8)
    fake = torch.rand(12, 3, 4, 4, generator=generator) * 2 - 1
    extractor = FlatExtractor()
    reference = save_reference(tmp_path / "ref.npz", image_statistics(real, extractor), extractor.metadata())
    fake_stats = image_statistics(fake, extractor, value_range=(-1, 1))
    expected = frechet_distance(fake_stats.mean, fake_stats.cov, reference.mu, reference.sigma)
    assert reference.fid(fake, extractor, value_range=(-1, 1)) == pytest.approx(expected, rel=1e-12)
    assert expected > 0
    with pytest.raises(ReferenceMismatchError, match="resize is 'none', expected 'clean'"):
        reference.fid(fake, FlatExtractor(resize="clean"), value_range=(-1, 1))
