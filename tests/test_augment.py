"""augment.py: every RandAugment op keeps the shape and the [0, 1] range and is the identity at
magnitude 0 where it has a magnitude; equalize equals PIL's; mixup/cutmix keep soft targets."""
import numpy as np
import pytest
import torch

from augment import RANDAUG_OPS, mixup_cutmix, rand_augment, smooth_one_hot

# the ops that ignore the level: they change an image at any magnitude
NO_MAGNITUDE = {"autocontrast", "equalize", "invert"}


def images(b=6, c=3, size=16, seed=0):
    """[0, 1] images on the uint8 grid (what the datasets give), with a black and a white pixel."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, c, size, size), generator=g).float() / 255
    x[:, :, 0, 0], x[:, :, 0, 1] = 0.0, 1.0
    return x


def test_timm_op_list():
    assert set(RANDAUG_OPS) == {
        "autocontrast", "equalize", "invert", "rotate", "posterize", "solarize", "solarize_add",
        "color", "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x",
        "translate_y"}


@pytest.mark.parametrize("name", sorted(RANDAUG_OPS))
@pytest.mark.parametrize("channels", [1, 3])
def test_op_keeps_shape_and_range(name, channels):
    x = images(c=channels)
    for level in (0.0, 0.3, 1.0):
        for sign in (-1.0, 1.0):
            out = RANDAUG_OPS[name](x, torch.full((6,), level), torch.full((6,), sign))
            assert out.shape == x.shape and out.dtype == x.dtype, (name, level)
            assert out.min() >= 0 and out.max() <= 1, (name, level, sign, out.min(), out.max())


@pytest.mark.parametrize("name", sorted(set(RANDAUG_OPS) - NO_MAGNITUDE))
def test_op_is_identity_at_magnitude_zero(name):
    x = images()
    for sign in (-1.0, 1.0):
        out = RANDAUG_OPS[name](x, torch.zeros(6), torch.full((6,), sign))
        torch.testing.assert_close(out, x, rtol=0, atol=1e-6)
    # and not the identity at full magnitude (so the test above can fail)
    assert not torch.allclose(RANDAUG_OPS[name](x, torch.ones(6), torch.ones(6)), x, atol=1e-3)


def test_ops_without_magnitude_change_the_image():
    x = images() * 0.5 + 0.25  # a low-contrast image: autocontrast and equalize stretch it
    for name in NO_MAGNITUDE:
        assert not torch.allclose(RANDAUG_OPS[name](x, torch.zeros(6), torch.ones(6)), x, atol=1e-3)


def test_equalize_equals_pil():
    Image = pytest.importorskip("PIL.Image")
    ImageOps = pytest.importorskip("PIL.ImageOps")
    rng = np.random.default_rng(0)
    # skewed histograms (gamma), a constant image (PIL leaves it alone), one grey level + one pixel
    arrays = [(255 * rng.random((3, 20, 24)) ** 3).astype(np.uint8),
              np.full((3, 20, 24), 77, np.uint8),
              np.where(rng.random((3, 20, 24)) < 0.999, 40, 200).astype(np.uint8)]
    for a in arrays:
        x = torch.from_numpy(a).float()[None] / 255
        ours = (RANDAUG_OPS["equalize"](x, torch.zeros(1), torch.ones(1))[0] * 255).round().byte()
        pil = np.asarray(ImageOps.equalize(Image.fromarray(a.transpose(1, 2, 0)))).transpose(2, 0, 1)
        np.testing.assert_array_equal(ours.numpy(), pil)


def test_rand_augment_keeps_range_and_is_seeded():
    x = images(b=32)
    a = rand_augment(x, np.random.default_rng(5), 2, 9)
    b = rand_augment(x, np.random.default_rng(5), 2, 9)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, x)


def test_mixup_cutmix_targets_sum_to_one():
    rng = np.random.default_rng(0)
    x = torch.randn(8, 3, 16, 16)
    targets = smooth_one_hot(torch.arange(8) % 5, 5, 0.1)
    for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0), (0.8, 1.0)):
        for _ in range(10):
            mixed, t = mixup_cutmix(x, targets, rng, mixup, cutmix)
            assert mixed.shape == x.shape
            torch.testing.assert_close(t.sum(1), torch.ones(8))
            assert (t >= 0).all()
