"""Fine-tuning a model through onnxruntime-training's on-device API.

FineTuner(model, config, teacher).fit(train, val) prepares the training copy (prepare.py),
adds the loss (losses.py), generates the artifacts (training, eval and optimizer graphs and a
checkpoint), and trains with AdamW: learning-rate warm-up and decay (schedule.py), weight
decay, optional gradient clipping, shuffled batches from the seed. It validates before
training and after every epoch, keeps the best weights, and writes them back into the model it
was given: same nodes, same interface, same opset; only weights change.

With a checkpoint folder, the state (weights, optimizer moments, progress, the best weights) is
saved after every epoch, every `checkpoint_every` steps, and when SIGINT/SIGTERM arrives
(between two steps: the run then stops as the signal asks). `resume=True` continues from it,
to the same weights an uninterrupted run reaches.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..core.errors import OnnxPruneError, first_line
from ..core.files import write_text
from ..core.progress import log, progress, progress_bar
from ..core.runtime import import_training_api
from .data import GivenBatches, TrainingData
from .losses import LABELS_INPUT, TEACHER_INPUT, LossSpec, loss_block, loss_terms
from .prepare import (
    MAX_IR,
    NotTrainable,
    TrainingGraph,
    convs_without_batchnorm,
    prepare,
)
from .schedule import learning_rate


@dataclass
class TrainingConfig:
    loss: str | None = None  # ce, mse, kd; None: ce with labels, else mse against the teacher
    epochs: int = 1
    steps: int | None = None  # stop after this many optimizer steps in all
    lr: float = 1e-4
    weight_decay: float = 0.01
    lr_schedule: str = "cosine"
    warmup: float = 0.05  # fraction of the steps
    clip_grad: float | None = None  # max global gradient norm
    temperature: float = 2.0
    kd_alpha: float = 0.5
    batchnorm: str = "train"  # or "frozen"
    # train Convs without a BatchNorm with one, folded back at the end: "on", "off", or "auto"
    # (on with batchnorm "train" and batches of at least UNFOLD_MIN_BATCH)
    unfold_bn: str = "off"
    fraction: float = 1.0  # train for this share of the epochs' steps (iterative pruning's rounds)
    output: str | None = None  # the graph output the loss is about; None: the first
    seed: int = 0
    checkpoint: Path | None = None
    checkpoint_every: int = 500  # steps
    resume: bool = False


@dataclass
class Metrics:
    loss: float | None = None
    accuracy: float | None = None
    cosine: float | None = None  # with the teacher's output
    samples: int = 0

    def to_json(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items() if v is not None}

    def score(self) -> tuple:
        """Higher is better: accuracy where there are labels for it, then the negated loss."""
        loss = -self.loss if self.loss is not None else -math.inf
        return (self.accuracy if self.accuracy is not None else 0.0, loss)


@dataclass
class FineTuneOutcome:
    model: onnx.ModelProto
    report: dict
    history: list = field(default_factory=list)


UNFOLD_MIN_BATCH = 8


class FineTuner:
    def __init__(self, model: onnx.ModelProto, config: TrainingConfig, teacher: onnx.ModelProto | None = None,
                 kept_channels: dict[str, np.ndarray] | None = None, masker=None, regularizer=None) -> None:
        self.model = model
        # gradual pruning's ChannelMasker (masks.py): channels held at zero, growing on a schedule
        self.masker = masker
        # group-lasso or l1 (regularize.py): a proximal step after every optimizer step
        self.regularizer = regularizer
        self.config = config
        self.teacher = teacher
        # tensor -> the teacher's channels each of the model's channels is (a pruning plan's survivors)
        self.kept_channels = kept_channels or {}
        self.mse_on_labels = False  # set with the loss: mse against labels (no teacher to match)
        self._stop = None  # the signal that asked to stop

    # -- the run ----------------------------------------------------------------------------------
    def fit(self, train: TrainingData, val: TrainingData | None = None) -> FineTuneOutcome:
        config = self.config
        started = time.perf_counter()
        artifacts_api, api = import_training_api()
        kind = self._loss_kind(train)
        logits = kind in ("ce", "kd")
        # The training graph is built at the data's dims after the batch axis (see prepare).
        dims = train.sample_dims()
        if val is not None and dims is not None and val.sample_dims() != dims:
            raise OnnxPruneError(f"{val.description}: the validation samples have dims {val.sample_dims()}, the "
                                 f"training samples {dims}; they must match")

        unfold, unfold_note = self._unfold(train)

        def build(batch: int | None) -> TrainingGraph:
            input_dims = {name: [batch, *d] for name, d in dims.items()} if dims else None
            return prepare(self.model, config.output, logits=logits, batchnorm=config.batchnorm,
                           input_dims=input_dims, unfold=unfold)

        graph = build(None)
        if self.masker is not None:
            self.masker.couple(graph.unfolded)
        teacher = _Teacher(self.teacher, graph.loss_input if logits else graph.output) \
            if kind == "kd" or (kind == "mse" and not self.mse_on_labels) else None
        first_feed, first_labels = next(iter(train.epoch(0, config.seed)))
        spec = self._loss_spec(kind, graph, train, first_feed, first_labels)
        notes = []
        if spec.rank >= 3 and kind == "kd" and not spec.labels:
            where = "the last axis" if spec.class_axis == -1 else "axis 1"
            notes.append(f"kd compares the distributions over {where} of {graph.loss_input!r} (read as its class "
                         "axis: give labels to say it for sure)")
        with self._folder() as folder:
            meta = self._meta(graph, spec, train)
            state_dir, artifacts = folder / "state", folder / "artifacts"
            resumed = self._resume_point(folder, meta) if config.resume else None
            if resumed is None:
                _check_fresh(folder, config)
                artifacts.mkdir(parents=True, exist_ok=True)
                feed = self._ordered_feed(spec, teacher, first_feed, first_labels)
                static_batch = None
                static = self._generate_and_probe(artifacts_api, graph, spec, artifacts, feed, train, build)
                if static is not None:
                    graph, static_batch = static
                    train.drop_last = True
                    notes.append(f"trained at a fixed batch of {static_batch} (onnxruntime-training fails on this "
                                 "graph with a dynamic batch); a last partial batch is left out of each epoch")
                meta["static_batch"] = static_batch
                write_text(folder / "meta.json", json.dumps(meta, indent=1), "checkpoint")
                state = api.CheckpointState.load_checkpoint(str(artifacts / "checkpoint"))
            else:
                static_batch = resumed["static_batch"]
                if static_batch is not None:
                    graph, train.drop_last = build(static_batch), True
                state = api.CheckpointState.load_checkpoint(str(resumed["path"] / "state"))
            module = api.Module(str(artifacts / "training_model.onnx"), state, str(artifacts / "eval_model.onnx"))
            optimizer = api.Optimizer(str(artifacts / "optimizer_model.onnx"), module)
            run = _Run(self, graph, spec, module, optimizer, state, teacher, train, val, state_dir, static_batch)
            if resumed is not None:
                run.restore(resumed)
            outcome = run.train()
        report = outcome.report
        report.update(loss=kind, output=graph.output, loss_input=graph.loss_input, lowered=graph.lowered,
                      batchnorm=config.batchnorm, seconds=round(time.perf_counter() - started, 2))
        report["notes"] = graph.notes + train.notes + notes + unfold_note + report.get("notes", [])
        return outcome

    def _generate_and_probe(self, artifacts_api, graph, spec, artifacts: Path, feed: dict, train: TrainingData,
                            build):
        """Generate the artifacts and try one step; if that fails with a dynamic batch, try again
        with the batch fixed. Returns (graph, batch) when the fixed batch was needed, else None."""
        generate_artifacts(artifacts_api, graph, spec, artifacts, self.config)
        try:
            probe_step(artifacts, feed)
            return None
        except NotTrainable as first:
            batch = len(next(iter(feed.values())))
            if isinstance(train, GivenBatches):
                fixable = train.uniform_batch() == batch
            else:
                fixable = batch == train.batch_size and train.samples and train.samples >= batch
            if not fixable:
                raise
            log.info("training step failed with a dynamic batch (%s); trying a fixed batch of %d", first, batch)
            static = build(batch)
            generate_artifacts(artifacts_api, static, spec, artifacts, self.config)
            try:
                probe_step(artifacts, feed)
            except NotTrainable:
                raise first from None
            return static, batch

    def _unfold(self, train: TrainingData) -> tuple[dict | None, list[str]]:
        """The statistics for unfolded BatchNorms, if they are wanted, and a note when auto left them out."""
        mode, config = self.config.unfold_bn, self.config
        if mode == "off":
            return None, []
        batch = train.batch_size or (train.uniform_batch() if isinstance(train, GivenBatches) else None) or 0
        if mode == "auto" and (config.batchnorm != "train" or batch < UNFOLD_MIN_BATCH):
            if convs_without_batchnorm(self.model) and config.batchnorm == "train":
                return None, [f"BatchNorms not unfolded for training: batches of {batch} are too small for batch "
                              f"statistics (unfold_bn on forces it)"]
            return None, []
        return self._conv_statistics(train), []

    def _conv_statistics(self, train: TrainingData, samples: int = 256) -> dict:
        """For every Conv output without a BatchNorm: the per-channel mean and variance the
        unfolded BatchNorm normalises with (this model's, over the first `samples` training
        samples), and the mean and variance it restores: the teacher's at the same channels
        when there is a teacher whose channels are known (the BatchNorm then starts where the
        pruned model's folded one would have put the activations back), else this model's own
        (it starts as the identity)."""
        if self.config.batchnorm != "train":
            raise OnnxPruneError("unfold_bn: unfolded BatchNorms train on batch statistics; use batchnorm 'train'")
        outputs = convs_without_batchnorm(self.model)
        if not outputs:
            return {}
        own = _channel_moments(self.model, outputs, train, self.config.seed, samples)
        target = dict(own)
        if self.teacher is not None:
            produced = {o for n in self.teacher.graph.node for o in n.output}
            known = [name for name in outputs if name in produced]
            if known:
                theirs = _channel_moments(self.teacher, known, train, self.config.seed, samples)
                for name, (mean, var) in theirs.items():
                    keep = self.kept_channels.get(name)
                    if keep is None and len(mean) == len(own[name][0]):
                        keep = np.arange(len(mean))
                    if keep is not None and len(keep) == len(own[name][0]):
                        target[name] = (mean[keep], var[keep])
        return {name: (own[name], target[name]) for name in outputs}

    def _ordered_feed(self, spec: LossSpec, teacher, feed: dict, labels) -> dict:
        values = dict(feed)
        if spec.labels:
            values[LABELS_INPUT] = np.asarray(labels, np.int64 if spec.kind != "mse" else np.float32)
        if spec.teacher:
            values[TEACHER_INPUT] = teacher(feed)
        return values

    def _loss_kind(self, train: TrainingData) -> str:
        kind = self.config.loss or ("ce" if train.has_labels else "mse")
        self.mse_on_labels = kind == "mse" and self.teacher is None
        if kind == "ce" and not train.has_labels:
            raise OnnxPruneError(f"loss ce: {train.description} has no labels (give them, or use loss mse or kd with "
                                 "a teacher)")
        if kind == "kd" and self.teacher is None:
            raise OnnxPruneError("loss kd: needs a teacher model (the original model) to distil from")
        if kind == "mse" and self.teacher is None and not train.has_labels:
            raise OnnxPruneError(f"loss mse: {train.description} has no labels (targets), and no teacher model is "
                                 "given to match")
        return kind

    def _loss_spec(self, kind: str, graph: TrainingGraph, train: TrainingData, feed, labels) -> LossSpec:
        """The loss's shape facts, read from one forward run of the model on the first batch."""
        scores = _forward(self.model, graph.loss_input, feed)
        rank = scores.ndim
        class_axis = unlabelled_class_axis(self.model, graph.loss_input, rank)
        # mse reads the labels as targets only without a teacher to match
        uses_labels = train.has_labels and (kind in ("ce", "kd") or self.mse_on_labels)
        if uses_labels and kind in ("ce", "kd"):
            labels = np.asarray(labels)
            if labels.dtype.kind not in "iu":
                raise OnnxPruneError(f"loss {kind}: the labels must be class ids (integers), got {labels.dtype}")
            if labels.shape == scores.shape[:1] + scores.shape[2:]:
                class_axis = 1
            elif labels.shape == scores.shape[:-1]:
                class_axis = -1
            else:
                raise OnnxPruneError(f"loss {kind}: labels of shape {list(labels.shape)} do not fit the model's "
                                     f"{graph.loss_input!r} of shape {list(scores.shape)} (expected the shape "
                                     "without the class axis)")
            classes = scores.shape[class_axis]
            if labels.size and (labels.min() < 0 or labels.max() >= classes):
                raise OnnxPruneError(f"loss {kind}: labels run from {labels.min()} to {labels.max()}, and "
                                     f"{graph.loss_input!r} has {classes} classes")
        if kind == "mse" and uses_labels and np.asarray(labels).shape != scores.shape:
            raise OnnxPruneError(f"loss mse: targets of shape {list(np.asarray(labels).shape)} do not match output "
                                 f"{graph.output!r} of shape {list(scores.shape)}")
        return LossSpec(kind, labels=uses_labels, teacher=not (kind == "ce" or self.mse_on_labels),
                        rank=rank, class_axis=class_axis, temperature=self.config.temperature,
                        alpha=self.config.kd_alpha)

    # -- the checkpoint folder ---------------------------------------------------------------------
    @contextlib.contextmanager
    def _folder(self):
        if self.config.checkpoint is not None:
            folder = Path(self.config.checkpoint)
            folder.mkdir(parents=True, exist_ok=True)
            yield folder
            return
        if self.config.resume:
            raise OnnxPruneError("resume: give the checkpoint folder to resume from")
        with tempfile.TemporaryDirectory(prefix="onnxprune-train-") as tmp:
            yield Path(tmp)

    def _meta(self, graph: TrainingGraph, spec: LossSpec, train: TrainingData) -> dict:
        """What a checkpoint must match to be resumed: the model's weights and the settings."""
        digest = hashlib.sha256()
        for init in sorted(graph.model.graph.initializer, key=lambda t: t.name):
            digest.update(init.name.encode())
            digest.update(init.SerializeToString())
        settings = {k: v for k, v in asdict(self.config).items() if k not in ("checkpoint", "resume",
                                                                              "checkpoint_every")}
        if self.regularizer is not None:
            settings["regularize"] = [self.regularizer.kind, self.regularizer.strength]
        return {"weights": digest.hexdigest(), "settings": json.loads(json.dumps(settings, default=str)),
                "loss": asdict(spec), "data": train.description}

    def _resume_point(self, folder: Path, meta: dict) -> dict | None:
        pointer = folder / "state" / "latest"
        if not pointer.is_file():
            raise OnnxPruneError(f"resume: {folder} holds no checkpoint to resume from")
        saved = json.loads((folder / "meta.json").read_text())
        for key, what in (("weights", "the model's weights"), ("settings", "the training settings"),
                          ("loss", "the loss"), ("data", "the training data")):
            if saved.get(key) != meta[key]:
                raise OnnxPruneError(f"resume: the checkpoint in {folder} was made with different {what}; "
                                     "remove it to start over")
        path = folder / "state" / pointer.read_text().strip()
        progress = json.loads((path / "progress.json").read_text())
        return {"path": path, "static_batch": saved.get("static_batch"), **progress}


class _Run:
    """One training run's loop state."""

    def __init__(self, tuner: FineTuner, graph: TrainingGraph, spec: LossSpec, module, optimizer, state, teacher,
                 train: TrainingData, val: TrainingData | None, state_dir: Path,
                 static_batch: int | None = None) -> None:
        self.tuner, self.config = tuner, tuner.config
        self.graph, self.spec = graph, spec
        self.module, self.optimizer, self.state = module, optimizer, state
        self.teacher, self.train_data, self.val_data = teacher, train, val
        self.state_dir = state_dir
        self.static_batch = static_batch  # the graph takes batches of exactly this size
        self.names = module.input_names()
        per_epoch = train.batches_per_epoch()
        self.per_epoch = per_epoch
        total = per_epoch * self.config.epochs if per_epoch is not None else None
        if total is not None and self.config.fraction < 1.0:
            total = max(1, math.ceil(total * self.config.fraction))
        if self.config.steps is not None:
            total = min(total, self.config.steps) if total is not None else self.config.steps
        self.total = total
        self.step = 0  # optimizer steps done
        self.epoch, self.batch = 0, 0  # where the next step starts
        self.history: list[dict] = []
        self.best: dict | None = None  # {"epoch", "score", "metrics", "weights"}
        self.before: Metrics | None = None
        self.step_seconds = 0.0
        self.samples_seen = 0
        self.epoch_losses: list[float] = []  # of the epoch under way
        self.resumed_from = None

    # -- feeding -----------------------------------------------------------------------------------
    def _inputs(self, feed: dict, labels) -> list:
        values = dict(feed)
        if self.spec.labels:
            values[LABELS_INPUT] = np.asarray(labels, np.int64 if self.spec.kind != "mse" else np.float32)
        if self.spec.teacher:
            values[TEACHER_INPUT] = self.teacher(feed)
        missing = [n for n in self.names if n not in values]
        if missing:
            raise OnnxPruneError(f"the training graph wants inputs {missing} that the data does not give")
        return [values[n] for n in self.names]

    # -- the loop ----------------------------------------------------------------------------------
    def train(self) -> FineTuneOutcome:
        config = self.config
        masker = self.tuner.masker
        updates = set(masker.schedule(self.total or 0)) if masker is not None else set()
        bar = None
        try:
            # From here a SIGINT/SIGTERM is held until the next step, which saves the state first
            # (also when it comes while the weights as they came are evaluated).
            with self._signals():
                if self.before is None:
                    self.before = self.evaluate()
                    if self.before is not None and masker is None and self.tuner.regularizer is None:
                        # the weights as they came compete too (not where training is to zero things)
                        self.best = {"epoch": 0, "score": self.before.score(), "metrics": self.before.to_json(),
                                     "weights": self._weights()}
                self.module.train()
                bar = progress_bar("fine-tuning", total=self.total, unit="step")
                bar.update(self.step)
                while self.epoch < config.epochs and (self.total is None or self.step < self.total):
                    epoch_started, losses = time.perf_counter(), self.epoch_losses
                    for index, (feed, labels) in enumerate(self.train_data.epoch(self.epoch, config.seed)):
                        if index < self.batch:
                            continue  # resumed inside this epoch
                        if self.total is not None and self.step >= self.total:
                            break
                        loss = self._step(feed, labels)
                        if masker is not None:
                            if self.step in updates:
                                masker.update(self.step, self.total, self.state.parameters)
                            masker.apply(self.state.parameters)
                        if self.tuner.regularizer is not None:
                            self.tuner.regularizer.apply(self.state.parameters, self.lr)
                        losses.append(loss)
                        self.batch = index + 1
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss:.4g}", samples_s=f"{self._throughput():.0f}")
                        if self.tuner._stop is not None:
                            self._save()
                            return self._stopped()
                        if config.checkpoint is not None and self.step % config.checkpoint_every == 0:
                            self._save()
                    self._end_epoch(losses, time.perf_counter() - epoch_started)
                    if config.checkpoint is not None:
                        self._save()
        finally:
            if bar is not None:
                bar.close()
        return self._finish()

    def _step(self, feed, labels) -> float:
        started = time.perf_counter()
        self.lr = learning_rate(self.step, self.total, self.config.lr, self.config.lr_schedule, self.config.warmup)
        self.optimizer.set_learning_rate(self.lr)
        outputs = self.module(*self._inputs(feed, labels))
        loss = float(np.asarray(outputs[0] if isinstance(outputs, (list, tuple)) else outputs))
        if not math.isfinite(loss):
            raise OnnxPruneError(f"training diverged at step {self.step + 1} (loss {loss}); lower the learning rate "
                                 f"(now {self.config.lr:g}) or clip gradients")
        self.optimizer.step()
        self.module.lazy_reset_grad()
        self.step += 1
        self.step_seconds += time.perf_counter() - started
        self.samples_seen += len(next(iter(feed.values())))
        return loss

    def _throughput(self) -> float:
        return self.samples_seen / self.step_seconds if self.step_seconds else 0.0

    def _end_epoch(self, losses: list, seconds: float) -> None:
        entry = {"epoch": self.epoch + 1, "steps": self.step, "train_loss": round(float(np.mean(losses)), 6)
                 if losses else None, "seconds": round(seconds, 2)}
        if self.val_data is not None:
            metrics = self.evaluate()
            entry["val"] = metrics.to_json()
            if self.tuner.masker is not None or self.tuner.regularizer is not None:
                # masks grow, zeros accumulate: only the last weights have all of them
                self.best = {"epoch": self.epoch + 1, "score": metrics.score(), "metrics": metrics.to_json(),
                             "weights": None}
            elif self.best is None or metrics.score() > self.best["score"]:
                self.best = {"epoch": self.epoch + 1, "score": metrics.score(), "metrics": metrics.to_json(),
                             "weights": self._weights()}
            self.module.train()
        log.info("fine-tuning epoch %d: train loss %s%s", self.epoch + 1, entry["train_loss"],
                 f", val {entry['val']}" if "val" in entry else "")
        self.history.append(entry)
        self.epoch += 1
        self.batch = 0
        self.epoch_losses = []

    def evaluate(self) -> Metrics | None:
        """Loss, and accuracy or cosine with the teacher, on the validation data (eval mode).
        Computed from the model's scores, sample by sample, so that a batch padded to a fixed
        batch size counts its real rows only."""
        if self.val_data is None:
            return None
        self.module.eval()
        losses, correct, labelled, cosines = [], 0, 0, []
        for feed, labels in progress(self.val_data.epoch(0, self.config.seed, shuffle=False), "validating",
                                     unit="batch"):
            if self.spec.labels and labels is None:
                raise OnnxPruneError(f"{self.val_data.description}: the validation data has no labels, and the loss "
                                     "needs them")
            for part, part_labels in _chunks(feed, labels, self.static_batch):
                n = len(next(iter(part.values())))
                padded, padded_labels = _padded(part, part_labels, self.static_batch)
                scores = np.asarray(self.module(*self._inputs(padded, padded_labels))[1])[:n]
                teacher = self.teacher.output(padded)[:n] if self.teacher is not None else None
                losses.append(loss_terms(self.spec, scores, part_labels, teacher))
                if part_labels is not None and self.spec.kind in ("ce", "kd"):
                    axis = self.spec.class_axis if self.spec.class_axis == 1 else scores.ndim - 1
                    correct += int((scores.argmax(axis=axis) == np.asarray(part_labels)).sum())
                    labelled += np.asarray(part_labels).size
                if teacher is not None:
                    cosines.append(_cosine_rows(scores, teacher))
        self.module.train()
        per_sample = np.concatenate(losses) if losses else np.zeros(0)
        return Metrics(loss=float(per_sample.mean()) if per_sample.size else None,
                       accuracy=correct / labelled if labelled else None,
                       cosine=float(np.mean(np.concatenate(cosines))) if cosines else None, samples=len(per_sample))

    def _weights(self) -> dict[str, np.ndarray]:
        params = self.state.parameters
        return {name: np.array(params[name].data, copy=True) for name in self.graph.written_back}

    def _finish(self) -> FineTuneOutcome:
        chosen = self.best["weights"] if self.best is not None and self.best["weights"] is not None \
            else self._weights()
        model = write_back(self.tuner.model, chosen, self.graph)
        report = {
            "steps": self.step, "epochs": len(self.history), "batch_size": self.train_data.batch_size or None,
            "data": self.train_data.description, "samples": self.train_data.samples,
            "optimizer": {"name": "AdamW", "lr": self.config.lr, "weight_decay": self.config.weight_decay,
                          "schedule": self.config.lr_schedule, "warmup": self.config.warmup,
                          "clip_grad": self.config.clip_grad},
            "seed": self.config.seed,
            "trained": {"tensors": len(self.graph.trainable),
                        "values": int(sum(np.prod(v.shape) for k, v in chosen.items() if k in self.graph.trainable))},
            "step_ms": round(1000 * self.step_seconds / self.step, 2) if self.step else None,
            "samples_per_s": round(self._throughput(), 1),
            "history": self.history,
        }
        if self.val_data is not None:
            report["val"] = self.val_data.description
            report["before"] = self.before.to_json() if self.before else None
            report["after"] = self.best["metrics"] if self.best else None
            report["best_epoch"] = self.best["epoch"] if self.best else None
            if self.best is not None and self.best["epoch"] == 0:
                report["notes"] = ["no epoch did better on the validation data than the weights as they came: "
                                   "they are kept"]
        if self.resumed_from is not None:
            report["resumed_from_step"] = self.resumed_from
        return FineTuneOutcome(model, report, self.history)

    # -- checkpoints ---------------------------------------------------------------------------------
    def _save(self) -> None:
        """Write the state as step-N/ and point `latest` at it; older states are removed after."""
        api = import_training_api()[1]
        self.state_dir.mkdir(parents=True, exist_ok=True)
        name = f"step-{self.step:08d}"
        staging = self.state_dir / f".{name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        api.CheckpointState.save_checkpoint(self.state, str(staging / "state"), include_optimizer_state=True)
        progress = {"step": self.step, "epoch": self.epoch, "batch": self.batch, "history": self.history,
                    "before": self.before.to_json() if self.before else None,
                    "best": None if self.best is None else {k: v for k, v in self.best.items() if k != "weights"},
                    "step_seconds": self.step_seconds, "samples_seen": self.samples_seen,
                    "epoch_losses": self.epoch_losses,
                    "masks": None if self.tuner.masker is None else self.tuner.masker.removed()}
        (staging / "progress.json").write_text(json.dumps(progress))
        if self.best is not None and self.best["weights"] is not None:
            np.savez(staging / "best.npz", **{f"w{i}": v for i, v in enumerate(self.best["weights"].values())})
        movement = getattr(self.tuner.masker, "movement", None)  # movement pruning's scores, if masks use them
        arrays = movement.sums if movement is not None else {}
        if arrays:
            (staging / "masker.json").write_text(json.dumps(list(arrays)))
            np.savez(staging / "masker.npz", **{f"a{i}": v for i, v in enumerate(arrays.values())})
        final = self.state_dir / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        write_text(self.state_dir / "latest", name, "checkpoint")
        for old in self.state_dir.iterdir():
            if old.is_dir() and old.name.startswith("step-") and old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    def restore(self, saved: dict) -> None:
        self.step, self.epoch, self.batch = saved["step"], saved["epoch"], saved["batch"]
        self.history = saved["history"]
        self.step_seconds, self.samples_seen = saved["step_seconds"], saved["samples_seen"]
        self.epoch_losses = list(saved["epoch_losses"])
        self.before = Metrics(**saved["before"]) if saved.get("before") else None
        if saved.get("best") is not None:
            weights = None
            if (saved["path"] / "best.npz").exists():
                with np.load(saved["path"] / "best.npz") as npz:
                    weights = {name: npz[f"w{i}"] for i, name in enumerate(self.graph.written_back)}
            self.best = {**saved["best"], "score": tuple(saved["best"]["score"]), "weights": weights}
        if saved.get("masks") is not None and self.tuner.masker is not None:
            self.tuner.masker.restore(saved["masks"], self.state.parameters)
        movement = getattr(self.tuner.masker, "movement", None)
        if (saved["path"] / "masker.json").exists() and movement is not None:
            names = json.loads((saved["path"] / "masker.json").read_text())
            with np.load(saved["path"] / "masker.npz") as npz:
                movement.sums.update({name: npz[f"a{i}"] for i, name in enumerate(names)})
        self.resumed_from = self.step
        log.info("fine-tuning resumed at step %d (epoch %d, batch %d)", self.step, self.epoch + 1, self.batch)

    @contextlib.contextmanager
    def _signals(self):
        """SIGINT/SIGTERM set a flag checked between steps (main thread only): the state is saved
        whole, then the signal's usual handling goes on."""
        if self.config.checkpoint is None or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {}

        def ask_to_stop(signum, frame):
            self.tuner._stop = (signum, previous.get(signum))

        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, ask_to_stop)
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _stopped(self) -> FineTuneOutcome:
        signum, handler = self.tuner._stop
        self.tuner._stop = None
        log.warning("fine-tuning stopped at step %d; the state is saved in %s (resume to continue)", self.step,
                    self.config.checkpoint)
        if callable(handler):
            handler(signum, None)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)


def _channel_moments(model: onnx.ModelProto, outputs: list[str], data: TrainingData, seed: int,
                     samples: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel (axis 1) mean and variance of `outputs` over the first `samples` samples."""
    from ..calibration import collect_channel_stats

    feeds, seen = [], 0
    for feed, _ in data.epoch(0, seed, shuffle=False):
        feeds.append(feed)
        seen += len(next(iter(feed.values())))
        if seen >= samples:
            break
    stats = collect_channel_stats(model, feeds, {name: 1 for name in outputs})
    return {name: (stats[name].mean, stats[name].variance) for name in outputs}


def _chunks(feed: dict, labels, size: int | None):
    """The batch in pieces of at most `size` samples (None: whole)."""
    n = len(next(iter(feed.values())))
    if size is None or n <= size:
        yield feed, labels
        return
    for start in range(0, n, size):
        yield ({k: v[start:start + size] for k, v in feed.items()},
               None if labels is None else labels[start:start + size])


def _padded(feed: dict, labels, size: int | None):
    """The batch filled up to `size` samples by repeating its rows (None: as it is)."""
    n = len(next(iter(feed.values())))
    if size is None or n == size:
        return feed, labels
    take = np.arange(size) % n
    return ({k: v[take] for k, v in feed.items()}, None if labels is None else np.asarray(labels)[take])


class _Teacher:
    """The teacher's tensor (its logits, or its output) for a batch, from an InferenceSession."""

    def __init__(self, model: onnx.ModelProto, tensor: str) -> None:
        self.tensor = tensor
        self.session = tensor_session(model, tensor)
        self.output_name = model.graph.output[0].name
        self._last = None

    def __call__(self, feed: dict) -> np.ndarray:
        try:
            value = self.session.run([self.tensor], feed)[0]
        except Exception as exc:  # onnxruntime's own error types
            raise OnnxPruneError(f"the teacher model does not run on the training data ({_ort_message(str(exc))})") \
                from None
        self._last = (id(feed), value)
        return value.astype(np.float32)

    def output(self, feed: dict) -> np.ndarray:
        if self._last is not None and self._last[0] == id(feed):
            return self._last[1]
        return self(feed)


def tensor_session(model: onnx.ModelProto, tensor: str):
    import onnxruntime as ort

    outputs = {o.name for o in model.graph.output}
    if tensor not in outputs:
        model = _with_output(model, tensor)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise OnnxPruneError(f"the model does not run in onnxruntime ({first_line(exc)})") from None


def _with_output(model: onnx.ModelProto, tensor: str) -> onnx.ModelProto:
    produced = {o for n in model.graph.node for o in n.output}
    if tensor not in produced:
        raise OnnxPruneError(f"the teacher model has no tensor {tensor!r} to distil from (give a teacher with the "
                             "same output structure)")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    return copy


def _forward(model: onnx.ModelProto, tensor: str, feed: dict) -> np.ndarray:
    try:
        return tensor_session(model, tensor).run([tensor], feed)[0]
    except OnnxPruneError:
        raise
    except Exception as exc:  # onnxruntime's own error types
        raise OnnxPruneError(f"the model does not run on the training data ({_ort_message(str(exc))})") from None


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(norms, 1e-12)


def _check_fresh(folder: Path, config: TrainingConfig) -> None:
    if (folder / "state" / "latest").exists():
        raise OnnxPruneError(f"{folder} holds the checkpoint of an earlier run: resume it, or remove the folder to "
                             "start over")


def generate_artifacts(artifacts_api, graph: TrainingGraph, spec: LossSpec, folder: Path,
                       config: TrainingConfig) -> None:
    """The training, eval and optimizer graphs and the checkpoint for `graph` with `spec`'s loss."""
    import onnxruntime
    from onnxruntime.training import onnxblock

    onnxruntime.set_default_logger_severity(3)  # generate_artifacts logs every graph transformer at INFO
    clip = onnxblock.optim.ClipGradNorm(config.clip_grad) if config.clip_grad else None
    optimizer = onnxblock.optim.AdamW(weight_decay=config.weight_decay, clip_grad=clip)
    try:
        with _quiet_stderr():  # its gradient builder logs every graph transformer, whatever the severity
            artifacts_api.generate_artifacts(
                graph.model, requires_grad=graph.trainable, frozen_params=graph.frozen,
                loss=loss_block(spec, onnxblock), optimizer=optimizer, artifact_directory=str(folder),
                loss_input_names=[graph.loss_input], additional_output_names=[graph.loss_input])
    except Exception as exc:
        raise NotTrainable(_artifact_error(exc, graph.model)) from None
    for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx"):
        path = folder / name
        model = onnx.load(str(path))
        if model.ir_version > MAX_IR:  # onnx writes its newest IR; onnxruntime-training 1.19 reads up to 10
            model.ir_version = MAX_IR
            onnx.save(model, str(path))


_PROBE = """
import sys, numpy as np
sys.modules.setdefault("onnxruntime.training.amp", type(sys)("onnxruntime.training.amp"))
sys.modules.setdefault("onnxruntime.training.optim", type(sys)("onnxruntime.training.optim"))
from onnxruntime.training import api
folder = sys.argv[1]
state = api.CheckpointState.load_checkpoint(folder + "/checkpoint")
module = api.Module(folder + "/training_model.onnx", state, folder + "/eval_model.onnx")
optimizer = api.Optimizer(folder + "/optimizer_model.onnx", module)
with np.load(folder + "/probe.npz") as feed:
    module(*[feed[name] for name in module.input_names()])
optimizer.step()
"""


def probe_step(folder: Path, feed: dict) -> None:
    """One training step in a child process first: onnxruntime-training 1.19 can crash the
    process on some graphs (a segmentation fault in a gradient kernel, seen on a Paddle export),
    and a crash must become a one-line error, not the end of the user's process."""
    import subprocess
    import sys

    np.savez(folder / "probe.npz", **feed)
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE, str(folder)], capture_output=True, text=True,
                              timeout=3600)
    finally:
        (folder / "probe.npz").unlink(missing_ok=True)
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name if -done.returncode in signal.Signals._value2member_map_ \
            else str(-done.returncode)
        raise NotTrainable(f"onnxruntime-training crashed ({name}) on a training step of this model, "
                           "so it cannot be fine-tuned with this release")
    if done.returncode != 0:
        raise NotTrainable(f"onnxruntime-training failed on a training step ({_ort_message(done.stderr)})")


def _ort_message(text: str) -> str:
    """The informative part of an onnxruntime error: what follows its status code (and the
    C++ location before it is left out)."""
    import re

    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("20")
             and not line.startswith((" ", "Traceback"))]
    last = lines[-1] if lines else "no message"
    found = re.search(r"\[ONNXRuntimeError\] : \d+ : (\w+) : (.*)", last)
    if found:
        last = found.group(2)
        status = re.search(r"Status Message: \S+:\d+ \S+ (.*)", last)
        if status:  # "Non-zero status ... running Mul node. Name:'x' Status Message: file.h:640 fn(...) what"
            last = last.split(" Status Message:")[0] + ": " + status.group(1)
    return " ".join(last.split())[:400]


@contextlib.contextmanager
def _quiet_stderr():
    """Native code's writes to file descriptor 2 go to a scratch file for the duration."""
    import sys

    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real stderr (captured, notebook): nothing to hide
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as scratch:
        os.dup2(scratch.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)


def _artifact_error(exc: Exception, model: onnx.ModelProto) -> str:
    text = str(exc)
    marker = "The gradient builder has not been registered:"
    if marker in text:
        op = text.split(marker, 1)[1].split()[0].strip(" .,'\"")
        node = next((n for n in model.graph.node if n.op_type == op), None)
        where = f"node {node.name or node.output[0]!r} ({op})" if node is not None else f"op {op}"
        return f"{where}: onnxruntime-training has no gradient for {op}, and onnxprune has no lowering for it yet"
    return f"onnxruntime-training could not build the training graph ({first_line(exc)})"


def write_back(model: onnx.ModelProto, weights: dict[str, np.ndarray], graph: TrainingGraph) -> onnx.ModelProto:
    """A copy of `model` with the trained values in its initializers and Constant nodes, and the
    BatchNorms put in for training folded into their Convs (a Conv without a bias gets one)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    remaining = dict(weights)
    folded = {}
    for unfolded in graph.unfolded:
        scale, shift, mean, var = (remaining.pop(name).astype(np.float64) for name in
                                   (unfolded.scale, unfolded.shift, unfolded.mean, unfolded.var))
        gain = scale / np.sqrt(var + unfolded.epsilon)
        weight = remaining.get(unfolded.weight)
        if weight is None:  # not trained (frozen): fold into the value the model holds
            weight = _value(out, unfolded.weight)
        bias = remaining.get(unfolded.bias) if unfolded.bias else None
        if bias is None:
            bias = _value(out, unfolded.bias) if unfolded.bias else np.zeros_like(mean)
        remaining[unfolded.weight] = weight * gain.reshape(-1, *([1] * (weight.ndim - 1))).astype(weight.dtype)
        folded[unfolded] = ((bias.astype(np.float64) - mean) * gain + shift).astype(np.float32)
        if unfolded.bias:
            remaining[unfolded.bias] = folded[unfolded]
    for init in out.graph.initializer:
        if init.name in remaining:
            value = remaining.pop(init.name)
            dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
            init.CopyFrom(numpy_helper.from_array(value.astype(dtype).reshape(tuple(init.dims)), init.name))
    for node in out.graph.node:
        if node.op_type == "Constant" and node.output[0] in remaining:
            value = remaining.pop(node.output[0])
            tensor = node.attribute[0].t
            node.attribute[0].t.CopyFrom(numpy_helper.from_array(value.astype(np.float32).reshape(tuple(tensor.dims)),
                                                                 tensor.name))
    for unfolded, bias in folded.items():
        if unfolded.bias:
            continue
        conv = next(n for n in out.graph.node if n.op_type == "Conv" and n.output[0] == unfolded.conv_output)
        name = f"{unfolded.conv_output}_bias"
        while name in {i.name for i in out.graph.initializer}:
            name += "_"
        out.graph.initializer.append(numpy_helper.from_array(bias, name))
        if len(conv.input) < 3:
            conv.input.append(name)
        else:
            conv.input[2] = name
    if remaining:
        raise OnnxPruneError(f"trained weights {sorted(remaining)[:3]} have no place in the model (a bug)")
    return out


def _value(model: onnx.ModelProto, name: str) -> np.ndarray:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    raise OnnxPruneError(f"no weight {name!r} in the model (a bug)")


def unlabelled_class_axis(model: onnx.ModelProto, name: str, rank: int) -> int:
    """The class axis of scores when no labels say it: 1 (ONNX's convention, [N, C, ...] as
    classifiers and segmenters give), except where the declared shape reads [batch, sequence,
    classes]: a rank-3 output whose axis 1 is a named (dynamic) dim and whose last is fixed, as
    language models' logits are."""
    if rank != 3:
        return 1
    for value in list(model.graph.output) + list(model.graph.value_info):
        if value.name == name and value.type.tensor_type.HasField("shape"):
            dims = value.type.tensor_type.shape.dim
            if len(dims) == 3 and not dims[1].HasField("dim_value") and dims[2].HasField("dim_value"):
                return -1
            break
    return 1
