"""Official FADA checkpoints and ImageNet files: key layouts, strict loading, and predictions
identical to the official test.py inference (tests/official_fada_models.py transcribes it)."""
import os
import sys

import pytest
import torch

from fada_examples import models as M
from fada_examples.evaluation import predict_probabilities

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
import official_fada_models as O  # noqa: E402

K = 5


def _randomise(module, seed):
    """Random weights and BN statistics, so that a wrong mapping cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith(("running_mean", "bias")):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            elif t.dim() == 1:  # BN weight
                t.copy_(0.5 + 0.5 * torch.rand(t.shape, generator=g))
            else:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / fan_in) ** 0.5)


def _official_checkpoint(path, backbone, freeze_bn, seed=0, prefix="module."):
    fe = O.OfficialResNetFeatures(freeze_bn) if backbone == "resnet101" else O.OfficialVGGFeatures()
    clf = O.OfficialASPP(M.feature_channels(backbone), K)
    d = O.OfficialPixelDiscriminator(M.feature_channels(backbone), 16, K)
    for i, m in enumerate((fe, clf, d)):
        _randomise(m, seed + i)
    fe.eval(), clf.eval(), d.eval()
    state = {"iteration": 7,
             "feature_extractor": {prefix + k: v for k, v in fe.state_dict().items()},
             "classifier": {prefix + k: v for k, v in clf.state_dict().items()},
             "model_D": {prefix + k: v for k, v in d.state_dict().items()}}
    torch.save(state, path)
    return fe, clf, d


def _cfg(backbone, freeze_bn):
    return {"model": {"backbone": backbone, "num_classes": K, "freeze_bn": freeze_bn}}


@pytest.mark.parametrize("backbone,freeze_bn", [("resnet101", True), ("resnet101", False), ("vgg16", True)])
def test_official_checkpoint_predicts_as_official_test_py(tmp_path, backbone, freeze_bn):
    path = tmp_path / "official.pth"
    fe_o, clf_o, _ = _official_checkpoint(path, backbone, freeze_bn, prefix="module." if freeze_bn else "")
    fe, clf, cfg = M.load_checkpoint_models(str(path), "cpu", _cfg(backbone, freeze_bn))
    assert cfg["model"]["backbone"] == backbone
    torch.manual_seed(1)
    image = torch.randn(1, 3, 41, 57)
    label = torch.zeros(1, 82, 114, dtype=torch.long)
    cases = [(False, (1.0,), lambda: O.official_inference(fe_o, clf_o, image, label, flip=False)),
             (True, (1.0,), lambda: O.official_inference(fe_o, clf_o, image, label, flip=True)),
             (True, (0.7, 1.0, 1.3), lambda: O.official_multi_scale_inference(fe_o, clf_o, image, label))]
    for flip, scales, official in cases:
        with torch.no_grad():
            ours = predict_probabilities(fe, clf, image, label.shape[-2:], flip=flip, scales=scales)
        ref = official()
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
        # the predictions themselves are identical (ties aside, which random weights do not make)
        assert torch.equal(ours.argmax(1), ref.argmax(1)), (flip, scales)
        assert ref.argmax(1).unique().numel() > 1  # a non-trivial prediction


def test_official_discriminator_and_trainer_init_layout(tmp_path):
    from fada_core import FineGrainedDiscriminator

    path = tmp_path / "official.pth"
    _, _, d_o = _official_checkpoint(path, "vgg16", True)
    ckpt = torch.load(path, weights_only=False)
    assert M.is_official_checkpoint(ckpt)
    fe, clf = M.build_segmentor("vgg16", K, None)
    d = FineGrainedDiscriminator(1024, K, ndf=16)
    M.load_model_states(ckpt, fe, clf, backbone="vgg16", discriminator=d)
    x = torch.randn(1, 1024, 3, 4)
    torch.testing.assert_close(d(x), d_o(x))


def test_official_checkpoint_without_config_needs_one(tmp_path):
    path = tmp_path / "official.pth"
    _official_checkpoint(path, "vgg16", True)
    with pytest.raises(ValueError, match="--config"):
        M.load_checkpoint_models(str(path))
    with pytest.raises(M.WeightsError, match="conv2d_list|branches"):  # 19 classes: shapes differ
        M.load_checkpoint_models(str(path), cfg={"model": {"backbone": "vgg16", "num_classes": 19,
                                                           "freeze_bn": True}})


def test_frozen_bn_has_no_epsilon_as_official():
    fe, _ = M.build_segmentor("resnet101", K, None, freeze_bn=True)
    assert fe.bn1.eps == 0.0


def test_strict_loading_lists_missing_and_unexpected_keys():
    fe, _ = M.build_segmentor("small", K, None, freeze_bn=False)
    state = dict(fe.state_dict())
    state.pop("body.0.0.weight")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(M.WeightsError) as err:
        M.load_state_strict(fe, state, "test state")
    assert "body.0.0.weight" in str(err.value) and "extra.weight" in str(err.value)
    missing, unexpected = M.load_state_strict(fe, state, "test state", partial=True)
    assert missing == ["body.0.0.weight"] and unexpected == ["extra.weight"]


def _vgg_imagenet_state(caffe_layout: bool):
    """A VGG-16 ImageNet state dict with the real feature keys/shapes; the (huge) classifier
    tensors are stand-ins, only their names matter."""
    from torchvision.models import vgg16

    state = {k: v for k, v in vgg16(weights=None).features.state_dict().items()}
    state = {f"features.{k}": v for k, v in state.items()}
    for index in ((1, 4, 6) if caffe_layout else (0, 3, 6)):
        state[f"classifier.{index}.weight"] = torch.zeros(2, 2)
        state[f"classifier.{index}.bias"] = torch.zeros(2)
    return state


def test_vgg_caffe_and_torchvision_files_are_told_apart(tmp_path):
    caffe, torchvision_rgb = tmp_path / "caffe.pth", tmp_path / "tv.pth"
    torch.save(_vgg_imagenet_state(True), caffe)
    torch.save(_vgg_imagenet_state(False), torchvision_rgb)
    fe, _ = M.build_segmentor("vgg16", K, str(caffe))          # official: BGR 0-255, Caffe file
    assert torch.equal(fe.features[25].weight, torch.load(caffe)["features.26.weight"])  # conv5_2
    with pytest.raises(M.WeightsError, match="to_bgr255"):
        M.build_segmentor("vgg16", K, str(caffe), bgr255=False)
    # a file with torchvision's layout and an unknown hash: accepted (it may be a renamed Caffe file)
    M.build_segmentor("vgg16", K, str(torchvision_rgb))


def test_known_files_recognised_by_content(tmp_path, monkeypatch):
    from torchvision.models import resnet101

    path = tmp_path / "renamed.pth"
    torch.save(resnet101(weights=None).state_dict(), path)
    prefix = M._sha256_prefix(str(path))
    monkeypatch.setitem(M._KNOWN_FILES, prefix, M._KNOWN_FILES["cd907fc2"])   # pretend it is V2
    with pytest.raises(M.WeightsError, match="resnet101-5d3b4d8f.pth"):
        M.build_segmentor("resnet101", K, str(path))
    monkeypatch.setitem(M._KNOWN_FILES, prefix, M._KNOWN_FILES["397923af"])   # torchvision VGG
    with pytest.raises(M.WeightsError, match="vgg16-00b39a1b.pth"):
        M.build_segmentor("vgg16", K, str(path), bgr255=True)
    monkeypatch.setitem(M._KNOWN_FILES, prefix, M._KNOWN_FILES["5d3b4d8f"])   # V1: loads, fc ignored
    fe, _ = M.build_segmentor("resnet101", K, str(path))
    with pytest.raises(M.WeightsError, match="vgg16"):
        M.build_segmentor("vgg16", K, str(path))


def test_imagenet_file_with_wrong_keys_is_an_error(tmp_path):
    from torchvision.models import resnet101

    state = resnet101(weights=None).state_dict()
    state.pop("layer4.2.conv3.weight")
    path = tmp_path / "cut.pth"
    torch.save(state, path)
    with pytest.raises(M.WeightsError, match="layer4.2.conv3.weight"):
        M.build_segmentor("resnet101", K, str(path))
    fe, _ = M.build_segmentor("resnet101", K, str(path), partial=True)


# ---------------------------------------------------------------------------------------------
# training from official checkpoints and pseudo-label folders
# ---------------------------------------------------------------------------------------------
def _tiny_cfg(stage, tmp_path, *overrides):
    from fada_examples.config import load_config
    from fada_examples.engine.trainer import prepare_data

    configs = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "examples", "configs")
    base = [f"output_dir={tmp_path / stage}", f"datasets.synthetic_dir={tmp_path / 'syn'}",
            "datasets.synthetic.num_source=4", "datasets.synthetic.num_target_train=2",
            "datasets.synthetic.num_target_val=1", "datasets.synthetic.size=[64,48]",
            "input.source_size_train=[64,48]", "input.target_size_train=[64,48]", "input.size_test=[64,48]",
            "solver.max_iter=4", "solver.stop_iter=1", "solver.checkpoint_period=1", "solver.batch_size=2",
            "solver.num_workers=0", "backend=eager", "model.ndf=16"]
    return prepare_data(load_config(os.path.join(configs, f"synthetic_small_{stage}.yaml"),
                                    base + list(overrides), stage=stage))


def _as_official(features_state, classifier_state):
    return {"iteration": 20000,
            "feature_extractor": {f"module.backbone.{k}": v for k, v in features_state.items()},
            "classifier": {f"module.{k.replace('branches.', 'conv2d_list.')}": v for k, v in classifier_state.items()}}


def test_training_initialised_from_an_official_checkpoint(tmp_path):
    """--init with an official stage-1 checkpoint; stage 3 with an official teacher (config from
    the command line) and with an official test.py --saveres pseudo-label folder."""
    import warnings

    from fada_examples.engine import checkpoint as C
    from fada_examples.engine.trainer import train_stage

    torch.manual_seed(0)
    fe, clf = M.build_segmentor("small", 19, None, freeze_bn=False)
    official = tmp_path / "official_src.pth"
    torch.save(_as_official(fe.state_dict(), clf.state_dict()), official)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # synthetic data lacks some classes: announced, not silent
        cfg = _tiny_cfg("adv", tmp_path, f"init_from={official}", "solver.checkpoint_period=100")
        result = train_stage("adv", cfg, progress=False, tensorboard=False)
    trained = C.load_checkpoint(result.checkpoint)["feature_extractor"]["body.0.0.weight"]
    start = fe.state_dict()["body.0.0.weight"]
    assert not torch.equal(trained, start) and torch.allclose(trained, start, atol=0.05)
    # a broken official checkpoint: strict, listing what is missing
    broken = _as_official(fe.state_dict(), clf.state_dict())
    broken["classifier"].pop("module.conv2d_list.3.bias")
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(M.WeightsError, match="branches.3.bias"):
        train_stage("adv", _tiny_cfg("adv", tmp_path, f"init_from={tmp_path / 'broken.pth'}",
                                     f"output_dir={tmp_path / 'adv_broken'}"), progress=False, tensorboard=False)
    # stage 3 from an official teacher (no config inside: the stage's config builds it); its test
    # size is unknown, so the pseudo-label size must be given (official: the adversarial config's)
    with pytest.raises(ValueError, match="datasets.pseudo_label_size"):
        train_stage("sd", _tiny_cfg("sd", tmp_path, f"teacher={official}"), progress=False, tensorboard=False)
    sd = train_stage("sd", _tiny_cfg("sd", tmp_path, f"teacher={official}", "datasets.pseudo_label_size=[64,48]"),
                     progress=False, tensorboard=False)
    assert sd.iteration == 1
    # stage 3 from an official pseudo-label folder (one folder, <name>_leftImg8bit.png)
    labels = tmp_path / "soft_labels"
    labels.mkdir()
    for png in os.listdir(tmp_path / "sd" / "pseudo_labels"):
        if png.endswith(".png"):
            os.rename(tmp_path / "sd" / "pseudo_labels" / png, labels / png.split("__")[-1])
    sd2 = train_stage("sd", _tiny_cfg("sd", tmp_path, f"datasets.pseudo_label_dir={labels}",
                                      f"output_dir={tmp_path / 'sd2'}"), progress=False, tensorboard=False)
    assert sd2.iteration == 1


def test_init_loads_the_official_discriminator_when_present(tmp_path, capsys):
    """init_from an official adversarial checkpoint: its model_D becomes stage 2's discriminator
    (init_discriminator=auto); a stage-1 checkpoint has none (D starts afresh, or an error under
    init_discriminator=require); init_discriminator=skip never loads it."""
    from fada_examples.engine import trainer as T

    torch.manual_seed(0)
    fe, clf = M.build_segmentor("small", 19, None, freeze_bn=False)
    d_o = O.OfficialPixelDiscriminator(M.feature_channels("small"), 16, 19)
    _randomise(d_o, 3)
    src = _as_official(fe.state_dict(), clf.state_dict())
    torch.save(src, tmp_path / "src.pth")
    torch.save(dict(src, model_D={f"module.{k}": v for k, v in d_o.state_dict().items()}), tmp_path / "adv.pth")
    cpu, x = torch.device("cpu"), torch.randn(1, M.feature_channels("small"), 3, 4)

    def discriminator(init, *overrides):
        return T.build_models(_tiny_cfg("adv", tmp_path, f"init_from={tmp_path / init}", *overrides), "adv", cpu)[2]

    torch.testing.assert_close(discriminator("adv.pth")(x), d_o(x))
    assert "discriminator: loaded from" in capsys.readouterr().out  # said, not silent
    fresh = discriminator("src.pth").state_dict()
    assert "discriminator: new (random init)" in capsys.readouterr().out
    assert not torch.equal(fresh["source_head.weight"], discriminator("adv.pth").state_dict()["source_head.weight"])
    skipped = discriminator("adv.pth", "init_discriminator=skip").state_dict()
    assert all(torch.equal(fresh[k], skipped[k]) for k in fresh)
    with pytest.raises(ValueError, match="init_discriminator=require.*'model_D'"):
        discriminator("src.pth", "init_discriminator=require")


def test_partial_weights_only_when_the_config_asks(tmp_path):
    """model.weights with a tensor missing: an error listing it, unless model.partial_weights=true."""
    from fada_examples.config import load_config
    from fada_examples.engine import trainer as T

    torch.manual_seed(0)
    features, _ = M.build_segmentor("small", 19, None, freeze_bn=False)
    state = features.state_dict()
    dropped = next(iter(state))
    kept = {k: v for k, v in state.items() if k != dropped}
    torch.save(kept, tmp_path / "w.pth")
    overrides = ["model.backbone=small", f"model.weights={tmp_path / 'w.pth'}"]
    with pytest.raises(M.WeightsError, match=dropped.replace(".", r"\.")):
        T._build_segmentor(load_config(None, overrides), torch.device("cpu"), with_weights=True)
    loaded, _ = T._build_segmentor(load_config(None, overrides + ["model.partial_weights=true"]),
                                   torch.device("cpu"), with_weights=True)
    other = next(k for k in kept if kept[k].is_floating_point())
    assert torch.equal(loaded.state_dict()[other], kept[other])
