"""Distillation: the loss (loops, gradient check, identities, errors), the teachers (normalization,
ensembles, refusals) and training with them (plumbing, resume, data-parallel ranks)."""
import json
import os

import numpy as np
import pytest
from hypothesis import given, strategies as st

from minicnn import engines, nn
from minicnn.backend import to_device, to_numpy
from minicnn.data import EMOTIONS, make_faces, normalize
from minicnn.distributed import DistributedTrainer, ThreadGroup
from minicnn.gradcheck import assert_gradients, check_loss
from minicnn.models import EmotionClassifier
from minicnn.nn import reference
from minicnn.training import CheckpointError, Recipe, Trainer, save_checkpoint
from minicnn.training.distill import Teacher, TeacherError


def teacher_probs(rng, n, c, zeros=False):
    p = rng.dirichlet(np.ones(c), n)
    if zeros:                                    # a teacher certain of some classes' absence
        p[:, 0] = 0
        p /= p.sum(axis=1, keepdims=True)
    return p


# --- the loss ---------------------------------------------------------------------------------------
@given(n=st.integers(1, 5), c=st.integers(2, 7), temperature=st.sampled_from([0.5, 1.0, 2.0, 4.0]),
       weight=st.sampled_from([0.0, 0.3, 1.0]), smoothing=st.sampled_from([0.0, 0.1]), zeros=st.booleans(),
       seed=st.integers(0, 2**16))
def test_loss_and_gradient_equal_the_loops(n, c, temperature, weight, smoothing, zeros, seed):
    rng = np.random.default_rng(seed)
    z, y, p = rng.standard_normal((n, c)) * 3, rng.integers(0, c, n), teacher_probs(rng, n, c, zeros)
    crit = nn.DistillationLoss(temperature, weight, smoothing)
    loss = crit.forward(z, y, p)
    assert float(loss) == pytest.approx(reference.distillation_loss(z, y, p, temperature, weight, smoothing),
                                        rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(crit.backward(), reference.distillation_loss_backward(
        z, y, p, temperature, weight, smoothing), rtol=1e-10, atol=1e-13)


@given(n=st.integers(1, 4), c=st.integers(2, 7), temperature=st.sampled_from([0.7, 2.0, 5.0]),
       weight=st.sampled_from([0.2, 0.5, 1.0]), zeros=st.booleans(), seed=st.integers(0, 2**16))
def test_gradient_check(device, n, c, temperature, weight, zeros, seed):
    rng = np.random.default_rng(seed)
    crit = nn.DistillationLoss(temperature, weight, label_smoothing=0.1)
    assert_gradients(check_loss(crit, to_device(rng.standard_normal((n, c)) * 3, device), rng.integers(0, c, n),
                                teacher_probs=to_device(teacher_probs(rng, n, c, zeros), device)))


def test_identities():
    rng = np.random.default_rng(0)
    z, y = rng.standard_normal((6, 7)) * 2, rng.integers(0, 7, 6)
    ce = nn.CrossEntropyLoss(label_smoothing=0.1)
    # No weight on the teacher: exactly the cross-entropy, and its gradient.
    crit = nn.DistillationLoss(3.0, 0.0, label_smoothing=0.1)
    assert float(crit.forward(z, y, teacher_probs(rng, 6, 7))) == float(ce.forward(z, y))
    np.testing.assert_array_equal(crit.backward(), ce.backward())
    # All weight on a one-hot teacher at T = 1: the cross-entropy against its labels (0 log 0 = 0).
    onehot = np.eye(7)[y]
    crit = nn.DistillationLoss(1.0, 1.0)
    assert float(crit.forward(z, rng.integers(0, 7, 6), onehot)) == pytest.approx(float(nn.CrossEntropyLoss()
                                                                                        .forward(z, y)), rel=1e-12)
    # A student that already agrees with the teacher at T: no gradient from the teacher's part.
    T = 2.5
    e = np.exp(z / T)
    crit = nn.DistillationLoss(T, 1.0)
    crit.forward(z, y, e / e.sum(axis=1, keepdims=True))
    np.testing.assert_allclose(crit.backward(), 0, atol=1e-15)


def test_loss_errors_are_clear():
    z, y = np.zeros((4, 7)), np.zeros(4, dtype=np.int64)
    with pytest.raises(ValueError, match=r"teacher probabilities shaped like the logits \(4, 7\), got \(4, 6\)"):
        nn.DistillationLoss().forward(z, y, np.full((4, 6), 1 / 6))
    with pytest.raises(ValueError, match="got None"):
        nn.DistillationLoss().forward(z, y, None)
    with pytest.raises(ValueError, match="labels"):
        nn.DistillationLoss().forward(z, np.zeros(3, dtype=np.int64), np.full((4, 7), 1 / 7))
    with pytest.raises(RuntimeError, match="before"):
        nn.DistillationLoss().backward()
    for bad in (dict(temperature=0), dict(temperature=float("nan")), dict(weight=1.5), dict(weight=-0.1)):
        with pytest.raises(ValueError):
            nn.DistillationLoss(**bad)


# --- teachers -----------------------------------------------------------------------------------------
def write_teacher(path, seed=0, mean=0.45, std=0.27, classes=EMOTIONS):
    import minicnn
    minicnn.manual_seed(seed)
    model = EmotionClassifier(num_classes=len(classes))
    rng = np.random.default_rng(seed)          # running statistics that are not the identity
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean[...] = rng.standard_normal(m.running_mean.shape) * 0.1
            m.running_var[...] = rng.uniform(0.5, 2.0, m.running_var.shape)
    save_checkpoint(str(path), model.state_dict(), None,
                    dict(model="EmotionClassifier", num_classes=len(classes), classes=list(classes),
                         normalization=dict(mean=mean, std=std)))
    return str(path), model


def test_teachers_see_the_batch_normalized_their_own_way_and_are_averaged(tmp_path):
    a, model_a = write_teacher(tmp_path / "a.npz", seed=1, mean=0.45, std=0.27)
    b, model_b = write_teacher(tmp_path / "b.npz", seed=2, mean=0.55, std=0.20)
    images = make_faces(5, 0)[0]
    T = 3.0
    teacher = Teacher([a, b], T, EMOTIONS, mean=0.5, std=0.25, dtype=np.float64)
    got = teacher(normalize(images, 0.5, 0.25, dtype=np.float64))       # the student's normalization

    def probs(model, mean, std):
        model.to("cpu", dtype=np.float64).eval()
        z = to_numpy(model(normalize(images, mean, std, dtype=np.float64))) / T
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    want = (probs(model_a, 0.45, 0.27) + probs(model_b, 0.55, 0.20)) / 2
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    assert len(teacher) == 2 and got.dtype == np.float64


def test_a_teacher_that_cannot_teach_is_refused_by_name(tmp_path):
    good, _ = write_teacher(tmp_path / "good.npz")
    other, _ = write_teacher(tmp_path / "other.npz", classes=("cat", "dog"))
    (tmp_path / "junk.npz").write_bytes(b"not a checkpoint")
    with pytest.raises(TeacherError, match=r"other\.npz was trained on the classes \['cat', 'dog'\]"):
        Teacher([good, other], 2.0, EMOTIONS, 0.5, 0.25)
    with pytest.raises(TeacherError, match="missing.npz"):
        Teacher([str(tmp_path / "missing.npz")], 2.0, EMOTIONS, 0.5, 0.25)
    with pytest.raises(TeacherError, match="junk.npz"):
        Teacher([str(tmp_path / "junk.npz")], 2.0, EMOTIONS, 0.5, 0.25)
    with pytest.raises(TeacherError, match="non-empty list"):
        Teacher(good, 2.0, EMOTIONS, 0.5, 0.25)
    nonorm, _ = write_teacher(tmp_path / "nonorm.npz", std=0.0)
    with pytest.raises(TeacherError, match="normalization"):
        Teacher([nonorm], 2.0, EMOTIONS, 0.5, 0.25)
    for bad in (dict(teachers=[]), dict(teachers=good), dict(distill_weight=2.0), dict(distill_temperature=0.0)):
        with pytest.raises(ValueError, match="recipe"):
            Recipe(**bad)


# --- training with a teacher ------------------------------------------------------------------------------
def tiny_data(seed=0):
    return {"train": make_faces(64, seed), "val": make_faces(14, seed + 1), "test": make_faces(14, seed + 2)}


def tiny_recipe(**kw):
    base = dict(epochs=2, batch_size=16, lr=0.02, warmup_epochs=0.5, seed=3,
                augment=dict(crop=2, flip=True, rotate=5.0, scale=0.05, erase=0.25))
    return Recipe(**dict(base, **kw))


QUIET = dict(progress=False, log=lambda m: None, dtype="float64")


def test_no_weight_on_the_teacher_trains_exactly_as_without_one(tmp_path):
    path, _ = write_teacher(tmp_path / "t.npz")
    plain = Trainer(tiny_data(), tiny_recipe(), out_dir=str(tmp_path / "plain"), **QUIET)
    plain.fit()
    zero = Trainer(tiny_data(), tiny_recipe(teachers=[path], distill_weight=0.0), out_dir=str(tmp_path / "zero"),
                   **QUIET)
    zero.fit()
    for k, v in plain.model.state_dict().items():
        np.testing.assert_array_equal(zero.model.state_dict()[k], v, err_msg=k)
    taught = Trainer(tiny_data(), tiny_recipe(teachers=[path], distill_weight=0.7), out_dir=str(tmp_path / "taught"),
                     **QUIET)
    taught.fit()
    w = "features.0.weight"
    assert not np.array_equal(taught.model.state_dict()[w], plain.model.state_dict()[w])


def test_the_teacher_sees_exactly_the_augmented_batch_the_student_sees(tmp_path):
    path, _ = write_teacher(tmp_path / "t.npz")
    tr = Trainer(tiny_data(), tiny_recipe(epochs=1, teachers=[path]), out_dir=str(tmp_path / "run"), **QUIET)
    seen = {"teacher": [], "student": []}
    real, forward = tr.teacher, tr.model.forward

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def __len__(self):
            return len(real)

        def __call__(self, x):
            seen["teacher"].append(x.copy())
            return real(x)

    def student(x):
        seen["student"].append(x.copy())
        return forward(x)
    tr.teacher, tr.model.forward = Spy(), student
    tr.fit()
    # (the 14 validation images come in one batch of 14: the 4 training batches hold 16)
    taught = [x for x in seen["teacher"] if len(x) == 16]
    learnt = [x for x in seen["student"] if len(x) == 16]
    assert len(taught) == len(learnt) == 4
    for t, s in zip(taught, learnt):
        np.testing.assert_array_equal(t, s)


def test_a_distillation_run_resumes_exactly_and_refuses_changed_teachers(tmp_path):
    path, _ = write_teacher(tmp_path / "t.npz")
    recipe = tiny_recipe(teachers=[path], distill_weight=0.6, distill_temperature=3.0, ema=0.9)
    straight = Trainer(tiny_data(), recipe, out_dir=str(tmp_path / "straight"), **QUIET)
    straight.fit()
    out = str(tmp_path / "stopped")
    first = Trainer(tiny_data(), recipe, out_dir=out, **QUIET)
    step, calls = first.optimizer.step, []

    def step_then_stop():
        step()
        calls.append(1)
        if len(calls) == 5:
            first.request_stop()
    first.optimizer.step = step_then_stop
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    meta = json.load(open(os.path.join(out, "last.json")))
    assert meta["teacher_fingerprints"] == first.teacher.fingerprints
    resumed = Trainer(tiny_data(), recipe, out_dir=out, **QUIET)
    resumed.fit(resume=True)
    for k, v in straight.model.state_dict().items():
        np.testing.assert_array_equal(resumed.model.state_dict()[k], v, err_msg=k)
    # The same file name with other contents: the run would not be the one it was.
    write_teacher(tmp_path / "t.npz", seed=9)
    with pytest.raises(CheckpointError, match="teachers whose files had other contents"):
        Trainer(tiny_data(), recipe, out_dir=out, **QUIET).fit(resume=True)


def test_cuda_graph_with_a_teacher_is_refused(tmp_path):
    path, _ = write_teacher(tmp_path / "t.npz")
    with pytest.raises(ValueError, match="--teacher"):
        Trainer(tiny_data(), tiny_recipe(teachers=[path]), out_dir=str(tmp_path), device="gpu", cuda_graph=True)


def test_ranks_with_a_teacher_equal_one_process(tmp_path):
    path, _ = write_teacher(tmp_path / "t.npz")
    data = tiny_data()
    recipe = Recipe(epochs=1, batch_size=10, dropout=0.0, augment=None, lr=0.05, teachers=[path],
                    distill_weight=0.5, distill_temperature=2.0)
    with engines.using("textbook"):
        one = Trainer(data, recipe, out_dir=str(tmp_path / "one"), **QUIET)
        one.fit()

        def rank(comm):
            tr = DistributedTrainer(data, recipe, comm=comm, bn="sync", out_dir=str(tmp_path / "dp"), **QUIET)
            tr.fit()
            return tr
        trainers = ThreadGroup(3).run(rank)
    for tr in trainers:
        for k, v in one.model.state_dict().items():
            if v.dtype.kind == "f":
                np.testing.assert_allclose(tr.model.state_dict()[k], v, rtol=1e-10,
                                           atol=1e-12 * float(np.abs(v).max()), err_msg=k)


def test_cli_distillation_options(tmp_path, capsys):
    from minicnn.cli import build_parser, recipe_from_args, main
    path, _ = write_teacher(tmp_path / "t.npz")
    args = build_parser().parse_args(["train", "--teacher", path, "--teacher", path, "--distill-weight", "0.8"])
    r = recipe_from_args(args)
    assert r.teachers == [os.path.abspath(path)] * 2 and r.distill_weight == 0.8 and r.distill_temperature == 2.0
    assert main(["train", "--distill-temperature", "3", "--out", str(tmp_path / "x")]) == 2
    assert "need --teacher" in capsys.readouterr().err


def test_a_distilled_models_card_names_its_teachers_without_local_paths(tmp_path):
    from minicnn.training.export import export_weights
    os.makedirs(tmp_path / "teachers")
    path, _ = write_teacher(tmp_path / "teachers" / "t.npz")
    tr = Trainer(tiny_data(), tiny_recipe(epochs=1, teachers=[path]), out_dir=str(tmp_path / "run"), **QUIET)
    tr.fit()
    card = export_weights(str(tmp_path / "run" / "best.npz"), str(tmp_path / "w"))
    (teacher,) = card["teachers"]
    assert teacher["file"] == os.path.join("teachers", "t.npz") and teacher["fingerprint"] == tr.teacher.fingerprints[0]
    os.remove(path)                                  # gone: the card still names it by content
    (teacher,) = export_weights(str(tmp_path / "run" / "best.npz"), str(tmp_path / "w2"))["teachers"]
    assert teacher == {"file": os.path.join("teachers", "t.npz"), "fingerprint": tr.teacher.fingerprints[0]}
