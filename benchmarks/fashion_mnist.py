"""Fashion-MNIST and a small CNN trained on it, for the calibration benchmarks.

The data comes from the Debian/Ubuntu package (`apt-get install dataset-fashion-mnist`, IDX
files under /usr/share/datasets/fashion-mnist/); nothing is downloaded. The CNN (three
conv-BN-ReLU stages, two linear layers) is trained here on CPU with a fixed seed and
exported with torch's legacy exporter, BatchNorm kept as its own op so that BN
re-estimation has something to work on. The ONNX file is cached next to the models.

    .venv/bin/python benchmarks/fashion_mnist.py   # trains (about a minute) and prints test accuracy
"""
from __future__ import annotations

import gzip
import os
import sys
from pathlib import Path

import numpy as np

DATA = Path("/usr/share/datasets/fashion-mnist")
EPOCHS = 2
MEAN, STD = 0.2860, 0.3530  # of the training images: inputs are normalized with these


def available() -> bool:
    return (DATA / "t10k-images-idx3-ubyte.gz").exists()


def load(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images [N,1,28,28] float32 normalized, labels [N] int64) for split 'train' or 't10k'."""
    if not available():
        raise SystemExit(f"Fashion-MNIST not found under {DATA}: apt-get install dataset-fashion-mnist")
    with gzip.open(DATA / f"{split}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(DATA / f"{split}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return ((images.astype(np.float32) / 255.0 - MEAN) / STD), labels


def cached_cnn_path() -> Path:
    """Where trained_cnn() keeps the trained CNN."""
    root = Path(os.environ.get("ONNXPRUNE_MODEL_CACHE", Path.home() / ".cache" / "onnxprune" / "models"))
    root.mkdir(parents=True, exist_ok=True)
    return root / f"fashion_cnn_e{EPOCHS}.onnx"


def _network():
    import torch.nn as nn

    def stage(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*stage(1, 32), nn.MaxPool2d(2), *stage(32, 64), nn.MaxPool2d(2), *stage(64, 128),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def trained_cnn() -> Path:
    """The trained CNN as ONNX (input 'images' [N,1,28,28], output 'logits' [N,10]), cached."""
    path = cached_cnn_path()
    if path.exists():
        return path
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(2)
    images, labels = load("train")
    net = _network()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    for _ in range(EPOCHS):
        order = torch.randperm(len(x))
        net.train()
        for start in range(0, len(x), 128):
            batch = order[start:start + 128]
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
    net.eval()
    tmp = path.with_suffix(".tmp.onnx")
    with torch.no_grad():
        # do_constant_folding=False keeps BatchNormalization as its own node.
        torch.onnx.export(net, (torch.zeros(1, 1, 28, 28),), str(tmp), input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, do_constant_folding=False, dynamo=False)
    os.replace(tmp, path)
    return path


def accuracy(model_path, images: np.ndarray, labels: np.ndarray, batch: int = 500) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path) if not hasattr(model_path, "SerializeToString")
                                   else model_path.SerializeToString())
    hits = 0
    for start in range(0, len(images), batch):
        logits = session.run(None, {"images": images[start:start + batch]})[0]
        hits += int((logits.argmax(axis=1) == labels[start:start + batch]).sum())
    return hits / len(images)


if __name__ == "__main__":
    model = trained_cnn()
    test_images, test_labels = load("t10k")
    print(f"{model}: test accuracy {accuracy(model, test_images, test_labels):.4f}", file=sys.stdout)
