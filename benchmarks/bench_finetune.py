"""Fine-tuning benchmark: prune the Fashion-MNIST CNN (exported with BatchNorm folded, as users'
models are) and fine-tune it one epoch through onnxruntime-training, against the same network
pruned at the same channels and fine-tuned in torch with its BatchNorm unfolded, for the same
epochs, batch, optimizer and schedule.

Needs both environments: this script runs in the main one (torch), and runs onnxprune's side
in the training environment (`--training-python`, default .venv-training/bin/python).

    .venv/bin/python benchmarks/bench_finetune.py [--ratios 0.5,0.7] [--epochs 1] [--no-write]
    .venv/bin/python benchmarks/bench_finetune.py --schedules [--ratios 0.7] [--epochs 2]
    .venv/bin/python benchmarks/bench_finetune.py --training-free [--ratios 0.5,0.7]

--training-free compares, on the same pruned network, training-free recovery (bias, lsq, and
the sequential refit against the original, from calibration images) with the fine-tuned rows
of the first table; results in benchmarks/results/finetune_training_free.json.

--schedules compares, on the ONNX side only, one-shot pruning with iterative (K rounds),
iterative with rewinding (lottery ticket) and gradual (cubic masks) at the same final channels
and the same total epochs; results in benchmarks/results/finetune_schedules.json.

Data: Fashion-MNIST from the Debian package (benchmarks/fashion_mnist.py); the first 55,000
training images train, the last 5,000 validate (the best epoch is kept, the untrained weights
included), the 10,000 test images give the accuracy in the table.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import fashion_mnist as fm  # noqa: E402
from machine_info import machine, write_section  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "finetune.json"
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "## Fine-tuning after pruning: onnxruntime-training against torch"
BATCH, LR, WEIGHT_DECAY, WARMUP = 128, 1e-3, 0.01, 0.05
CONVS = (0, 4, 8)  # indices of the Conv2d layers in fashion_mnist._network(); BatchNorm follows each


def torch_net_from_onnx(path: Path):
    """The trained torch network, weights read from the BN-kept ONNX export."""
    import torch

    net = fm._network()
    weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    state = net.state_dict()
    for name in state:
        if name in weights:
            state[name] = torch.from_numpy(weights[name].copy())
        elif not name.endswith("num_batches_tracked"):
            raise SystemExit(f"{path}: no initializer {name!r} to load")
    net.load_state_dict(state)
    return net.eval()


def export_folded(net, path: Path) -> None:
    import torch

    with torch.no_grad():
        torch.onnx.export(net.eval(), (torch.zeros(1, 1, 28, 28),), str(path), input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, do_constant_folding=True, dynamo=False)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "BatchNormalization" not in ops, ops


def kept_channels(plan: dict, pruned_path: Path, folded_path: Path) -> dict[int, np.ndarray]:
    """Layer index -> kept output channels, read off the plan (groups keyed by the tensor the
    layer makes) by matching each group's channel count and key to the folded export's nodes."""
    folded = onnx.load(str(folded_path))
    producers = {o: n for n in folded.graph.node for o in n.output}
    layers = {}
    for group in plan["groups"]:
        node = producers.get(group["key"])
        name = node.name if node is not None else group["key"]
        index = int(name.strip("/").split("/")[0]) if name.strip("/").split("/")[0].isdigit() else None
        if index is None:
            raise SystemExit(f"cannot tell which layer group {group['key']!r} belongs to")
        layers[index] = np.setdiff1d(np.arange(group["channels"]), group["removed"])
    return layers


def pruned_torch_net(net, kept: dict[int, np.ndarray]):
    """`net` with the same channels removed: conv outputs with their BatchNorm, the next layer's
    inputs; Linear(128, 128) keeps its hidden units per the plan too."""
    import torch
    import torch.nn as nn

    layers = list(net)
    widths = {}
    for index in CONVS:
        conv, bn = layers[index], layers[index + 1]
        keep = torch.from_numpy(kept.get(index, np.arange(conv.out_channels)))
        previous = widths.get("conv")
        new = nn.Conv2d(conv.in_channels if previous is None else len(previous), len(keep), 3, padding=1, bias=False)
        weight = conv.weight.data[keep]
        if previous is not None:
            weight = weight[:, previous]
        new.weight.data = weight.clone()
        new_bn = nn.BatchNorm2d(len(keep))
        for attr in ("weight", "bias", "running_mean", "running_var"):
            getattr(new_bn, attr).data = getattr(bn, attr).data[keep].clone()
        layers[index], layers[index + 1] = new, new_bn
        widths["conv"] = keep
    fc1, fc2 = layers[13], layers[15]
    hidden = torch.from_numpy(kept.get(13, np.arange(fc1.out_features)))
    new1 = nn.Linear(len(widths["conv"]), len(hidden))
    new1.weight.data = fc1.weight.data[hidden][:, widths["conv"]].clone()
    new1.bias.data = fc1.bias.data[hidden].clone()
    new2 = nn.Linear(len(hidden), fc2.out_features)
    new2.weight.data = fc2.weight.data[:, hidden].clone()
    new2.bias.data = fc2.bias.data.clone()
    layers[13], layers[15] = new1, new2
    return nn.Sequential(*layers)


def torch_folded_net(path: Path):
    """The pruned, BatchNorm-folded ONNX model as a torch network (Conv with bias, no BatchNorm):
    what onnxprune trains, trained by torch, to tell the tool's training from the network's."""
    import torch
    import torch.nn as nn

    model = onnx.load(str(path))
    values = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in model.graph.initializer}
    layers = []
    for node in model.graph.node:
        if node.op_type == "Conv":
            weight, bias = values[node.input[1]], values[node.input[2]]
            conv = nn.Conv2d(weight.shape[1], weight.shape[0], 3, padding=1)
            conv.weight.data, conv.bias.data = weight, bias
            layers.append(conv)
        elif node.op_type == "Gemm":
            weight, bias = values[node.input[1]], values[node.input[2]]
            linear = nn.Linear(weight.shape[1], weight.shape[0])
            linear.weight.data, linear.bias.data = weight, bias
            layers.append(linear)
        elif node.op_type == "Relu":
            layers.append(nn.ReLU())
        elif node.op_type == "MaxPool":
            layers.append(nn.MaxPool2d(2))
        elif node.op_type == "GlobalAveragePool":
            layers.append(nn.AdaptiveAvgPool2d(1))
        elif node.op_type == "Flatten":
            layers.append(nn.Flatten())
        else:
            raise SystemExit(f"unexpected {node.op_type} in {path}")
    return nn.Sequential(*layers)


def torch_accuracy(net, images, labels) -> float:
    import torch

    net.eval()
    with torch.no_grad():
        hits = sum(int((net(torch.from_numpy(images[s:s + 1000])).argmax(1).numpy() == labels[s:s + 1000]).sum())
                   for s in range(0, len(images), 1000))
    return hits / len(images)


def torch_finetune(net, train, val, epochs: int, seed: int = 0) -> dict:
    """AdamW, linear warm-up then cosine, batch 128, BatchNorm in training mode; best epoch by
    validation accuracy (the untrained weights included), as onnxprune does."""
    import copy

    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(2)
    x, y = torch.from_numpy(train[0]), torch.from_numpy(train[1])
    steps = epochs * math.ceil(len(x) / BATCH)
    warm = round(WARMUP * steps)
    optimizer = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, eps=1e-6)

    def rate(step):
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, steps - warm))))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    best = (torch_accuracy(net, *val), copy.deepcopy(net.state_dict()), 0)
    seconds, done = 0.0, 0
    for epoch in range(epochs):
        net.train()
        order = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(len(x)))
        for start in range(0, len(x), BATCH):
            batch = order[start:start + BATCH]
            began = time.perf_counter()
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            schedule.step()
            seconds += time.perf_counter() - began
            done += 1
        score = torch_accuracy(net, *val)
        if score > best[0]:
            best = (score, copy.deepcopy(net.state_dict()), epoch + 1)
    net.load_state_dict(best[1])
    return {"step_ms": 1000 * seconds / done, "best_epoch": best[2], "steps": done}


def onnx_side(python: str, folded: Path, ratio: float, train_npz: Path, val_npz: Path, epochs: int,
              work: Path, extra: tuple = ()) -> dict:
    """onnxprune prune + fine-tune in the training environment (the CLI, as a user runs it)."""
    tag = f"{ratio}_{'_'.join(extra).strip('-')}"
    out, report, plan = work / f"ft_{tag}.onnx", work / f"ft_{tag}.json", work / f"plan_{tag}.json"
    command = [python, "-m", "onnxprune", str(folded), "--filters", str(ratio), "--finetune", str(train_npz),
               "--val", str(val_npz), "--epochs", str(epochs), "--batch-size", str(BATCH), "--lr", str(LR),
               "--weight-decay", str(WEIGHT_DECAY), "--warmup", str(WARMUP), "-o", str(out), "--report", str(report),
               "--plan", str(plan), "-q", *extra]
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"onnxprune failed: {done.stderr.strip()}")
    wall = time.perf_counter() - began
    pruned = work / f"pruned_{ratio}.onnx"
    done = subprocess.run([python, "-m", "onnxprune", str(folded), "--filters", str(ratio), "-o", str(pruned), "-q"],
                          capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"onnxprune failed: {done.stderr.strip()}")
    return {"model": out, "pruned": pruned, "report": json.loads(report.read_text()),
            "plan": json.loads(plan.read_text()), "wall_s": wall}


def run(ratios, epochs: int, python: str, limit: int | None = None) -> dict:
    import torch

    base = fm.trained_cnn()
    images, labels = fm.load("train")
    test = fm.load("t10k")
    train, val = (images[:55000], labels[:55000]), (images[55000:], labels[55000:])
    if limit:  # a quick run to check the script, not a benchmark
        train, val = (train[0][:limit], train[1][:limit]), (val[0][:limit // 10], val[1][:limit // 10])
    net = torch_net_from_onnx(base)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folded = work / "fashion_folded.onnx"
        export_folded(net, folded)
        train_npz, val_npz = work / "train.npz", work / "val.npz"
        np.savez(train_npz, images=train[0], labels=train[1])
        np.savez(val_npz, images=val[0], labels=val[1])
        original = fm.accuracy(folded, *test)
        for ratio in ratios:
            print(f"ratio {ratio}: onnxprune + onnxruntime-training ...", file=sys.stderr)
            side = onnx_side(python, folded, ratio, train_npz, val_npz, epochs, work, ("--unfold-bn", "off"))
            finetune = side["report"]["finetune"]
            onnx_row = {"pruned": fm.accuracy(side["pruned"], *test), "finetuned": fm.accuracy(side["model"], *test),
                        "step_ms": finetune["step_ms"], "best_epoch": finetune["best_epoch"],
                        "steps": finetune["steps"], "wall_s": round(side["wall_s"], 1),
                        "macs": side["report"]["macs"], "params": side["report"]["params"]}
            print(f"ratio {ratio}: onnxprune + onnxruntime-training, --unfold-bn on ...", file=sys.stderr)
            unfolded = onnx_side(python, folded, ratio, train_npz, val_npz, epochs, work, ("--unfold-bn", "on"))
            unfolded_row = {"finetuned": fm.accuracy(unfolded["model"], *test),
                            "step_ms": unfolded["report"]["finetune"]["step_ms"],
                            "best_epoch": unfolded["report"]["finetune"]["best_epoch"]}
            print(f"ratio {ratio}: torch ...", file=sys.stderr)
            kept = kept_channels(side["plan"], side["pruned"], folded)
            pruned_net = pruned_torch_net(torch_net_from_onnx(base), kept)
            torch_pruned = torch_accuracy(pruned_net, *test)
            stats = torch_finetune(pruned_net, train, val, epochs)
            torch_row = {"pruned": torch_pruned, "finetuned": torch_accuracy(pruned_net, *test), **stats}
            folded_net = torch_folded_net(side["pruned"])
            folded_stats = torch_finetune(folded_net, train, val, epochs)
            torch_folded_row = {"pruned": torch_accuracy(torch_folded_net(side["pruned"]), *test),
                                "finetuned": torch_accuracy(folded_net, *test), **folded_stats}
            rows.append({"ratio": ratio, "onnx": onnx_row, "onnx_unfolded": unfolded_row, "torch": torch_row,
                         "torch_folded": torch_folded_row,
                         "widths": {str(k): len(v) for k, v in sorted(kept.items())}})
    return {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "original": original, "epochs": epochs, "rows": rows}


SCHEDULES = (("one-shot", ()), ("iterative K=2", ("--iterative", "2")), ("iterative K=4", ("--iterative", "4")),
             ("iterative K=2, rewind", ("--iterative", "2", "--rewind")), ("gradual, cubic", ("--schedule", "cubic")))
SCHEDULE_RESULTS = ROOT / "benchmarks" / "results" / "finetune_schedules.json"
SCHEDULE_SECTION = "## Fine-tuning schedules: one-shot, iterative, lottery-ticket rewind, gradual"


def run_schedules(ratios, epochs: int, python: str, limit: int | None = None) -> dict:
    images, labels = fm.load("train")
    test = fm.load("t10k")
    train, val = (images[:55000], labels[:55000]), (images[55000:], labels[55000:])
    if limit:
        train, val = (train[0][:limit], train[1][:limit]), (val[0][:limit // 10], val[1][:limit // 10])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folded = work / "fashion_folded.onnx"
        export_folded(torch_net_from_onnx(fm.trained_cnn()), folded)
        train_npz, val_npz = work / "train.npz", work / "val.npz"
        np.savez(train_npz, images=train[0], labels=train[1])
        np.savez(val_npz, images=val[0], labels=val[1])
        for ratio in ratios:
            for name, extra in SCHEDULES:
                print(f"ratio {ratio}: {name} ...", file=sys.stderr)
                side = onnx_side(python, folded, ratio, train_npz, val_npz, epochs, work,
                                 ("--unfold-bn", "off", *extra))
                rows.append({"ratio": ratio, "schedule": name, "accuracy": fm.accuracy(side["model"], *test),
                             "params": side["report"]["params"]["after"], "wall_s": round(side["wall_s"], 1)})
    return {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "epochs": epochs, "rows": rows}


def render_schedules(results: dict) -> str:
    lines = [SCHEDULE_SECTION + f" ({results['date']})", "",
             f"Machine: {results['machine']}. `benchmarks/bench_finetune.py --schedules`; results in "
             "`benchmarks/results/finetune_schedules.json`.", "",
             "The same BatchNorm-folded Fashion-MNIST CNN and data as above, pruned to the same channels (`--filters "
             f"R`, l2) with {results['epochs']} epochs of fine-tuning in all (batch {BATCH}, AdamW lr {LR:g}), "
             "`--unfold-bn off` in every row (gradual pruning does not combine with it yet). One-shot: remove, then "
             "train. Iterative: K rounds, each removing the next share of every group's channels (chosen again on "
             "the model the round before trained) and training for 1/K of the epochs. Rewind: the same rounds, "
             "each training the original cut to the channels chosen so far, from the original's weights "
             "(lottery ticket). Gradual: channels masked during training on the cubic schedule (all by 3/4 of the "
             "steps), then removed. Test accuracy on 10,000 images; wall time of the whole CLI run.", "",
             "| filters removed | schedule | params kept | test accuracy | wall s |", "|---|---|---|---|---|"]
    for row in results["rows"]:
        lines.append(f"| {row['ratio']:g} | {row['schedule']} | {row['params']} | {row['accuracy']:.4f} | "
                     f"{row['wall_s']} |")
    best = []
    for ratio in sorted({row["ratio"] for row in results["rows"]}):
        rows = sorted((r for r in results["rows"] if r["ratio"] == ratio), key=lambda r: -r["accuracy"])
        best.append(f"at {ratio:g}, {rows[0]['schedule']} ({rows[0]['accuracy']:.4f}, then {rows[1]['schedule']} "
                    f"{rows[1]['accuracy']:.4f})")
    lines += ["", "Best: " + "; ".join(best) + ". Under the staged schedules the final structure gets only "
              "part of the training budget (a likely reason, not measured apart); on this network and budget the "
              "measurement favours one-shot pruning."]
    return "\n".join(lines + [""])


TRAINING_FREE = ("none", "bias", "lsq", "refit", "lsq,refit")
CALIB_IMAGES = 2048
FREE_RESULTS = ROOT / "benchmarks" / "results" / "finetune_training_free.json"
FREE_SECTION = "## Training-free recovery against fine-tuning on a BatchNorm-folded CNN"


def run_training_free(ratios, limit: int | None = None) -> dict:
    """Prune with each training-free recovery from calibration images (the CLI in this
    environment: no onnxruntime-training needed)."""
    images, _ = fm.load("train")
    test = fm.load("t10k")
    calib = images[:limit or CALIB_IMAGES]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folded = work / "fashion_folded.onnx"
        export_folded(torch_net_from_onnx(fm.trained_cnn()), folded)
        calib_npz = work / "calib.npz"
        np.savez(calib_npz, images=calib)
        for ratio in ratios:
            for methods in TRAINING_FREE:
                print(f"ratio {ratio}: --recover {methods} ...", file=sys.stderr)
                out, report = work / "free.onnx", work / "free.json"
                command = [sys.executable, "-m", "onnxprune", str(folded), "--filters", str(ratio), "-o", str(out),
                           "--report", str(report), "-q", "--calib", str(calib_npz), "--recover", methods]
                began = time.perf_counter()
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode:
                    raise SystemExit(f"onnxprune failed: {done.stderr.strip()}")
                wall = time.perf_counter() - began
                recovery = json.loads(report.read_text()).get("recovery", {})
                rows.append({"ratio": ratio, "recover": methods, "accuracy": fm.accuracy(out, *test),
                             "wall_s": round(wall, 1), "refitted": recovery.get("layers_refitted", 0),
                             "notes": recovery.get("notes", [])})
    return {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "calib": len(calib), "rows": rows}


def render_training_free(results: dict, finetuned: dict | None) -> str:
    lines = [FREE_SECTION + f" ({results['date']})", "",
             f"Machine: {results['machine']}. `benchmarks/bench_finetune.py --training-free`; results in "
             "`benchmarks/results/finetune_training_free.json`.", "",
             "The BatchNorm-folded Fashion-MNIST CNN of the fine-tuning table, pruned to the same channels "
             f"(`--filters R`, l2), with `--calib` on the first {results['calib']} training images and each "
             "`--recover` method; no training. `lsq` refits the layers that lost inputs on the original model's "
             "activations; `refit` refits, in graph order, those layers and every layer after them (here the "
             "next convolutions and both Linear layers) against the original's outputs from the inputs the "
             "pruned network gives them. `bn` does nothing here: the export has no BatchNorm left. The "
             "fine-tuned columns are the first table's (one epoch on 55,000 images). Test accuracy on 10,000 "
             "images; wall time of the whole CLI run.", "",
             "| filters removed | recovery | layers refitted | test accuracy | wall s |", "|---|---|---|---|---|"]
    for row in results["rows"]:
        lines.append(f"| {row['ratio']:g} | {row['recover']} | {row['refitted']} | {row['accuracy']:.4f} | "
                     f"{row['wall_s']} |")
    if finetuned:
        for row in finetuned["rows"]:
            lines.append(f"| {row['ratio']:g} | fine-tuned, --unfold-bn off | - | {row['onnx']['finetuned']:.4f} | "
                         f"{row['onnx']['wall_s']} |")
            if "wall_s" in row["onnx_unfolded"]:
                wall = row["onnx_unfolded"]["wall_s"]
            else:
                wall = "-"
            lines.append(f"| {row['ratio']:g} | fine-tuned, --unfold-bn on | - | "
                         f"{row['onnx_unfolded']['finetuned']:.4f} | {wall} |")
    best = []
    tuned = {row["ratio"]: row for row in (finetuned or {}).get("rows", [])}
    for ratio in sorted({row["ratio"] for row in results["rows"]}):
        rows = {r["recover"]: r["accuracy"] for r in results["rows"] if r["ratio"] == ratio}
        text = f"at {ratio:g}, none {rows['none']:.4f}, lsq {rows['lsq']:.4f}, refit {rows['refit']:.4f}"
        if ratio in tuned:
            text += (f" against {tuned[ratio]['onnx']['finetuned']:.4f} fine-tuned as exported and "
                     f"{tuned[ratio]['onnx_unfolded']['finetuned']:.4f} fine-tuned with BatchNorm unfolded")
        best.append(text)
    original = f" (the original: {finetuned['original']:.4f})" if finetuned else ""
    lines += ["", "Measured" + original + ": " + "; ".join(best) + ". `bias` alone does not help a network pruned "
              "this far: the removed filters carried information, not just a mean. `lsq,refit` gives what `refit` "
              "gives, since the sequential refit replaces the lsq fit of every layer it refits. The refit uses "
              "only forward passes on the calibration images, and no labels."]
    return "\n".join(lines + [""])


def render(results: dict) -> str:
    lines = [SECTION + f" ({results['date']})", "",
             f"Machine: {results['machine']}. `benchmarks/bench_finetune.py`; results in "
             "`benchmarks/results/finetune.json`.", "",
             "The Fashion-MNIST CNN of `benchmarks/fashion_mnist.py` (test accuracy "
             f"{results['original']:.4f}), exported with BatchNorm folded into the convolutions, pruned by "
             "`--filters R` (l2), then fine-tuned for "
             f"{results['epochs']} epoch on 55,000 training images (batch {BATCH}, AdamW lr {LR:g}, weight decay "
             f"{WEIGHT_DECAY:g}, {WARMUP:g} warm-up then cosine; the best of before/after each epoch on 5,000 "
             "validation images kept). Torch: the same network with BatchNorm unfolded, the same channels removed "
             f"(read from onnxprune's plan), the same training (torch {results['torch']}, BatchNorm in training "
             "mode). Accuracy on the 10,000 test images.", "",
             "| filters removed | widths kept | MACs | pruned, no training | onnxprune, --unfold-bn off "
             "| torch, folded | onnxprune, --unfold-bn on | torch, BN unfolded "
             "| step ms: ORT-training off / on, torch BN |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        o, u, t, tf = row["onnx"], row["onnx_unfolded"], row["torch"], row["torch_folded"]
        widths = "/".join(str(v) for v in row["widths"].values())
        macs = o["macs"]["after"] / o["macs"]["before"]
        lines.append(f"| {row['ratio']:g} | {widths} | {macs:.2f} | {o['pruned']:.4f} | {o['finetuned']:.4f} "
                     f"(epoch {o['best_epoch']} kept) | {tf['finetuned']:.4f} | {u['finetuned']:.4f} "
                     f"(epoch {u['best_epoch']} kept) | "
                     f"{t['finetuned']:.4f} (epoch {t['best_epoch']} kept) | "
                     f"{o['step_ms']:.1f} / {u['step_ms']:.1f} / {t['step_ms']:.1f} |")
    lines += ["", "Both sides start from the same pruned network (torch's, BatchNorm kept, before training: "
              + ", ".join(f"{r['torch']['pruned']:.4f} at {r['ratio']:g}" for r in results["rows"]) + "). "
              "\"torch, folded\" trains the BatchNorm-folded network onnxprune trains without unfolding, in torch: "
              "the same accuracy says the ONNX path trains what torch trains. Unfolding BatchNorm for training "
              "(`--unfold-bn`, on by default for batches of 8 or more) is what brings the folded export to the "
              "accuracy of torch with its BatchNorm. The step times are each side's optimizer steps alone "
              "(forward, backward, update), 2 threads; on this shared machine they vary between runs (an earlier run "
              "of the same script timed the 0.5 row's --unfold-bn on at 100.9 ms a step), and onnxruntime-training "
              "was 1.4-2.4x slower a step than torch in this run.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratios", default="0.5,0.7")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--training-python", default=str(ROOT / ".venv-training" / "bin" / "python"))
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--limit", type=int,
                        help="train on this many images only (checks the script; implies --no-write)")
    parser.add_argument("--render", action="store_true", help="rewrite the doc section from the saved results")
    parser.add_argument("--schedules", action="store_true", help="compare one-shot, iterative, rewind and gradual")
    parser.add_argument("--training-free", action="store_true",
                        help="training-free recovery (bias, lsq, refit) against the fine-tuned rows")
    args = parser.parse_args()
    if args.training_free:
        if args.render:
            results = json.loads(FREE_RESULTS.read_text())
        else:
            results = run_training_free([float(r) for r in args.ratios.split(",")], args.limit)
            args.no_write = args.no_write or bool(args.limit)
            if not args.no_write:
                FREE_RESULTS.write_text(json.dumps(results, indent=1))
        finetuned = json.loads(RESULTS.read_text()) if RESULTS.exists() else None
        text = render_training_free(results, finetuned)
        print(text)
        if not args.no_write:
            write_section(DOC, FREE_SECTION, text)
        return
    if args.schedules:
        if args.render:
            results = json.loads(SCHEDULE_RESULTS.read_text())
        else:
            ratios = [float(r) for r in args.ratios.split(",")]
            results = run_schedules(ratios, args.epochs, args.training_python, args.limit)
            args.no_write = args.no_write or bool(args.limit)
            if not args.no_write:
                SCHEDULE_RESULTS.write_text(json.dumps(results, indent=1))
        print(render_schedules(results))
        if not args.no_write:
            write_section(DOC, SCHEDULE_SECTION, render_schedules(results))
        return
    if args.render:
        results = json.loads(RESULTS.read_text())
    else:
        results = run([float(r) for r in args.ratios.split(",")], args.epochs, args.training_python, args.limit)
        args.no_write = args.no_write or bool(args.limit)
        if not args.no_write:
            RESULTS.write_text(json.dumps(results, indent=1))
    print(render(results))
    if not args.no_write:
        write_section(DOC, SECTION, render(results))


if __name__ == "__main__":
    main()
