"""FID: Fréchet distance closed forms and parity, streaming statistics, image sources, the Inception path."""

import hashlib
import pickle
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity
from PIL import Image
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.metric_fid import fid_statistics_to_metric

from fastgen.errors import InputError
from fastgen.eval.fid import FeatureStats, frechet_distance, image_features, image_statistics, to_uint8
from fastgen.eval.inception import (
    WEIGHTS_FILENAME,
    InceptionExtractor,
    InceptionWeightsNotFound,
    clean_resize,
    default_weights_path,
)
from fastgen.eval.kid import kid


def random_spd(rng, dim, rank=None):
    factor = rng.normal(size=(dim, rank or dim))
    return factor @ factor.T / dim + (0 if rank else 0.1 * np.eye(dim))


def scipy_fid(mu1, sigma1, mu2, sigma2):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean).real)


# --- Fréchet distance -------------------------------------------------------------------------------

def test_identical_statistics_give_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=32), random_spd(rng, 32)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def test_diagonal_covariances_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    a, b = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("c", [0.25, 2.0, 4.0])
def test_scaled_covariance_closed_form(c):
    # tr(S + cS - 2 (c S^2)^{1/2}) = (1 + c - 2 sqrt(c)) tr S = (1 - sqrt(c))^2 tr S, not (1 - c)^2 tr S;
    # (1 - c)^2 holds when the square root is scaled, i.e. for the pair (S, c^2 S).
    rng = np.random.default_rng(2)
    mu1, mu2, sigma = rng.normal(size=24), rng.normal(size=24), random_spd(rng, 24)
    mean_term = np.sum((mu1 - mu2) ** 2)
    expected = mean_term + (1 - np.sqrt(c)) ** 2 * np.trace(sigma)
    assert frechet_distance(mu1, sigma, mu2, c * sigma) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, sigma, mu2, c * sigma) != pytest.approx(mean_term + (1 - c) ** 2 * np.trace(sigma))
    squared = mean_term + (1 - c) ** 2 * np.trace(sigma)
    assert frechet_distance(mu1, sigma, mu2, c**2 * sigma) == pytest.approx(squared, rel=1e-9)


@pytest.mark.parametrize("num_samples, dim", [(5, 16), (3, 64)])
def test_rank_deficient_covariances_finite_and_match_scipy(num_samples, dim):
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(num_samples, dim)), rng.normal(size=(num_samples, dim)) + 0.5
    stats = [(z.mean(0), np.cov(z, rowvar=False)) for z in (x, y)]
    assert np.linalg.matrix_rank(stats[0][1]) < dim
    value = frechet_distance(*stats[0], *stats[1])
    assert np.isfinite(value)
    assert value == pytest.approx(scipy_fid(*stats[0], *stats[1]), rel=1e-6)


def test_parity_with_scipy_sqrtm_and_torch_fidelity():
    rng = np.random.default_rng(4)
    mu1, mu2 = rng.normal(size=64), rng.normal(size=64)
    sigma1, sigma2 = random_spd(rng, 64), random_spd(rng, 64)
    ours = frechet_distance(mu1, sigma1, mu2, sigma2)
    assert ours == pytest.approx(scipy_fid(mu1, sigma1, mu2, sigma2), rel=1e-6)
    theirs = fid_statistics_to_metric({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2}, verbose=False)
    assert ours == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)


@pytest.mark.parametrize(
    "args, field",
    [
        ((np.zeros((2, 2)), np.eye(2), np.zeros(2), np.eye(2)), "mu1"),
        ((np.zeros(2), np.eye(2), np.zeros(3), np.eye(2)), "mu2"),
        ((np.zeros(2), np.eye(3), np.zeros(2), np.eye(2)), "sigma1"),
        ((np.zeros(2), np.eye(2), np.zeros(2), np.full((2, 2), np.nan)), "sigma2 contains NaN"),
        ((np.zeros(2), np.triu(np.ones((2, 2))), np.zeros(2), np.eye(2)), "sigma1 differs from its transpose"),
    ],
)
def test_frechet_distance_bad_input_names_the_field(args, field):
    with pytest.raises(ValueError, match=field):
        frechet_distance(*args)


# --- streaming statistics -----------------------------------------------------------------------------

def test_streaming_statistics_equal_numpy_cov():
    rng = np.random.default_rng(5)
    features = rng.normal(size=(61, 7)) * rng.uniform(0.5, 2, 7) + 1e3  # large offset: a stability check
    stats = FeatureStats()
    start = 0
    for size in (1, 13, 2, 0, 40, 5):
        stats.update(torch.from_numpy(features[start:start + size]) if size == 13 else features[start:start + size])
        start += size
    assert stats.count == 61 and stats.mean.dtype == np.float64 and stats.cov.dtype == np.float64
    np.testing.assert_allclose(stats.mean, features.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(features, rowvar=False), rtol=1e-9, atol=1e-9)


def test_feature_stats_errors():
    stats = FeatureStats()
    with pytest.raises(ValueError, match="at least 1"):
        stats.mean
    stats.update(np.ones((1, 3)))
    with pytest.raises(ValueError, match="1 feature vectors seen, expected at least 2"):
        stats.cov
    with pytest.raises(ValueError, match="dimension 4, expected 3"):
        stats.update(np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"shape \(3,\), expected \(N, D\)"):
        stats.update(np.ones(3))


# --- image sources, with a cheap stand-in extractor ------------------------------------------------------

def pixel_extractor(images):
    assert images.dtype == torch.uint8 and images.shape[1] == 3
    return images.flatten(1)[:, ::7].double()


@pytest.fixture
def uint8_images():
    return torch.randint(0, 256, (10, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_float_images_need_an_explicit_range(uint8_images):
    minus_one_one = uint8_images.float() / 127.5 - 1
    zero_one = uint8_images.float() / 255
    assert torch.equal(to_uint8(minus_one_one, (-1, 1)), uint8_images)
    assert torch.equal(to_uint8(zero_one, (0, 1)), uint8_images)
    saturated_gray = to_uint8(torch.full((1, 1, 2, 2), 3.0), (0, 1))  # clamped, repeated to RGB
    assert torch.equal(saturated_gray, torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"value_range=None for torch.float32 images, expected \(low, high\)"):
        to_uint8(zero_one)
    with pytest.raises(ValueError, match=r"value_range=\(-1, 1\) for uint8 images"):
        to_uint8(uint8_images, (-1, 1))
    with pytest.raises(ValueError, match="dtype torch.int64"):
        to_uint8(uint8_images.long())
    with pytest.raises(ValueError, match=r"got \(10, 2, 8, 8\), expected a tensor \(N, 3, H, W\)"):
        to_uint8(uint8_images[:, :2])


def test_tensor_folder_and_generator_sources_agree(uint8_images, tmp_path):
    for index, image in enumerate(uint8_images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / f"{index:03d}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    reference = np.asarray(pixel_extractor(uint8_images))
    from_tensor = image_statistics(uint8_images.float() / 127.5 - 1, pixel_extractor, batch_size=3, value_range=(-1, 1))
    from_folder = image_statistics(tmp_path, pixel_extractor, batch_size=4)
    served = iter(uint8_images.split([3, 3, 3, 1]))
    from_generator = image_statistics(lambda n: next(served)[:n], pixel_extractor, batch_size=3, num_images=10)
    for stats in (from_tensor, from_folder, from_generator):
        assert stats.count == 10
        np.testing.assert_allclose(stats.mean, reference.mean(0), rtol=1e-12)
        np.testing.assert_allclose(stats.cov, np.cov(reference, rowvar=False), rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(image_features(str(tmp_path), pixel_extractor, num_images=4), reference[:4])


def test_folder_is_read_as_training_reads_it(uint8_images, tmp_path):
    """One folder reader for FID and training data: recursive, WEBP included, hidden files skipped."""
    from fastgen.data import find_images

    layout = ["a.png", "nested/b.webp", "nested/deeper/c.png", "d.jpg"]
    for index, name in enumerate(layout):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(uint8_images[index].permute(1, 2, 0).numpy())
        image.save(tmp_path / name, **({"lossless": True} if name.endswith(".webp") else {}))
    (tmp_path / ".hidden").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / ".hidden" / "skip.png")
    files = find_images(tmp_path)
    assert [f.relative_to(tmp_path).as_posix() for f in files] == sorted(layout)
    decoded = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files])
    features = image_features(tmp_path, pixel_extractor)
    np.testing.assert_array_equal(features, np.asarray(pixel_extractor(decoded)))
    assert features.shape[0] == 4


def test_image_source_errors(uint8_images, tmp_path):
    with pytest.raises(ValueError, match="num_images=None, expected a positive int for a generator"):
        image_statistics(lambda n: uint8_images[:n], pixel_extractor)
    with pytest.raises(ValueError, match="returned 2 images, expected 4"):
        image_statistics(lambda n: uint8_images[:2], pixel_extractor, batch_size=4, num_images=8)
    with pytest.raises(ValueError, match=r"num_images=11, expected an int in \[1, 10\]"):
        image_statistics(uint8_images, pixel_extractor, num_images=11)
    with pytest.raises(ValueError, match="batch_size=0"):
        image_statistics(uint8_images, pixel_extractor, batch_size=0)
    with pytest.raises(TypeError, match="got list"):
        image_statistics([1, 2], pixel_extractor)
    with pytest.raises(ValueError, match=r"holds no images; expected files ending in \.png, \.jpg"):
        image_statistics(tmp_path, pixel_extractor)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (9, 8)).save(tmp_path / "b.jpg")
    with pytest.raises(InputError, match=r"b.jpg is 8x9, expected 8x8 like a.png, the first image of its folder"):
        image_statistics(tmp_path, pixel_extractor)
    with pytest.raises(ValueError, match="value_range=.* for a folder"):
        image_statistics(tmp_path, pixel_extractor, value_range=(0, 1))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_statistics(tmp_path / "missing", pixel_extractor)
    (tmp_path / "b.jpg").write_text("not an image")  # a user's file, named on one line (was a bug's traceback)
    with pytest.raises(InputError, match=r"cannot read image .*b.jpg: cannot identify image file"):
        image_statistics(tmp_path, pixel_extractor)


# --- the Inception path (torch-fidelity's extractor) -----------------------------------------------------

class _ArchitectureOnly(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception with its weight loading skipped: the architecture, randomly initialised."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return None


@pytest.fixture(scope="module")
def one_torch_thread():
    """Inception on 2 shared cores: one intra-op thread is several times faster than two contending ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory, one_torch_thread):
    """A random state dict of the right architecture (plumbing only; He-initialised so features are O(1))."""
    folder = tmp_path_factory.mktemp("inception")
    torch.save({}, folder / "empty.pth")
    torch.manual_seed(0)
    network = _ArchitectureOnly("random", ["2048"], feature_extractor_weights_path=str(folder / "empty.pth"))
    for module in network.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(network.state_dict(), folder / WEIGHTS_FILENAME)
    return folder / WEIGHTS_FILENAME


@pytest.fixture(scope="module")
def random_inception(random_inception_weights):
    return InceptionExtractor(weights_path=random_inception_weights)


def image_pair():
    """Two small uint8 sets of distinct distributions (3 images each: Inception on CPU is slow)."""
    first = torch.randint(0, 256, (3, 3, 48, 48), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    return first, (first.float() * 0.6 + 40).to(torch.uint8)


@pytest.fixture(scope="module")
def random_inception_features(random_inception):
    return [image_features(images, random_inception, batch_size=3) for images in image_pair()]


def test_inception_features_and_resize_protocols(random_inception, random_inception_weights,
                                                 random_inception_features):
    first, _ = image_pair()
    clean = InceptionExtractor(weights_path=random_inception_weights, resize="clean")
    tf_stats, clean_stats = FeatureStats(), image_statistics(first, clean, batch_size=2)
    tf_stats.update(random_inception_features[0])
    for stats in (tf_stats, clean_stats):
        assert stats.count == 3 and stats.mean.shape == (2048,) and stats.cov.shape == (2048, 2048)
        assert stats.mean.dtype == np.float64 and np.isfinite(stats.cov).all() and stats.cov.any()
    assert not np.allclose(tf_stats.mean, clean_stats.mean, rtol=1e-3)
    assert random_inception.metadata() == {
        "extractor": random_inception.name, "feature_layer": "2048", "feature_dim": 2048, "resize": "tf",
        "weights_sha256": hashlib.sha256(random_inception_weights.read_bytes()).hexdigest(),
    }
    assert clean.metadata()["resize"] == "clean"


def test_clean_resize_makes_the_extractor_resize_a_no_op():
    images = torch.randint(0, 256, (2, 3, 20, 24), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    resized = clean_resize(images)
    assert resized.shape == (2, 3, 299, 299) and resized.dtype == torch.uint8
    as_float = resized.float()
    again = interpolate_bilinear_2d_like_tensorflow1x(as_float, size=(299, 299), align_corners=False)
    assert torch.equal(again, as_float)
    expected = Image.fromarray(images[1, 2].numpy().astype(np.float32)).resize((299, 299), Image.BICUBIC)
    np.testing.assert_array_equal(resized[1, 2].numpy(), np.rint(np.clip(np.asarray(expected), 0, 255)))


def test_missing_weights_name_the_file_and_the_option(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert default_weights_path() == tmp_path / "hub" / "checkpoints" / WEIGHTS_FILENAME
    with pytest.raises(InceptionWeightsNotFound, match=WEIGHTS_FILENAME) as error:
        InceptionExtractor()
    assert "--inception-weights PATH" in str(error.value) and str(default_weights_path()) in str(error.value)


class _Payload:
    pass


def test_pickled_objects_and_bad_resize_are_refused(tmp_path, random_inception_weights):
    torch.save({"payload": _Payload()}, tmp_path / "pickle.pth")
    with pytest.raises(InputError, match="pickle.pth cannot be read .*Weights only load failed") as info:
        InceptionExtractor(weights_path=tmp_path / "pickle.pth")
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)
    with pytest.raises(ValueError, match=r"resize='bicubic', expected one of \('tf', 'clean'\)"):
        InceptionExtractor(weights_path=random_inception_weights, resize="bicubic")


class _Images(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index]


def torch_fidelity_metrics(weights_path, fid):
    """``torch_fidelity.calculate_metrics`` on :func:`image_pair`; KID on subsets of 2 out of 3."""
    first, second = image_pair()
    return torch_fidelity.calculate_metrics(
        input1=_Images(first), input2=_Images(second), fid=fid, kid=True, kid_subset_size=2, kid_subsets=10,
        feature_extractor_weights_path=str(weights_path), save_cpu_ram=True, cache=False, verbose=False,
        cuda=False, batch_size=3,
    )


def assert_same_kid(features, theirs):
    ours = kid(features[0], features[1], subset_size=2, num_subsets=10)
    assert ours.mean > 0
    assert ours.mean == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-4)
    assert ours.std == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-3)


def test_pipeline_parity_with_torch_fidelity_on_random_weights(random_inception, random_inception_features):
    """Same uint8 images, network and resize: our features give torch-fidelity's KID (FID's 2048-d
    eigenproblem is left to the golden test: minutes on 2 shared cores; its math is tested above)."""
    assert_same_kid(random_inception_features, torch_fidelity_metrics(random_inception.weights_path, fid=False))


@pytest.mark.skipif(
    not default_weights_path().is_file(),
    reason=f"real Inception weights absent: place {WEIGHTS_FILENAME} in {default_weights_path().parent}",
)
def test_golden_against_torch_fidelity_with_real_weights():
    extractor = InceptionExtractor()
    features = [image_features(images, extractor, batch_size=3) for images in image_pair()]
    theirs = torch_fidelity_metrics(extractor.weights_path, fid=True)
    assert_same_kid(features, theirs)
    stats = [(f.mean(0), np.cov(f, rowvar=False)) for f in features]
    assert frechet_distance(*stats[0], *stats[1]) == pytest.approx(theirs["frechet_inception_distance"], rel=1e-4)
