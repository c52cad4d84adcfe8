"""The tiny model factory's attention-temperature start."""
import torch

from training.toy.templates import vocabulary
from training.toy_models import build_components, qk_norm_parameters


def test_qk_norm_init_sets_every_query_key_norm_and_nothing_else():
    plain = build_components(vocabulary(), seed=3)["transformer"]
    warm = build_components(vocabulary(), seed=3, qk_norm_init=2.0)["transformer"]
    norms = qk_norm_parameters(warm)
    # Both streams of the double blocks (4 norms each) and the single blocks (2 each).
    assert len(norms) == 4 * 2 + 2 * 2
    assert all(torch.equal(p, torch.full_like(p, 2.0)) for p in norms.values())
    assert all(torch.equal(p, torch.ones_like(p)) for p in qk_norm_parameters(plain).values())
    other = {n: p for n, p in warm.state_dict().items() if n not in norms}
    assert all(torch.equal(p, plain.state_dict()[n]) for n, p in other.items())
