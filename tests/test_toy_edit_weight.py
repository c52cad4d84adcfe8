"""The optional ``train.edit_weight`` loss weighting (training/flow.py): tokens that differ from
reference 1 count ``1 + edit_weight`` times; 0 is the plain flow-matching loss."""
from __future__ import annotations

import torch

from training.config import SFTConfig, load_config
from training.flow import edit_weights


def test_changed_tokens_get_the_extra_weight():
    ref = torch.zeros(2, 16, 8, 8)
    target = ref.clone()
    target[0, 3, 5, 2] = 2.0  # one latent pixel of sample 0: its 2x2 token is (rows 4-5, cols 2-3)
    target[1, 0, 0, 0] = 0.3  # below the threshold: not an edit
    w = edit_weights(target, ref, weight=3.0, threshold=0.5)
    assert w.shape == (2, 1, 8, 8)
    expected = torch.ones(2, 1, 8, 8)
    expected[0, 0, 4:6, 2:4] = 4.0
    assert torch.equal(w, expected)


def test_off_or_unaligned_means_the_plain_loss():
    ref, target = torch.zeros(1, 16, 8, 8), torch.ones(1, 16, 8, 8)
    assert edit_weights(target, ref, weight=0.0, threshold=0.5) is None
    assert edit_weights(target, torch.zeros(1, 16, 6, 8), weight=2.0, threshold=0.5) is None  # other aspect


def test_odd_latent_sizes_keep_their_shape():
    ref = torch.zeros(1, 16, 7, 9)
    target = ref.clone()
    target[0, 0, 5, 7] = 1.0  # token (rows 4-5, cols 6-7)
    target[0, 0, 6, 8] = 1.0  # the last, partial token: row 6, col 8 alone
    w = edit_weights(target, ref, weight=1.0, threshold=0.5)
    assert w.shape == (1, 1, 7, 9)
    assert int(w.sum()) == 63 + 4 + 1
    assert w[0, 0, 4, 6] == 2.0 and w[0, 0, 6, 8] == 2.0 and w[0, 0, 6, 7] == 1.0 and w[0, 0, 5, 8] == 1.0


def test_weighted_loss_with_equal_weights_is_the_mean():
    from training.flow import FlowMatchingModel

    class Echo(FlowMatchingModel):  # a fixed prediction instead of the transformer's
        def __init__(self):
            torch.nn.Module.__init__(self)

        def velocity(self, noisy, *args):
            return noisy * 0.5

    model = Echo()
    g = torch.Generator().manual_seed(0)
    target, noise = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)
    sigma = torch.tensor([0.3, 0.7])
    plain = model(target, None, None, None, sigma, noise)
    ones = model(target, None, None, None, sigma, noise, torch.ones(2, 1, 4, 4))
    assert torch.allclose(plain, ones, rtol=1e-6, atol=0)
    heavy = torch.ones(2, 1, 4, 4)
    heavy[:, :, 0, 0] = 100.0
    assert not torch.allclose(plain, model(target, None, None, None, sigma, noise, heavy))


def test_config_knobs_have_safe_defaults():
    cfg = SFTConfig()
    assert cfg.train.edit_weight == 0.0  # real Kontext trains with the plain loss
    assert load_config(None, ["train.edit_weight=2", "train.edit_threshold=0.25"]).train.edit_weight == 2.0
