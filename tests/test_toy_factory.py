"""The tiny model factory's attention-temperature start."""
import torch

from training.toy.templates import vocabulary
from training.toy.models import build_components, qk_norm_parameters


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


def test_pretraining_trains_the_noise_levels_where_sampling_starts(tmp_path):
    """The toy sampler spends its first steps at sigma >= 0.88, where the layout of the picture is
    decided; the base's pretraining must draw those noise levels often (unshifted logit-normal: ~1 %)."""
    from training.flow import draw_sigmas_and_noise
    from training.schedule import sigma_schedule
    from training.toy.base import DEFAULT_RECIPE, pretrain_config

    cfg = pretrain_config(tmp_path, tmp_path, DEFAULT_RECIPE, progress=False)
    first_steps = sigma_schedule(DEFAULT_RECIPE["sample_steps"], 64, None)[:3]
    assert float(first_steps.min()) >= 0.85
    sigmas, _ = draw_sigmas_and_noise((1, 1, 1), 0, 0, range(4000), cfg.train.sigma_sampling,
                                      cfg.train.logit_mean, cfg.train.logit_std, cfg.train.sigma_shift)
    assert float((sigmas >= 0.9).float().mean()) >= 0.10
    assert cfg.train.mode == "full" and cfg.train.max_steps == DEFAULT_RECIPE["base_steps"]


def test_interrupted_vae_training_resumes_to_the_uninterrupted_weights(tmp_path):
    """Ctrl-C during the toy VAE saves its state; the next call ends with exactly the weights (and the
    random crops) of a run that was never interrupted."""
    import pytest
    from diffusers import AutoencoderKL

    from training.toy.models import toy_config, train_vae

    images = torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def fresh():
        torch.manual_seed(0)
        return AutoencoderKL.from_config(toy_config("vae"))

    whole = fresh()
    train_vae(whole, images, steps=6, batch_size=2, crop=16, progress=False)

    def stop_at_4(step):
        if step == 4:
            raise KeyboardInterrupt

    checkpoint = tmp_path / "vae.pt"
    cut = fresh()
    with pytest.raises(KeyboardInterrupt):
        train_vae(cut, images, steps=6, batch_size=2, crop=16, progress=False, checkpoint=checkpoint,
                  checkpoint_every=2, on_step=stop_at_4)
    assert torch.load(checkpoint, weights_only=True)["step"] == 4
    resumed = fresh()  # a new process: nothing but the checkpoint carries over
    stats = train_vae(resumed, images, steps=6, batch_size=2, crop=16, progress=False, checkpoint=checkpoint)
    assert stats["steps"] == 6
    assert all(torch.equal(p, whole.state_dict()[n]) for n, p in resumed.state_dict().items())
    with pytest.raises(ValueError, match="not 8; delete it"):
        train_vae(fresh(), images, steps=8, batch_size=2, crop=16, progress=False, checkpoint=checkpoint)
