"""Training engine of the examples: models, configs, the three stages, exact resume, DDP (gloo)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fada_examples import models as M
from fada_examples.config import ConfigError, load_config
from fada_examples.engine import checkpoint as C
from fada_examples.engine.logger import read_csv_log
from fada_examples.engine.sampling import IterationBatchSampler
from fada_examples.engine.trainer import poly_lr, prepare_data, train_stage

EXAMPLES = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "examples"))
CONFIGS = os.path.join(EXAMPLES, "configs")


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    from fada_examples.data import make_synthetic_data

    root = str(tmp_path_factory.mktemp("synthetic"))
    make_synthetic_data(root, num_source=6, num_target_train=4, num_target_val=2, size=(96, 64), seed=0)
    return root


@pytest.fixture(autouse=True)
def _restore_determinism():
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def tiny_cfg(stage, synthetic_dir, out, *overrides):
    """A synthetic small-backbone config of ``stage``: 96x64 images, 2 iterations, batch 2/4."""
    base = [
        f"output_dir={out}", f"datasets.synthetic_dir={synthetic_dir}",
        "datasets.synthetic.num_source=6", "datasets.synthetic.num_target_train=4",
        "datasets.synthetic.num_target_val=2", "datasets.synthetic.size=[96,64]",
        "input.source_size_train=[96,64]", "input.target_size_train=[96,64]", "input.size_test=[96,64]",
        "solver.max_iter=10", "solver.stop_iter=2", "solver.checkpoint_period=1",
        f"solver.batch_size={4 if stage == 'adv' else 2}", "backend=eager", "model.ndf=16",
    ]
    cfg = load_config(os.path.join(CONFIGS, f"synthetic_small_{stage}.yaml"), base + list(overrides), stage=stage)
    return prepare_data(cfg)


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------
def test_config_unknown_keys_and_coercion(tmp_path):
    with pytest.raises(ConfigError, match="solver.bse_lr"):
        load_config(None, ["solver.bse_lr=0.1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  backbone: small\n  freeze_bnn: true\n")
    with pytest.raises(ConfigError, match="model.freeze_bnn"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="model.backbone"):
        load_config(None, ["model.backbone=resnet50"])
    cfg = load_config(os.path.join(CONFIGS, "deeplabv2_r101_adv.yaml"), ["solver.base_lr=5e-4", "adv.seed=3"],
                      stage="src")  # the adv.* override is for another stage
    assert cfg["solver"]["base_lr"] == 5e-4 and cfg["seed"] == 0
    assert cfg["solver"]["base_lr_d"] == 1e-4 and cfg["solver"]["max_iter"] == 62500
    assert cfg["input"]["hue"] == 0.2 and cfg["model"]["freeze_bn"] is True


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(CONFIGS) if f.endswith(".yaml")))
def test_every_shipped_config_loads(name):
    cfg = load_config(os.path.join(CONFIGS, name))
    assert cfg["solver"]["stop_iter"] <= cfg["solver"]["max_iter"]


def test_poly_schedule_matches_official():
    assert poly_lr(2.5e-4, 0, 62500, 0.9) == 2.5e-4
    assert poly_lr(2.5e-4, 40000, 62500, 0.9) == pytest.approx(2.5e-4 * (1 - 40000 / 62500) ** 0.9)


def test_lr_schedulers_give_the_official_learning_rate_of_every_iteration():
    """torch.optim.lr_scheduler PolyLR, stepped once per iteration up to the official stop (40000
    of 62500), gives exactly (bitwise) the official per-iteration rates: poly_lr for F, poly_lr * 10
    for C (the official order: LambdaLR's (10 base) * factor differs in the last bit), poly_lr(D)."""
    from fada_examples.engine.trainer import build_optimizers, build_schedulers

    cfg = load_config(os.path.join(CONFIGS, "deeplabv2_r101_adv.yaml"))
    solver = cfg["solver"]
    features, classifier, disc = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opts = build_optimizers(cfg, features, classifier, disc)
    scheds = build_schedulers(cfg, opts)
    base = {"fea": solver["base_lr"], "cls": solver["base_lr"], "D": solver["base_lr_d"]}
    mult = {"fea": 1.0, "cls": 10.0, "D": 1.0}
    mismatches = {name: 0 for name in opts}
    for it in range(solver["stop_iter"]):
        for name, opt in opts.items():
            want = poly_lr(base[name], it, solver["max_iter"], solver["lr_power"]) * mult[name]
            mismatches[name] += opt.param_groups[0]["lr"] != want
            opt.step()  # no gradients: changes nothing, keeps the step order the schedulers expect
        for sched in scheds.values():
            sched.step()
    assert mismatches == {"fea": 0, "cls": 0, "D": 0}
    assert scheds["cls"].last_epoch == solver["stop_iter"] == 40000
    # the state survives a checkpoint round trip: a fresh scheduler continues from it
    again = build_schedulers(cfg, build_optimizers(cfg, features, classifier, disc))
    for name, sched in again.items():
        sched.load_state_dict(scheds[name].state_dict())
        sched.step()
        assert sched.get_last_lr()[0] == poly_lr(base[name], 40001, solver["max_iter"], solver["lr_power"]) * mult[name]


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
def test_models_output_stride_channels_and_frozen_bn(tmp_path):
    from torchvision.ops import FrozenBatchNorm2d

    x = torch.randn(1, 3, 64, 96)
    for backbone in ("small", "vgg16", "resnet101"):
        features, classifier = M.build_segmentor(backbone, 19, None, freeze_bn=True)
        with torch.no_grad():
            f = features(x)
            z = classifier(f)
            up = classifier(f, size=(64, 96))
        assert f.shape == (1, M.feature_channels(backbone), 8, 12)
        assert z.shape == (1, 19, 8, 12) and up.shape == (1, 19, 64, 96)
        assert len(classifier.branches) == 4
        assert [c.dilation[0] for c in classifier.branches] == [6, 12, 18, 24]
    frozen = [m for m in features.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert frozen and not any(isinstance(m, torch.nn.BatchNorm2d) for m in features.modules())
    assert 0.005 < float(classifier.branches[0].weight.detach().std()) < 0.015
    missing = tmp_path / "nope" / "resnet101.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        M.build_segmentor("resnet101", 19, str(missing))
    # local weights load (only matching keys), and the training checkpoint reloader.
    small, _ = M.build_segmentor("small", 19, None, freeze_bn=False)
    path = tmp_path / "small.pth"
    torch.save(small.state_dict(), path)
    again, _ = M.build_segmentor("small", 19, str(path), freeze_bn=False)
    for a, b in zip(small.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_sampler_shards_and_resumes():
    full = list(IterationBatchSampler(10, 4, seed=3, stop_iter=6))
    r0 = list(IterationBatchSampler(10, 2, seed=3, stop_iter=6, rank=0, world_size=2))
    r1 = list(IterationBatchSampler(10, 2, seed=3, stop_iter=6, rank=1, world_size=2))
    assert [a + b for a, b in zip(r0, r1)] == full
    assert list(IterationBatchSampler(10, 4, seed=3, start_iter=4, stop_iter=6)) == full[4:]
    first_epoch = [i for batch in full for i, _ in batch][:10]
    assert sorted(first_epoch) == list(range(10))


# ---------------------------------------------------------------------------------------------
# the three stages, two iterations each
# ---------------------------------------------------------------------------------------------
def _params(module_state):
    return {k: v.clone() for k, v in module_state.items() if v.dtype.is_floating_point}


def test_two_iterations_of_every_stage(synthetic_dir, tmp_path):
    src_cfg = tiny_cfg("src", synthetic_dir, str(tmp_path / "src"))
    src = train_stage("src", src_cfg, progress=False, tensorboard=False)
    assert src.iteration == 2 and os.path.isfile(src.checkpoint)
    rows = read_csv_log(str(tmp_path / "src" / "log.csv"))
    assert [int(r["iteration"]) for r in rows] == [1, 2]
    assert all(np.isfinite(float(r["loss_seg"])) for r in rows)
    assert "peak_mem_mib" in rows[0] and float(rows[0]["lr"]) == pytest.approx(0.01)
    ck1 = C.load_checkpoint(src.checkpoint)
    for key in ("feature_extractor", "classifier", "optimizer_fea", "optimizer_cls", "rng", "config", "iteration"):
        assert key in ck1
    ck0 = C.load_checkpoint(str(tmp_path / "src" / "model_iter000001.pth"))
    assert not torch.equal(ck0["classifier"]["branches.0.weight"], ck1["classifier"]["branches.0.weight"])

    adv_cfg = tiny_cfg("adv", synthetic_dir, str(tmp_path / "adv"), f"init_from={src.checkpoint}")
    adv = train_stage("adv", adv_cfg, progress=False, tensorboard=False)
    rows = read_csv_log(str(tmp_path / "adv" / "log.csv"))
    assert len(rows) == 2 and {"loss_seg", "loss_adv", "loss_D", "lr_D"} <= set(rows[0])
    # generator weight 0.001 x soft CE over 2K classes; D loss 0.5 + 0.5 soft CE
    assert 0 < float(rows[0]["loss_adv"]) < 0.001 * 10 and 0.5 < float(rows[0]["loss_D"]) < 10
    ck_adv = C.load_checkpoint(adv.checkpoint)
    assert {"discriminator", "optimizer_D"} <= set(ck_adv)
    assert ck_adv["optimizer_D"]["param_groups"][0]["betas"] == (0.9, 0.99)
    assert ck_adv["optimizer_fea"]["param_groups"][0]["momentum"] == 0.9
    assert ck_adv["optimizer_fea"]["param_groups"][0]["weight_decay"] == 5e-4
    ck_adv1 = C.load_checkpoint(str(tmp_path / "adv" / "model_iter000001.pth"))
    # stage 2 starts from stage 1: after one step the features are close to, not equal to, stage 1's
    key = "body.0.0.weight"
    assert not torch.equal(ck_adv1["feature_extractor"][key], ck1["feature_extractor"][key])
    assert torch.allclose(ck_adv1["feature_extractor"][key], ck1["feature_extractor"][key], atol=0.05)

    sd_cfg = tiny_cfg("sd", synthetic_dir, str(tmp_path / "sd"), f"teacher={adv.checkpoint}")
    sd = train_stage("sd", sd_cfg, progress=False, tensorboard=False)
    assert sd.iteration == 2
    pseudo = sorted(os.listdir(tmp_path / "sd" / "pseudo_labels"))
    pngs = [p for p in pseudo if p.endswith(".png")]
    assert len(pngs) == 4 and ".done" in pseudo
    label = np.array(Image.open(tmp_path / "sd" / "pseudo_labels" / pngs[0]))
    assert label.shape == (64, 96) and label.max() < 19
    # the student is a fresh model (BN not frozen), not the teacher
    ck_sd = C.load_checkpoint(sd.checkpoint)
    assert any("running_mean" in k for k in ck_sd["feature_extractor"])


# ---------------------------------------------------------------------------------------------
# exact resume
# ---------------------------------------------------------------------------------------------
def test_interrupted_and_resumed_run_reproduces_losses(synthetic_dir, tmp_path):
    common = ["deterministic=true", "solver.max_iter=6", "input.flip_prob_train=0.5"]
    full = train_stage("adv", tiny_cfg("adv", synthetic_dir, str(tmp_path / "full"), *common, "solver.stop_iter=4"),
                       progress=False, tensorboard=False)
    out = str(tmp_path / "cut")
    train_stage("adv", tiny_cfg("adv", synthetic_dir, out, *common, "solver.stop_iter=2"), progress=False,
                tensorboard=False)
    torch.manual_seed(12345)  # disturb the global RNG: the checkpoint must restore it
    resumed = train_stage("adv", tiny_cfg("adv", synthetic_dir, out, *common, "solver.stop_iter=4"),
                          resume="auto", progress=False, tensorboard=False)
    assert resumed.iteration == 4 and len(resumed.history) == 2
    cut = C.load_checkpoint(os.path.join(out, "model_iter000002.pth"))
    assert {n: s["last_epoch"] for n, s in cut["scheduler"].items()} == {"fea": 2, "cls": 2, "D": 2}
    a = read_csv_log(str(tmp_path / "full" / "log.csv"))
    b = read_csv_log(os.path.join(out, "log.csv"))
    assert [r["iteration"] for r in b] == ["1", "2", "3", "4"]
    for col in ("loss_seg", "loss_adv", "loss_D", "lr", "lr_D"):
        assert [r[col] for r in a] == [r[col] for r in b], col
    ca, cb = C.load_checkpoint(full.checkpoint), C.load_checkpoint(resumed.checkpoint)
    for part in ("feature_extractor", "classifier", "discriminator"):
        for k in ca[part]:
            assert torch.equal(ca[part][k], cb[part][k]), (part, k)


# ---------------------------------------------------------------------------------------------
# DDP, 2 processes, gloo on the CPU
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_process_gloo_matches_single_process(synthetic_dir, tmp_path):
    args = [
        "--stage", "adv", "--config", os.path.join(CONFIGS, "synthetic_small_adv.yaml"), "--no-progress",
        f"datasets.synthetic_dir={synthetic_dir}", "datasets.synthetic.num_source=6",
        "datasets.synthetic.num_target_train=4", "datasets.synthetic.num_target_val=2",
        "datasets.synthetic.size=[96,64]", "input.source_size_train=[96,64]", "input.target_size_train=[96,64]",
        "input.size_test=[96,64]", "solver.max_iter=10", "solver.stop_iter=2", "solver.batch_size=4",
        "model.ndf=16", "model.freeze_bn=true", "backend=eager", "input.brightness=0", "input.contrast=0",
        "input.saturation=0", "input.hue=0",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=EXAMPLES + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = os.path.join(EXAMPLES, "train_gta2city.py")
    ddp_out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           script, "--output-dir", ddp_out] + args
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "target mIoU" in proc.stdout  # evaluation + CCD ran, reduced over the two ranks
    ddp_rows = read_csv_log(os.path.join(ddp_out, "log.csv"))
    assert len(ddp_rows) == 2
    ck = C.load_checkpoint(os.path.join(ddp_out, "last.pth"))
    assert ck["sampler"]["world_size"] == 2 and ck["iteration"] == 2
    assert not any(k.startswith("module.") for k in ck["feature_extractor"])

    single_out = str(tmp_path / "single")
    from fada_examples.config import load_config as _lc

    cfg = prepare_data(_lc(os.path.join(CONFIGS, "synthetic_small_adv.yaml"), args[5:] + [f"output_dir={single_out}"],
                           stage="adv"))
    train_stage("adv", cfg, progress=False, tensorboard=False)
    single_rows = read_csv_log(os.path.join(single_out, "log.csv"))
    # Iteration 1: the same 2 source + 2 target images are split over the ranks; the soft-label
    # losses are plain means over equal pixel counts, so the rank average equals the global one.
    for col in ("loss_adv", "loss_D"):
        assert float(ddp_rows[0][col]) == pytest.approx(float(single_rows[0][col]), rel=1e-4), col


def test_bf16_autocast_adv_iteration_and_data_root_errors(synthetic_dir, tmp_path):
    cfg = tiny_cfg("adv", synthetic_dir, str(tmp_path / "bf16"), "amp=bf16", "solver.stop_iter=1")
    result = train_stage("adv", cfg, progress=False, tensorboard=False)
    row = result.history[0]
    assert all(np.isfinite(row[c]) for c in ("loss_seg", "loss_adv", "loss_D"))
    # D's logits are cast to fp32 before the soft-label loss: no bf16-quantised loss value
    assert torch.tensor(row["loss_D"]).bfloat16().double().item() != row["loss_D"]
    with pytest.raises(ValueError, match="datasets.target_root"):
        prepare_data(load_config(None, ["datasets.source_root=/somewhere"]))
    with pytest.raises(FileNotFoundError, match="nonexistent_gta"):
        bad = load_config(os.path.join(CONFIGS, "synthetic_small_src.yaml"),
                          [f"datasets.source_root={tmp_path}/nonexistent_gta", f"datasets.target_root={tmp_path}",
                           f"output_dir={tmp_path}/bad"])
        train_stage("src", bad, progress=False, tensorboard=False)


def test_kernel_backend_matches_eager_in_training(synthetic_dir, tmp_path, kernel_ops):
    rows = {}
    for backend in ("kernel", "eager"):
        cfg = tiny_cfg("adv", synthetic_dir, str(tmp_path / backend), f"backend={backend}", "deterministic=true")
        rows[backend] = train_stage("adv", cfg, progress=False, tensorboard=False).history
    for a, b in zip(rows["kernel"], rows["eager"]):
        for col in ("loss_seg", "loss_adv", "loss_D"):
            assert a[col] == pytest.approx(b[col], rel=1e-5, abs=1e-8), col


def test_first_adversarial_iteration_matches_official_formulas(synthetic_dir, tmp_path):
    """Iteration 1 of stage 2 recomputed with the official train_adv.py formulas (full-resolution
    upsampling, T = 1.8 on the supervised loss, soft labels capped at 0.9, 0.001 / 0.5 / 0.5)."""
    import torch.nn.functional as F

    import fada_core
    from fada_examples.engine import trainer as T

    src = train_stage("src", tiny_cfg("src", synthetic_dir, str(tmp_path / "src"), "solver.stop_iter=1"),
                      progress=False, tensorboard=False)
    cfg = tiny_cfg("adv", synthetic_dir, str(tmp_path / "adv"), f"init_from={src.checkpoint}", "solver.stop_iter=1")
    row = train_stage("adv", cfg, progress=False, tensorboard=False).history[0]

    init = C.load_checkpoint(src.checkpoint)
    feat, cls = M.build_segmentor("small", 19, None, freeze_bn=False)
    feat.load_state_dict(init["feature_extractor"])
    cls.load_state_dict(init["classifier"])
    torch.manual_seed(cfg["seed"] + 1)
    disc = fada_core.FineGrainedDiscriminator(128, 19, ndf=16)
    src_ds = T._source_dataset(cfg, "adv", None)
    x_s, y_s = next(iter(T._loader(src_ds, 2, cfg, 0, 0, 1, T._class_lists(cfg, src_ds))))[:2]
    x_t = next(iter(T._loader(T._target_dataset(cfg), 2, cfg, 1, 0, 1)))[0]
    size = tuple(x_s.shape[-2:])

    def soft_ce(pred, soft):
        return torch.mean(torch.sum(-soft * F.log_softmax(pred, dim=1), dim=1))

    with torch.no_grad():
        f_s = feat(x_s)
        pred_s = cls(f_s, size) / 1.8
        loss_seg = F.cross_entropy(pred_s, y_s.long(), ignore_index=255)
        a_s = F.softmax(pred_s, dim=1)
        a_s[a_s > 0.9] = 0.9
        f_t = feat(x_t)
        a_t = F.softmax(cls(f_t, size) / 1.8, dim=1)
        a_t[a_t > 0.9] = 0.9
        zeros = torch.zeros_like(a_t)
        loss_adv = 0.001 * soft_ce(disc(f_t, size), torch.cat((a_t, zeros), 1))
        loss_d = 0.5 * soft_ce(disc(f_s, size), torch.cat((a_s, zeros), 1)) + \
            0.5 * soft_ce(disc(f_t, size), torch.cat((zeros, a_t), 1))
    assert row["loss_seg"] == pytest.approx(float(loss_seg), rel=1e-5)
    assert row["loss_adv"] == pytest.approx(float(loss_adv), rel=1e-5)
    assert row["loss_D"] == pytest.approx(float(loss_d), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# stage 3's pseudo labels and the --stage all summary
# ---------------------------------------------------------------------------------------------
def test_pseudo_labels_are_made_at_the_teacher_test_size(synthetic_dir, tmp_path):
    """As the official train_with_sd.sh (test.py with the adversarial config): the teacher labels at
    its own input.size_test, not at the stage-3 config's; datasets.pseudo_label_size overrides it."""
    import json

    from fada_examples.data import pseudo_label_path
    from fada_examples.engine import trainer as T
    from fada_examples.evaluation import predict_probabilities

    teacher_cfg = tiny_cfg("src", synthetic_dir, str(tmp_path / "teacher"), "solver.stop_iter=1",
                           "input.size_test=[48,32]")
    teacher = train_stage("src", teacher_cfg, progress=False, tensorboard=False)
    state = C.load_checkpoint(teacher.checkpoint)  # after one step its biases decide: let features decide
    torch.manual_seed(0)
    state["classifier"] = {k: torch.randn_like(v) if k.endswith("weight") else torch.zeros_like(v)
                           for k, v in state["classifier"].items()}
    torch.save(state, teacher.checkpoint)
    sd_cfg = tiny_cfg("sd", synthetic_dir, str(tmp_path / "sd"), f"teacher={teacher.checkpoint}")
    assert sd_cfg["input"]["size_test"] == [96, 64]
    out = T._ensure_pseudo_labels(sd_cfg, torch.device("cpu"), False)
    with open(os.path.join(out, ".done")) as fh:
        assert json.load(fh)["size"] == [48, 32]

    features, classifier, _ = M.load_checkpoint_models(teacher.checkpoint)
    differs_at_student_size = False
    for size in ([48, 32], [96, 64]):
        dataset = T._unlabelled_target(sd_cfg, T._test_transform(sd_cfg["input"], size))
        for image, label, name in (dataset[i] for i in range(len(dataset))):
            with torch.no_grad():
                want = predict_probabilities(features, classifier, image[None], label.shape[-2:]).argmax(1)[0]
            got = torch.from_numpy(np.array(Image.open(pseudo_label_path(out, name)))).long()
            if size == [48, 32]:
                assert torch.equal(got, want), name
            else:
                differs_at_student_size |= not torch.equal(got, want)
    assert differs_at_student_size  # the test would catch labelling at the stage-3 size

    override = tiny_cfg("sd", synthetic_dir, str(tmp_path / "sd"), f"teacher={teacher.checkpoint}",
                        "datasets.pseudo_label_size=[96,64]")
    T._ensure_pseudo_labels(override, torch.device("cpu"), False)
    with open(os.path.join(out, ".done")) as fh:
        assert json.load(fh)["size"] == [96, 64]  # relabelled at the asked size
    with pytest.raises(ValueError, match="datasets.pseudo_label_size"):
        T.pseudo_label_size(sd_cfg, None)  # a teacher without a config (official checkpoint)
    with pytest.raises(ConfigError, match="pseudo_label_size"):
        load_config(None, ["datasets.pseudo_label_size=[96]"])


def test_stage_all_summary_measures_every_ccd_at_one_size(synthetic_dir, tmp_path):
    """Stage 3's config tests at another size (2048x1024 vs 1024x512 officially); its mIoU keeps its
    own size but the CCD column is measured at stage 1's size for every row. Three copies of one
    model must then show one CCD."""
    import shutil

    from fada_examples.engine import format_summary, run_pipeline

    root = tmp_path / "all"
    cfgs = {"src": tiny_cfg("src", synthetic_dir, str(root / "src"), "solver.stop_iter=1"),
            "adv": tiny_cfg("adv", synthetic_dir, str(root / "adv"), "solver.stop_iter=1"),
            "sd": tiny_cfg("sd", synthetic_dir, str(root / "sd"), "solver.stop_iter=1", "input.size_test=[192,128]")}
    src = train_stage("src", cfgs["src"], progress=False, tensorboard=False)
    state = C.load_checkpoint(src.checkpoint)
    for stage in ("adv", "sd"):  # finished copies: the pipeline only evaluates them
        os.makedirs(root / stage)
        C.save_checkpoint(str(root / stage / "model_iter000001.pth"), dict(state, stage=stage))
    rows = run_pipeline(("src", "adv", "sd"), cfgs, root=str(root), resume=True, progress=False,
                        log=lambda *_: None)
    assert [r["ccd_size"] for r in rows] == [[96, 64]] * 3
    assert [r["test_size"] for r in rows] == [[96, 64], [96, 64], [192, 128]]
    assert rows[0]["ccd_mean"] == rows[1]["ccd_mean"] == rows[2]["ccd_mean"]
    table = format_summary(rows)
    assert table.count("96x64") == 5 and "192x128" in table
    shutil.rmtree(root)


def test_score_pseudo_labels_against_the_synthetic_target_labels(synthetic_dir, tmp_path):
    from fada_examples.data import build_dataset, pseudo_label_path
    from fada_examples.engine import trainer as T

    cfg = tiny_cfg("sd", synthetic_dir, str(tmp_path / "sd"))
    assert T.target_is_synthetic(cfg)
    dataset = T._unlabelled_target(cfg, None)
    truth = build_dataset("cityscapes", cfg["datasets"]["target_root"], "train", None, num_classes=19)
    out = str(tmp_path / "labels")
    os.makedirs(out)
    for i in range(len(truth)):
        _, label, name = truth.load(i)
        label.save(pseudo_label_path(out, name))
    assert len(dataset) == len(truth) == 4
    assert T.score_pseudo_labels(cfg, out).miou == 1.0
    _, label, name = truth.load(0)
    Image.fromarray(np.zeros_like(np.array(label))).save(pseudo_label_path(out, name))  # all "road"
    assert T.score_pseudo_labels(cfg, out).miou < 1.0
    assert not T.target_is_synthetic(load_config(None, [f"datasets.target_root={tmp_path}"]))


def test_summary_note_says_what_stage_3_learnt_from():
    from types import SimpleNamespace

    from fada_examples.engine import format_summary

    def row(stage, miou, acc, **extra):
        return dict(stage=stage, miou=miou, ccd_mean=1.5, eval=SimpleNamespace(allacc=acc), test_size=[160, 96],
                    ccd_size=[160, 96], checkpoint="", **extra)

    sd = dict(pseudo_label_miou=0.3558, pseudo_label_allacc=0.8022, student="from random weights, trained 300 iterations")
    table = format_summary([row("src", 0.11, 0.45), row("adv", 0.32, 0.76), row("sd", 0.30, 0.78, **sd)])
    assert "pixel acc (%)" in table and "78.00" in table
    assert "mIoU 35.58%, pixel acc 80.22%" in table
    assert "target mIoU -2.00 points, pixel acc +2.00 points" in table and "frequent classes" in table
    worse = format_summary([row("adv", 0.32, 0.76), row("sd", 0.30, 0.74, **sd)])
    assert "pixel acc -2.00 points" in worse and "frequent classes" in worse
    better = format_summary([row("adv", 0.32, 0.76), row("sd", 0.33, 0.78, **sd)])
    assert "+1.00 points" in better and "frequent classes" not in better
    assert "Stage 3" not in format_summary([row("adv", 0.32, 0.76), row("sd", 0.33, 0.78)])
