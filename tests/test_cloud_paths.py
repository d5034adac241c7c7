"""WORK_DIR, eval and export directories as gs:// URLs.

The `gcs` fixture maps every gs://... path of etils.epath onto a local directory, so these
tests check that each file under a remote WORK_DIR goes through epath -- none may land in a
local `gs:` folder -- without a bucket, with two of epath's backends behind the mapping:
etils' `mock_epath` (its os backend) and the tf.io.gfile backend, which epath uses for gs://
in production (TensorFlow is installed) -- here on local files. Not covered: GCS itself
(TensorFlow's GCS filesystem, credentials), orbax's checkpoints (tensorstore writes their
arrays to gs:// directly) and the JAX profiler's traces.
"""
from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath
from etils.epath import testing as epath_testing
from safetensors.numpy import load_file

from conftest import tiny_config
from simvlm_jax import evaluate, experiment, export, metric_writer, storage, zero_shot
from simvlm_jax.data import tokenizer

BUCKET = "gs://bucket/run"
SENTENCES = ["a red square on a blue background", "two dogs playing in the park"]


class FakeGcs:
    """gs://<path> <-> `root`/<path>; records writes."""

    def __init__(self, root: str):
        self.root = root
        self.writes: list[str] = []  # the URLs opened for writing, in order
        self.backend = ""  # the epath backend behind the mapping

    def local(self, path):
        path = os.fspath(path)
        return os.path.join(self.root, path[len("gs://"):]) if path.startswith("gs://") else path

    def url(self, path: str) -> str:
        return "gs://" + os.path.relpath(path, self.root) if path.startswith(self.root + os.sep) else path

    def redirect(self, fn, path, *args, **kwargs):
        return fn(self.local(path), *[self.local(a) if isinstance(a, (str, os.PathLike)) else a for a in args],
                  **kwargs)

    def open(self, fn, path, mode):
        """As in an object store, writing an object needs no parent "directory"."""
        if ("w" in mode or "a" in mode) and os.fspath(path).startswith("gs://"):
            self.writes.append(os.fspath(path))
            os.makedirs(os.path.dirname(self.local(path)), exist_ok=True)
        return self.redirect(fn, path, mode)

    def glob(self, fn, pattern):
        return [self.url(p) for p in fn(self.local(pattern))]

    def walk(self, fn, top, **kwargs):
        for root, dirs, files in fn(self.local(top), **kwargs):
            yield self.url(os.fspath(root)), dirs, files


class MappedBackend:
    """An epath backend: `inner`'s methods, called on the local paths of `fake`'s URLs."""

    def __init__(self, inner, fake: FakeGcs):
        self.inner, self.fake = inner, fake

    def __getattr__(self, name):
        hook = {"open": self.fake.open, "glob": self.fake.glob, "walk": self.fake.walk}.get(name, self.fake.redirect)
        return functools.partial(hook, getattr(self.inner, name))


@pytest.fixture(params=["mock_epath", "tf_gfile"])
def gcs(request, tmp_path, monkeypatch):
    """A fake gs:// (under tmp_path/gcs); the test runs in tmp_path/cwd, which must stay empty."""
    fake = FakeGcs(str(tmp_path / "gcs"))
    fake.backend = request.param
    os.makedirs(fake.root)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    if request.param == "tf_gfile":  # what epath uses for gs:// when TensorFlow is installed
        monkeypatch.setattr(gpath, "_is_zonal_gcs_bucket", lambda bucket: False)  # would ask GCS
        monkeypatch.setattr(epath_backend, "tf_backend", MappedBackend(epath_backend.tf_backend, fake))
        yield fake
    else:
        # With TensorFlow installed, epath sends gs:// to tf.io.gfile whatever mock_epath sets.
        monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
        names = ("copy", "exists", "isdir", "listdir", "makedirs", "mkdir", "remove", "rename", "replace",
                 "rmtree", "stat")
        with epath_testing.mock_epath(**{n: fake.redirect for n in names}, open=fake.open, glob=fake.glob,
                                      walk=fake.walk):
            yield fake
    assert not os.listdir(tmp_path / "cwd"), "a gs:// path was written as a local path"


def test_fake_gcs_maps_urls_onto_its_root(gcs):
    backend = epath.Path(BUCKET)._backend  # pylint: disable=protected-access
    assert isinstance(backend, MappedBackend) if gcs.backend == "tf_gfile" else type(backend).__name__ == "_MockBackend"
    storage.write_text(f"{BUCKET}/a/b.txt", "hi")
    assert open(os.path.join(gcs.root, "bucket/run/a/b.txt")).read() == "hi"
    assert storage.read_text(f"{BUCKET}/a/b.txt") == "hi"


def test_metric_writer_writes_metrics_and_config_to_a_bucket_and_appends_on_resume(gcs):
    writer = metric_writer.MetricWriter(BUCKET, sync_every_s=3600)
    writer.write_config("train.num_steps = 2\n", {"data": 8}, 1234)
    assert storage.read_text(f"{BUCKET}/config.gin") == "train.num_steps = 2\n"
    writer.write_scalars(1, {"loss": 2.0})
    writer.write_scalars(2, {"loss": 1.5})
    assert storage.read_text(f"{BUCKET}/metrics.jsonl") == ""  # sync_every_s not reached: staged only
    writer.flush()
    assert len(storage.read_text(f"{BUCKET}/metrics.jsonl").splitlines()) == 2
    writer.close()
    resumed = metric_writer.MetricWriter(BUCKET, tensorboard=False, sync_every_s=0)
    resumed.write_scalars(2, {"loss": 1.25})
    # sync_every_s=0: uploaded at once, before close.
    rows = [json.loads(l) for l in storage.read_text(f"{BUCKET}/metrics.jsonl").splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 2.0), (2, 1.5), (2, 1.25)]
    resumed.close()
    events = os.listdir(gcs.local(f"{BUCKET}/tensorboard"))
    assert len(events) == 1 and events[0].startswith("events.out.tfevents.")
    assert os.path.getsize(os.path.join(gcs.local(f"{BUCKET}/tensorboard"), events[0])) > 0
    assert evaluate.read_loss_curve(f"{BUCKET}/metrics.jsonl") == [(1, 2.0), (2, 1.25)]


def test_local_metric_writer_is_unchanged(tmp_path):
    writer = metric_writer.MetricWriter(str(tmp_path / "run"), tensorboard=False)
    writer.write_scalars(3, {"loss": 1.0})
    # Local files are written straight away (no staging): a reader sees the row before close.
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["loss"] == 1.0
    writer.write_config("x = 1\n", {}, 1)
    writer.close()
    assert (tmp_path / "run" / "config.gin").read_text() == "x = 1\n"
    assert sorted(os.listdir(tmp_path / "run")) == ["config.gin", "metrics.jsonl"]


def test_local_mirror_uploads_only_changed_files(gcs):
    mirror = storage.LocalMirror(f"{BUCKET}/m")
    with open(os.path.join(mirror.local_dir, "a.txt"), "w") as f:
        f.write("1")
    mirror.push()
    remote = gcs.local(f"{BUCKET}/m/a.txt")
    os.remove(remote)
    mirror.push()  # unchanged: not uploaded again
    assert not os.path.exists(remote)
    with open(os.path.join(mirror.local_dir, "a.txt"), "a") as f:
        f.write("2")
    mirror.push()
    assert open(remote).read() == "12"
    local_dir = mirror.local_dir
    mirror.cleanup()
    assert not os.path.exists(local_dir)


def test_upload_dir_copies_the_tree_and_puts_the_marker_last(gcs, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for name in ("z.txt", "model.gin", "sub/x.bin"):
        (src / name).write_text(name)
    (src / "empty").write_text("")
    storage.upload_dir(str(src), f"{BUCKET}/out", last=("model.gin",))
    assert gcs.writes == [f"{BUCKET}/out/{n}" for n in ("empty", "sub/x.bin", "z.txt", "model.gin")]
    assert storage.read_text(f"{BUCKET}/out/sub/x.bin") == "sub/x.bin"
    assert storage.read_text(f"{BUCKET}/out/empty") == ""  # tf.io.gfile writes no file without a write


def test_local_copy_downloads_a_url_once(gcs):
    storage.write_text(f"{BUCKET}/tok.model", "v1")
    path = storage.local_copy(f"{BUCKET}/tok.model")
    assert not storage.is_remote(path) and open(path).read() == "v1"
    assert storage.local_copy(f"{BUCKET}/tok.model") == path
    assert storage.local_copy("relative/file") == "relative/file"
    with pytest.raises(FileNotFoundError):
        storage.local_copy(f"{BUCKET}/missing.model")


def test_display_path_keeps_urls():
    assert storage.display_path(BUCKET) == BUCKET
    assert storage.display_path("run") == os.path.abspath("run")
    assert storage.is_remote("s3://b/x") and not storage.is_remote("/tmp/x")


@pytest.fixture(scope="module")
def vocab_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("cloud_vocab")
    return tokenizer.train_sentencepiece(SENTENCES * 16, str(root / "spm.model"), vocab_size=32)


def _params(cfg):
    from simvlm_jax.models import registry  # pylint: disable=g-import-not-at-top
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    params = jax.jit(lambda: nn.meta.unbox(registry.family_of(cfg).init_params(jax.random.key(0))))()
    return jax.tree_util.tree_map(np.asarray, params)


def test_export_round_trip_through_a_bucket(gcs, vocab_path, tmp_path):
    cfg = tiny_config(vocab_size=64)
    params = _params(cfg)
    url = f"{BUCKET}/export"
    storage.write_text(f"{url}/stale.txt", "from an older bundle")
    assert export.export(params, cfg, vocab_path, url, metrics={"cider": 1.0}, step=3, dtype="bfloat16") == url
    files = sorted(os.listdir(gcs.local(url)))
    assert files == ["MODEL_CARD.md", "export_info.json", "model.gin", "params.safetensors", "tokenizer.model"]
    assert json.loads(storage.read_text(f"{url}/export_info.json"))["step"] == 3
    model, loaded, vocab = export.load_export(url)
    assert model.config == cfg
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(loaded), jax.tree_util.tree_leaves(params)):
        np.testing.assert_allclose(a, b, rtol=2 ** -8, atol=0, err_msg=jax.tree_util.keystr(path))
    assert vocab.decode(vocab.encode("two dogs")) == "two dogs"
    # The same bytes as a local export: only where the bundle lives differs.
    local = export.export(params, cfg, vocab_path, str(tmp_path / "export"), metrics={"cider": 1.0}, step=3,
                          dtype="bfloat16")
    for name in ("model.gin", "tokenizer.model", "MODEL_CARD.md"):
        assert open(os.path.join(local, name), "rb").read() == open(os.path.join(gcs.local(url), name), "rb").read()
    here, there = (load_file(os.path.join(d, "params.safetensors")) for d in (local, gcs.local(url)))
    assert here.keys() == there.keys() and all(np.array_equal(here[k], there[k]) for k in here)
    # Restoring for training reads the header and tensors from the URL as from a local file.
    restored = export.load_params_for_training(url, jax.tree_util.tree_map(np.zeros_like, params))
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_half_uploaded_bundle_is_not_an_export(gcs):
    storage.write_text(f"{BUCKET}/export/params.safetensors", "")
    with pytest.raises(FileNotFoundError, match="missing model.gin"):
        export.load_export(f"{BUCKET}/export")


def test_eval_report_and_results_go_to_a_bucket(gcs):
    storage.write_text(f"{BUCKET}/metrics.jsonl", '{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n')
    curve = evaluate.read_loss_curve(f"{BUCKET}/metrics.jsonl")
    assert curve == [(1, 3.0), (2, 2.0)]
    rows = [{"key": "k", "image": np.zeros((8, 8, 3), np.uint8), "references": ["a"], "prediction": "a",
             "cider": 10.0}]
    out_dir = f"{BUCKET}/eval/heldout_step2"
    storage.makedirs(out_dir)
    path = evaluate.write_report(f"{out_dir}/report.html", rows, {"cider": 10.0}, "t", loss_curve=curve,
                                 loss_curve_source=f"{BUCKET}/metrics.jsonl", step=2)
    html = storage.read_text(path)
    assert "loss-curve" in html and f"{BUCKET}/metrics.jsonl" in html


def test_evaluate_captioning_writes_its_files_to_a_bucket(gcs, dataset):
    from simvlm_jax import partitioning  # pylint: disable=g-import-not-at-top
    from simvlm_jax.models import registry  # pylint: disable=g-import-not-at-top
    cfg = tiny_config()
    fam = registry.family_of(cfg)
    shards = os.path.join(dataset.data_dir, "heldout", "*.tar")
    mesh = partitioning.make_mesh(data=8, fsdp=1, tensor=1)
    storage.write_text(f"{BUCKET}/metrics.jsonl", '{"step": 5, "loss": 2.5}\n')
    out = evaluate.evaluate_captioning(fam.module, _params(cfg), dataset.vocab(), mesh, f"{BUCKET}/eval/h_step5",
                                       shards=shards, batch_size=8, max_examples=8, with_constant_baseline=False,
                                       step=5, metrics_jsonl=f"{BUCKET}/metrics.jsonl")
    assert out["report"] == f"{BUCKET}/eval/h_step5/report.html"
    assert sorted(os.listdir(gcs.local(f"{BUCKET}/eval/h_step5"))) == ["captions.json", "metrics.json", "report.html"]
    info = json.loads(storage.read_text(f"{BUCKET}/eval/h_step5/metrics.json"))
    assert info["step"] == 5 and info["metrics"]["num_images"] == 8
    assert len(json.loads(storage.read_text(f"{BUCKET}/eval/h_step5/captions.json"))) == 8


def _write_eval(url: str, step: int, num_images: int = 4) -> None:
    storage.write_text(f"{url}/metrics.json", json.dumps({"step": step, "metrics": {"cider": float(step),
                                                                                   "num_images": num_images}}))


def test_eval_dirs_on_a_bucket_are_never_reused(gcs):
    eval_root = f"{BUCKET}/eval"
    assert experiment.unused_dir(f"{eval_root}/heldout_step5") == f"{eval_root}/heldout_step5"
    _write_eval(f"{eval_root}/heldout_step5", 5)
    assert experiment.unused_dir(f"{eval_root}/heldout_step5") == f"{eval_root}/heldout_step5-2"
    _write_eval(f"{eval_root}/heldout_step5-2", 5)
    assert experiment.unused_dir(f"{eval_root}/heldout_step5") == f"{eval_root}/heldout_step5-3"


def test_latest_eval_metrics_reads_a_bucket(gcs):
    eval_root = f"{BUCKET}/eval"
    assert experiment.latest_eval_metrics(eval_root, 5) is None  # no evals yet
    _write_eval(f"{eval_root}/heldout_step5", 5)
    _write_eval(f"{eval_root}/heldout_step5_first8", 5)  # a subset: not for the model card
    _write_eval(f"{eval_root}/heldout_step9", 9)
    found = experiment.latest_eval_metrics(eval_root, 5)
    assert found == {"cider": 5.0, "num_images": 4, "eval_dir": f"{eval_root}/heldout_step5"}


def test_record_eval_appends_to_a_bucket_metrics_jsonl(gcs):
    storage.write_text(f"{BUCKET}/metrics.jsonl", '{"step": 1, "loss": 3.0}\n')
    experiment._record_eval(BUCKET, 1, {"cider": 12.5, "num_images": 4, "flag": True})
    rows = [json.loads(l) for l in storage.read_text(f"{BUCKET}/metrics.jsonl").splitlines()]
    assert rows[0] == {"step": 1, "loss": 3.0}
    assert rows[1]["step"] == 1 and rows[1]["eval/cider"] == 12.5 and "eval/flag" not in rows[1]


def test_zero_shot_reads_lists_and_writes_output_on_a_bucket(gcs):
    storage.write_text(f"{BUCKET}/classes.txt", "cat\n\n dog \n")
    assert zero_shot._read_lines(f"{BUCKET}/classes.txt") == ["cat", "dog"]
