"""AdversarialStep against the official iteration written out by hand (train_adv.py's order)."""

import copy

import pytest
import torch

from fada_core import AdversarialStep, FineGrainedAdversary, FineGrainedDiscriminator, UpsampledCrossEntropy

K = 3


class Segmenter(torch.nn.Module):
    """Feature extractor + classifier; forward gives (features, low-resolution logits)."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4, padding=1), torch.nn.ReLU())
        self.classifier = torch.nn.Conv2d(8, K, 1)

    def forward(self, x):
        f = self.features(x)
        return f, self.classifier(f)


def _setup(seed=0):
    torch.manual_seed(seed)
    model = Segmenter()
    D = FineGrainedDiscriminator(8, K, ndf=16)
    opt_fea = torch.optim.SGD(model.features.parameters(), lr=0.1, momentum=0.9)
    opt_cls = torch.optim.SGD(model.classifier.parameters(), lr=1.0, momentum=0.9)
    opt_D = torch.optim.Adam(D.parameters(), lr=1e-2, betas=(0.9, 0.99))
    return model, D, (opt_fea, opt_cls), opt_D


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, 32, 40, generator=g), torch.randint(0, K, (2, 32, 40), generator=g),
            torch.randn(2, 3, 36, 28, generator=g))


def _by_hand(model, D, opts, opt_D, x_s, y_s, x_t, drop_d_grads=True, scaler=None):
    """train_adv.py's iteration, step by step."""
    scale = (lambda loss: loss) if scaler is None else scaler.scale
    step = (lambda opt: opt.step()) if scaler is None else scaler.step
    adv = FineGrainedAdversary(D, K, backend="eager")
    seg_loss = UpsampledCrossEntropy(1.8, backend="eager")
    for opt in (*opts, opt_D):
        opt.zero_grad()
    f_s, z_s = model(x_s)
    scale(seg_loss(z_s, y_s)).backward()
    f_t, z_t = model(x_t)
    scale(adv.generator_loss(f_t, z_t, x_t.shape[-2:])).backward()
    for opt in opts:
        step(opt)
    if drop_d_grads:
        opt_D.zero_grad()
    scale(adv.discriminator_loss(f_s, z_s, x_s.shape[-2:], f_t, z_t, x_t.shape[-2:])).backward()
    step(opt_D)
    if scaler is not None:
        scaler.update()


def _params(*modules):
    return [p.detach().clone() for m in modules for p in m.parameters()]


def _helper_run(scaler=None, iterations=2):
    model, D, opts, opt_D = _setup()
    step = AdversarialStep(model, FineGrainedAdversary(D, backend="eager"), opts, opt_D, scaler=scaler)
    for i in range(iterations):
        losses = step(*_batch(i))
    return model, D, losses


def test_same_parameters_as_the_official_iteration():
    model, D, losses = _helper_run()
    ref_model, ref_D, ref_opts, ref_opt_D = _setup()
    for i in range(2):
        _by_hand(ref_model, ref_D, ref_opts, ref_opt_D, *_batch(i))
    for got, want in zip(_params(model, D), _params(ref_model, ref_D)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert all(v.dim() == 0 and not v.requires_grad and torch.isfinite(v) for v in losses)

    # the check can fail: keeping the generator step's D gradients changes D
    kept_model, kept_D, kept_opts, kept_opt_D = _setup()
    for i in range(2):
        _by_hand(kept_model, kept_D, kept_opts, kept_opt_D, *_batch(i), drop_d_grads=False)
    assert not all(torch.equal(a, b) for a, b in zip(_params(D), _params(kept_D)))


def test_features_classifier_pair_matches_and_keeps_no_target_logit_graph():
    """model=(features, classifier): the same updates as the callable form, and the target logits
    (only the detached soft labels need them) are computed without autograd."""
    model, D, losses = _helper_run()
    pair_model, pair_D, opts, opt_D = _setup()
    graphs = []
    pair_model.classifier.register_forward_hook(lambda module, args, out: graphs.append(out.requires_grad))
    step = AdversarialStep((pair_model.features, pair_model.classifier), FineGrainedAdversary(pair_D, backend="eager"),
                           opts, opt_D)
    for i in range(2):
        pair_losses = step(*_batch(i))
    assert graphs == [True, False] * 2  # source logits with a graph, target logits without
    for got, want in zip(_params(pair_model, pair_D), _params(model, D)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.stack(pair_losses), torch.stack(losses), rtol=1e-6, atol=1e-7)


def test_with_a_grad_scaler():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    model, D, _ = _helper_run(scaler=scaler)
    ref_model, ref_D, ref_opts, ref_opt_D = _setup()
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for i in range(2):
        _by_hand(ref_model, ref_D, ref_opts, ref_opt_D, *_batch(i), scaler=ref_scaler)
    for got, want in zip(_params(model, D), _params(ref_model, ref_D)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert scaler.get_scale() == ref_scaler.get_scale()


def test_separate_discriminator_scaler_and_gradient_hook():
    """Two scalers (as the examples' trainer), and a hook between D's backward and its step."""
    model, D, opts, opt_D = _setup()
    scaler, scaler_d = torch.amp.GradScaler("cpu", init_scale=2.0**8), torch.amp.GradScaler("cpu", init_scale=2.0**4)
    seen = []

    def hook():  # e.g. an all-reduce; here one gradient zeroed, which Adam turns into no update
        seen.append(all(p.grad is not None for p in D.parameters()))
        D.source_head.weight.grad.zero_()

    initial = D.source_head.weight.detach().clone()

    step = AdversarialStep(model, FineGrainedAdversary(D, backend="eager"), opts, opt_D, scaler=scaler,
                           discriminator_scaler=scaler_d, on_discriminator_gradients=hook)
    step(*_batch(0))
    assert seen == [True] and torch.equal(D.source_head.weight, initial)  # the hook ran before the step

    ref_model, ref_D, ref_opts, ref_opt_D = _setup()
    ref_g, ref_d = torch.amp.GradScaler("cpu", init_scale=2.0**8), torch.amp.GradScaler("cpu", init_scale=2.0**4)
    adv, seg_loss = FineGrainedAdversary(ref_D, backend="eager"), UpsampledCrossEntropy(1.8, backend="eager")
    x_s, y_s, x_t = _batch(0)
    for opt in (*ref_opts, ref_opt_D):
        opt.zero_grad()
    f_s, z_s = ref_model(x_s)
    ref_g.scale(seg_loss(z_s, y_s)).backward()
    f_t, z_t = ref_model(x_t)
    ref_g.scale(adv.generator_loss(f_t, z_t, x_t.shape[-2:])).backward()
    for opt in ref_opts:
        ref_g.step(opt)
    ref_g.update()
    ref_opt_D.zero_grad()
    ref_d.scale(adv.discriminator_loss(f_s, z_s, x_s.shape[-2:], f_t, z_t, x_t.shape[-2:])).backward()
    ref_D.source_head.weight.grad.zero_()
    ref_d.step(ref_opt_D)
    ref_d.update()
    for got, want in zip(_params(model, D), _params(ref_model, ref_D)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_bf16_autocast_runs_and_returns_float32_losses():
    model, D, opts, opt_D = _setup()
    before = _params(model, D)
    step = AdversarialStep(model, FineGrainedAdversary(D, backend="eager"), opts, opt_D,
                           autocast_dtype=torch.bfloat16)
    losses = step(*_batch())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses)
    assert all(not torch.equal(a, b) for a, b in zip(before, _params(model, D)))


def test_arguments_checked():
    model, D, opts, opt_D = _setup()
    adv = FineGrainedAdversary(D)
    with pytest.raises(TypeError, match="adversary must be a FineGrainedAdversary"):
        AdversarialStep(model, D, opts, opt_D)
    with pytest.raises(TypeError, match="discriminator_optimizer"):
        AdversarialStep(model, adv, opts, None)
    with pytest.raises(TypeError, match="optimizer must be"):
        AdversarialStep(model, adv, [], opt_D)
    with pytest.raises(ValueError, match="autocast_dtype"):
        AdversarialStep(model, adv, opts, opt_D, autocast_dtype=torch.float64)
    with pytest.raises(TypeError, match="model must be a callable"):
        AdversarialStep((model.features,), adv, opts, opt_D)


def test_default_seg_loss_follows_the_adversary():
    model, D, opts, opt_D = _setup()
    step = AdversarialStep(model, FineGrainedAdversary(D, backend="eager", align_corners=False), opts, opt_D)
    assert (step.seg_loss.temperature, step.seg_loss.backend, step.seg_loss.align_corners) == (1.8, "eager", False)
    assert copy.deepcopy(step.seg_loss).temperature == 1.8
