"""The evaluation geometry every scoring pass takes its views from (``data/preprocess.py``)."""
import torch

from cxrvit.data.preprocess import center_zoom, eval_transform, to_float


def _images(b=4, s=48, seed=0):
    return torch.randint(0, 256, (b, 1, s, s), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_eval_transform_resizes_whole_image():
    # Four flat quadrants of different grey: resized, every quadrant must still fill its quarter of the output
    # (a crop would lose three of them, a shifted resize would move the seams).
    grey = torch.tensor([[0, 60], [120, 250]], dtype=torch.uint8)
    x = grey.repeat_interleave(32, 0).repeat_interleave(32, 1).expand(4, 1, 64, 64)
    out = eval_transform(x, 32)
    assert out.shape == (4, 1, 32, 32) and 0 <= out.min() and out.max() <= 1
    # a 2x bilinear reduction blends only the two output columns/rows at each seam: 15 px per quadrant stay flat
    keep = [*range(15), *range(17, 32)]
    flat = out[:, :, keep][:, :, :, keep]
    expected = (grey.float() / 255).repeat_interleave(15, 0).repeat_interleave(15, 1).expand(4, 1, 30, 30)
    assert torch.allclose(flat, expected, atol=1e-6)


def test_eval_transform_at_the_model_size_is_only_the_scaling():
    x = _images(s=32)
    assert torch.equal(eval_transform(x, 32), x.float() / 255)


def test_center_zoom_keeps_the_middle():
    x = torch.zeros(1, 1, 40, 40)
    x[..., 2:38, 2:38] = 1.0  # a dark 2-px frame that a 90 % zoom (36 px) cuts away exactly
    out = center_zoom(to_float(x), 20, 0.9)
    assert out.shape == (1, 1, 20, 20) and torch.allclose(out, torch.ones_like(out), atol=1e-6)
