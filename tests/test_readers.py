"""Data users hold: folders of PNG/JPEG images, parquet, Arrow and saved Hugging Face datasets, CSV; torch files refused.

Each reader gives the very numbers of the same values saved with ``numpy.save``: the same
points, the same digest, the same ``vaeeval elbo`` output. Every bad input is one line on
stderr, exit 2, and no file is changed.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from vaeeval import DataError, load_data, save_model
from vaeeval.cli import main

Image = pytest.importorskip("PIL.Image")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

N, H, W = 11, 3, 4  # 11 points of 3x4 grayscale, or 2x2 RGB: 12 values each
D = H * W


def _model(path: Path, input_shape: list[int]):
    torch.manual_seed(0)
    flat = input_shape != [D]
    encoder = nn.Sequential(*([nn.Flatten()] if flat else []), nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, 4))
    decoder = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, D), *([nn.Unflatten(1, tuple(input_shape))] if flat else []))
    save_model(path, encoder, decoder, likelihood={"family": "gaussian", "sigma": 0.3}, input_shape=input_shape, latent_dim=2)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"flat": _model(root / "flat.safetensors", [D]), "gray": _model(root / "gray.safetensors", [1, H, W]),
            "rgb": _model(root / "rgb.safetensors", [3, 2, 2])}


@pytest.fixture(scope="module")
def pixels():
    """8-bit values of N grayscale 3x4 images, every level 0 and 255 among them."""
    values = np.random.default_rng(0).integers(0, 256, size=(N, H, W), dtype=np.uint8)
    values[0, 0, :2] = (0, 255)
    return values


def run(*args, code=0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, (result.output, result.exception)
    return result


def refused(*args) -> str:
    result = run(*args, code=2)
    assert result.stdout == "" and result.stderr.count("\n") == 1, result.output
    return result.stderr.removeprefix("vaeeval: error: ").rstrip("\n")


def numbers(model, data, *extra) -> dict:
    """The elbo document's numbers and data digest, without the data's path."""
    document = json.loads(run("elbo", model, data, "-k", "8", "--json", *extra).stdout)
    return {"points": document["points"], "summary": document["summary"], "digest": document["data"]["digest"]}


def tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path).encode() + (path.read_bytes() if path.is_file() else b""))
    return digest.hexdigest()


def save_images(folder: Path, images: np.ndarray, mode: str = "L", suffix: str = ".png", names=None) -> Path:
    folder.mkdir()
    for index, image in enumerate(images):
        name = names[index] if names else f"{index:03}{suffix}"
        Image.fromarray(image, mode=mode).save(folder / name)
    return folder


# ----------------------------------------------------------------- images


def test_a_png_folder_is_k_over_255_as_to_tensor_and_gives_the_npy_numbers(tmp_path, models, pixels):
    folder = save_images(tmp_path / "images", pixels)
    expected = pixels.astype(np.float32)[:, None] / np.float32(255)
    assert np.array_equal(expected, torch.from_numpy(pixels).unsqueeze(1).float().div(255).numpy())  # ToTensor's division
    np.save(tmp_path / "images.npy", expected)
    read = load_data(folder, _load(models["gray"])).array
    assert read.shape == (N, 1, H, W) and np.array_equal(read[0:N], expected)
    assert np.array_equal(read[np.array([7, 2, 7])], expected[[7, 2, 7]])
    assert numbers(models["gray"], folder) == numbers(models["gray"], tmp_path / "images.npy")
    np.save(tmp_path / "flat.npy", expected.reshape(N, D))
    flat = numbers(models["flat"], folder)  # [1, 3, 4] images reach a model of 12 inputs
    assert flat["points"] == numbers(models["flat"], tmp_path / "flat.npy")["points"]


def _load(path):
    from vaeeval import load_model

    return load_model(path)


def test_rgb_and_jpeg_folders_sorted_by_name(tmp_path, models):
    rgb = np.random.default_rng(1).integers(0, 256, size=(N, 2, 2, 3), dtype=np.uint8)
    names = [f"{name}.png" for name in "kbjcahdgeif"]  # written out of order, read sorted
    folder = save_images(tmp_path / "rgb", rgb, "RGB", names=names)
    order = np.argsort(names)
    np.save(tmp_path / "rgb.npy", rgb[order].transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255))
    assert numbers(models["rgb"], folder) == numbers(models["rgb"], tmp_path / "rgb.npy")
    jpegs = save_images(tmp_path / "jpeg", rgb, "RGB", ".jpg")
    decoded = np.stack([np.asarray(Image.open(path)) for path in sorted(jpegs.iterdir())])  # JPEG is lossy: what Pillow decodes
    np.save(tmp_path / "jpeg.npy", decoded.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255))
    assert numbers(models["rgb"], jpegs) == numbers(models["rgb"], tmp_path / "jpeg.npy")


def test_limit_and_other_files_in_the_folder(tmp_path, models, pixels):
    folder = save_images(tmp_path / "images", pixels)
    (folder / "labels.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"not read")
    np.save(tmp_path / "images.npy", pixels.astype(np.float32)[:, None] / np.float32(255))
    assert numbers(models["gray"], folder, "--limit", "4") == numbers(models["gray"], tmp_path / "images.npy", "--limit", "4")


def _sixteen_bit(folder: Path):
    Image.fromarray(np.full((H, W), 1000, dtype=np.uint16)).save(folder / "010.png")


def _bad_png(folder: Path):
    (folder / "010.png").write_bytes((folder / "000.png").read_bytes()[:40])


@pytest.mark.parametrize(("name", "breaker", "message"), [
    ("16-bit", _sixteen_bit, "{f}/010.png: is a 16-bit image (mode I;16); vaeeval reads 8-bit grayscale (L) or RGB images, "
     "k/255: convert it with Pillow (image.convert('L') or image.convert('RGB')), or save the values with numpy.save"),
    ("rgba", lambda f: Image.new("RGBA", (W, H)).save(f / "010.png"), "{f}/010.png: is an RGBA image (with alpha) (mode RGBA); "
     "vaeeval reads 8-bit grayscale (L) or RGB images, k/255: convert it with Pillow (image.convert('L') or "
     "image.convert('RGB')), or save the values with numpy.save"),
    ("mixed sizes", lambda f: Image.new("L", (5, 5)).save(f / "010.png"),
     "{f}/010.png: is 5x5 pixels and 000.png is 4x3; every image needs the same size"),
    ("mixed channels", lambda f: Image.new("RGB", (W, H)).save(f / "010.png"),
     "{f}/010.png: is RGB and 000.png is L; every image needs the same channels"),
    ("not a png", lambda f: (f / "010.png").write_text("hello"), "{f}/010.png: not an image Pillow can read ("),
    ("truncated", _bad_png, "{f}/010.png: not an image Pillow can read ("),
])
def test_bad_images_are_one_line(tmp_path, models, pixels, name, breaker, message):
    folder = save_images(tmp_path / "images", pixels[:10])
    breaker(folder)
    before = tree_digest(folder)
    found = refused("elbo", models["gray"], folder)
    expected = message.format(f=folder)
    assert found == expected if not expected.endswith("(") else found.startswith(expected)
    assert tree_digest(folder) == before


def test_folders_without_images_and_huge_images(tmp_path, models, pixels):
    (tmp_path / "empty").mkdir()
    assert refused("elbo", models["gray"], tmp_path / "empty") == (
        f"{tmp_path / 'empty'}: holds no PNG or JPEG images (nor a dataset saved by Hugging Face datasets)")
    (tmp_path / "classes" / "cat").mkdir(parents=True)
    (tmp_path / "classes" / "dog").mkdir()
    assert refused("elbo", models["gray"], tmp_path / "classes") == (
        f"{tmp_path / 'classes'}: holds no PNG or JPEG images (nor a dataset saved by Hugging Face datasets); it has the "
        "folders cat, dog: give one of them")
    big = tmp_path / "big"
    big.mkdir()
    Image.new("L", (300, 200)).save(big / "a.png")
    assert refused("elbo", models["gray"], big, "--max-data-size", "100K") == (
        f"{big / 'a.png'}: declares 300x200 pixels: 240,000 bytes as float32, more than the 102,400 allowed (--max-data-size)")
    save_images(tmp_path / "one", pixels[:1])
    assert refused("elbo", models["gray"], tmp_path / "one" / "000.png") == (
        f"{tmp_path / 'one' / '000.png'}: a single image; give the folder holding the images (one point per image, sorted by name)")
    assert refused("elbo", models["gray"], tmp_path / "one", "--key", "x") == (
        f"{tmp_path / 'one'}: --key selects a column of a parquet or arrow file or a saved dataset; a folder of images has none")


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` 8-bit grayscale pixels and holds none of them."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize(("width", "height", "phrase"), [
    (100_000, 100_000, "not an image Pillow can read (Image size (10000000000 pixels) exceeds limit"),  # Pillow's own bound
    (9_000, 9_000, "declares 9000x9000 pixels: 324,000,000 bytes as float32, more than the 1,048,576 allowed (--max-data-size)"),
])
def test_a_huge_declared_image_is_refused_from_its_header(tmp_path, models, width, height, phrase):
    folder = tmp_path / "huge"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png_header(width, height))
    message = refused("elbo", models["gray"], folder, "--max-data-size", "1M")
    assert message.startswith(f"{folder / 'a.png'}: {phrase}"), message


def test_without_pillow_the_extra_is_named(tmp_path, models, pixels, monkeypatch):
    folder = save_images(tmp_path / "images", pixels)
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(DataError) as error:
        load_data(folder, _load(models["gray"]))
    assert str(error.value) == f"{folder}: reading a folder of images needs the images extra: pip install 'vaeeval[images]'"


# ----------------------------------------------------------------- parquet, arrow, saved datasets


def _values(pixels):
    return pixels.reshape(N, D).astype(np.float64) / 255


def test_parquet_column_by_key_across_row_groups(tmp_path, models, pixels):
    values = _values(pixels)
    np.save(tmp_path / "x.npy", values)
    table = pa.table({"pixels": pa.array(list(values), type=pa.list_(pa.float64())), "label": np.arange(N)})
    pq.write_table(table, tmp_path / "x.parquet", row_group_size=3)
    assert numbers(models["flat"], tmp_path / "x.parquet", "--key", "pixels") == numbers(models["flat"], tmp_path / "x.npy")
    read = load_data(tmp_path / "x.parquet", _load(models["flat"]), key="pixels").array
    rows = np.array([10, 0, 4, 4, 9])
    assert np.array_equal(read[rows], values[rows]) and np.array_equal(read[2:8], values[2:8])
    pq.write_table(pa.table({"pixels": pa.array(list(values), type=pa.list_(pa.float64(), D))}), tmp_path / "fixed.parquet")
    assert numbers(models["flat"], tmp_path / "fixed.parquet") == numbers(models["flat"], tmp_path / "x.npy")  # one column: no --key


def test_nested_lists_are_images_shaped(tmp_path, models, pixels):
    values = pixels.astype(np.float32)[:, None] / np.float32(255)
    np.save(tmp_path / "x.npy", values)
    nested = pa.array([[[list(row) for row in image[0]]] for image in values], type=pa.list_(pa.list_(pa.list_(pa.float32()))))
    pq.write_table(pa.table({"image": nested}), tmp_path / "x.parquet")
    assert numbers(models["gray"], tmp_path / "x.parquet") == numbers(models["gray"], tmp_path / "x.npy")


IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # how datasets stores its Image feature


def _png(image: np.ndarray, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _save_to_disk(folder: Path, table, chunk: int = 4) -> Path:
    """What datasets' Dataset.save_to_disk writes: Arrow streams named in state.json, and dataset_info.json."""
    folder.mkdir()
    with pa.ipc.new_stream(folder / "data-00000-of-00001.arrow", table.schema) as writer:
        writer.write_table(table, max_chunksize=chunk)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}],
                                                   "_fingerprint": "0", "_split": "test"}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
    return folder


def test_a_saved_hugging_face_dataset_and_an_arrow_file(tmp_path, models, pixels):
    values = _values(pixels)
    np.save(tmp_path / "x.npy", values)
    table = pa.table({"x": pa.array(list(values), type=pa.list_(pa.float64())), "label": np.arange(N)})
    folder = _save_to_disk(tmp_path / "saved", table)
    assert numbers(models["flat"], folder, "--key", "x") == numbers(models["flat"], tmp_path / "x.npy")
    with pa.ipc.new_file(tmp_path / "x.arrow", table.schema) as writer:
        writer.write_table(table, max_chunksize=5)
    assert numbers(models["flat"], tmp_path / "x.arrow", "--key", "x") == numbers(models["flat"], tmp_path / "x.npy")


def test_a_datasets_image_column_is_decoded_as_a_folder_of_images_would_be(tmp_path, models, pixels):
    np.save(tmp_path / "x.npy", pixels.astype(np.float32)[:, None] / np.float32(255))
    images = pa.array([{"bytes": _png(image), "path": f"{i}.png"} for i, image in enumerate(pixels)], type=IMAGE)
    folder = _save_to_disk(tmp_path / "mnist", pa.table({"image": images, "label": np.arange(N)}))
    assert numbers(models["gray"], folder, "--key", "image") == numbers(models["gray"], tmp_path / "x.npy")
    pq.write_table(pa.table({"image": images}), tmp_path / "x.parquet", row_group_size=4)
    read = load_data(tmp_path / "x.parquet", _load(models["gray"])).array
    assert np.array_equal(read[np.array([9, 1, 5])], np.load(tmp_path / "x.npy")[[9, 1, 5]])
    mixed = pa.array([{"bytes": _png(image), "path": None} for image in pixels[:5]]
                     + [{"bytes": _png(np.zeros((2, 2, 3), np.uint8), "RGB"), "path": None}], type=IMAGE)
    pq.write_table(pa.table({"image": mixed}), tmp_path / "mixed.parquet")
    assert refused("elbo", models["gray"], tmp_path / "mixed.parquet") == (
        f"{tmp_path / 'mixed.parquet'}: column 'image', row 5 is RGB and column 'image', row 0 is L; every image needs the same "
        "channels")


def _bad_tables(tmp_path, values):
    good = pa.array(list(values), type=pa.list_(pa.float64()))
    ragged = pa.array([list(row) for row in values[:5]] + [list(values[5][:7])] + [list(row) for row in values[6:]],
                      type=pa.list_(pa.float64()))
    missing = pa.array([list(row) for row in values[:3]] + [[*values[3][:4], None, *values[3][5:]]] + [list(r) for r in values[4:]],
                       type=pa.list_(pa.float64()))
    image = pa.array([{"bytes": None, "path": "a.png"}] * N, type=IMAGE)
    return {
        "two columns": (pa.table({"x": good, "label": np.arange(N)}), [],
                        "holds 2 columns (x, label); choose the one holding the points with --key"),
        "no such column": (pa.table({"x": good}), ["--key", "pixels"], "has no column 'pixels' (--key); it has x"),
        "strings": (pa.table({"text": ["a"] * N}), [], "column 'text' holds string values; vaeeval needs numbers, or lists of "
                    "numbers, per row"),
        "ragged": (pa.table({"x": ragged}), [], "column 'x': row 5 is not shaped [12] like the first row (a list of 7 where 12 "
                   "are needed); every point needs the same shape"),
        "missing": (pa.table({"x": missing}), [], "column 'x': row 3 has a missing value (null); every point needs all its values"),
        "image path only": (pa.table({"image": image}), [], "column 'image', row 0 holds no image bytes (a path only, or "
                            "nothing); vaeeval reads the images a dataset holds, not files it points to"),
    }


@pytest.mark.parametrize("case", ["two columns", "no such column", "strings", "ragged", "missing", "image path only"])
@pytest.mark.parametrize("form", ["parquet", "saved"])
def test_bad_tables_are_one_line(tmp_path, models, pixels, case, form):
    table, extra, message = _bad_tables(tmp_path, _values(pixels))[case]
    if form == "parquet":
        path = tmp_path / "x.parquet"
        pq.write_table(table, path, row_group_size=4)
    else:
        path = _save_to_disk(tmp_path / "saved", table)
    before = tree_digest(tmp_path)
    assert refused("elbo", models["flat"], path, *extra) == f"{path}: {message}"
    assert tree_digest(tmp_path) == before


def test_big_row_groups_dataset_dicts_and_strange_state_files(tmp_path, models, pixels):
    values = _values(pixels)
    pq.write_table(pa.table({"x": pa.array(list(values), type=pa.list_(pa.float64()))}), tmp_path / "x.parquet")
    assert refused("elbo", models["flat"], tmp_path / "x.parquet", "--max-data-size", "100").startswith(
        f"{tmp_path / 'x.parquet'}: row group 0 is ")
    assert refused("elbo", models["flat"], tmp_path / "x.parquet", "--max-data-size", "100").endswith(
        "bytes uncompressed, more than the 100 allowed (--max-data-size); write it with smaller row groups (row_group_size)")
    splits = tmp_path / "dict"
    splits.mkdir()
    _save_to_disk(splits / "test", pa.table({"x": pa.array(list(values))}))
    _save_to_disk(splits / "train", pa.table({"x": pa.array(list(values))}))
    (splits / "dataset_dict.json").write_text(json.dumps({"splits": ["test", "train"]}))
    assert refused("elbo", models["flat"], splits) == (
        f"{splits}: a DatasetDict saved by Hugging Face datasets; give one split's folder (test, train)")
    outside = _save_to_disk(tmp_path / "outside", pa.table({"x": pa.array(list(values))}))
    (outside / "state.json").write_text(json.dumps({"_data_files": [{"filename": "../x.parquet"}]}))
    assert refused("elbo", models["flat"], outside) == (
        f"{outside / 'state.json'}: names no data files (its _data_files); not a Dataset saved by save_to_disk")
    (outside / "state.json").write_text("[" * 100)
    assert refused("elbo", models["flat"], outside).startswith(f"{outside / 'state.json'}: not JSON a Hugging Face dataset writes (")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1" + b"\0" * 40)
    assert refused("elbo", models["flat"], tmp_path / "broken.parquet").startswith(
        f"{tmp_path / 'broken.parquet'}: truncated or corrupt parquet or arrow data (")


def test_an_arrow_file_is_memory_mapped_and_a_compressed_one_bounded(tmp_path, models, pixels):
    values = np.repeat(_values(pixels), 40, axis=0)  # 440 points, 42,240 bytes of float64
    table = pa.table({"x": pa.array(list(values), type=pa.list_(pa.float64()))})
    with pa.ipc.new_file(tmp_path / "plain.arrow", table.schema) as writer:
        writer.write_table(table, max_chunksize=50)
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.ipc.new_file(tmp_path / "packed.arrow", table.schema, options=options) as writer:
        writer.write_table(table, max_chunksize=50)
    read = load_data(tmp_path / "plain.arrow", _load(models["flat"]), max_data_size=20_000).array  # mapped: nothing inflated
    assert np.array_equal(read[0:440], values)
    assert refused("elbo", models["flat"], tmp_path / "packed.arrow", "--max-data-size", "20000") == (
        f"{tmp_path / 'packed.arrow'}: inflates to more than the 20,000 bytes allowed (--max-data-size): its buffers are "
        "compressed; write it uncompressed, and it is memory-mapped instead")
    assert np.array_equal(load_data(tmp_path / "packed.arrow", _load(models["flat"])).array[0:440], values)


def test_without_pyarrow_the_extra_is_named(tmp_path, models, pixels, monkeypatch):
    pq.write_table(pa.table({"x": pa.array(list(_values(pixels)))}), tmp_path / "x.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError) as error:
        load_data(tmp_path / "x.parquet", _load(models["flat"]))
    assert str(error.value) == (
        f"{tmp_path / 'x.parquet'}: reading parquet and arrow files needs the arrow extra: pip install 'vaeeval[arrow]'")


# ----------------------------------------------------------------- CSV


def test_csv_with_and_without_a_header_and_tsv(tmp_path, models, pixels):
    values = _values(pixels)
    np.save(tmp_path / "x.npy", values)
    np.savetxt(tmp_path / "header.csv", values, delimiter=",", header=",".join(f"p{i}" for i in range(D)), comments="")
    np.savetxt(tmp_path / "plain.csv", values, delimiter=",", fmt="%.17g")
    np.savetxt(tmp_path / "x.tsv", values, delimiter="\t", fmt="%.17g")
    expected = numbers(models["flat"], tmp_path / "x.npy")
    for name in ("header.csv", "plain.csv", "x.tsv"):
        assert numbers(models["flat"], tmp_path / name) == expected, name


@pytest.mark.parametrize(("text", "extra", "message"), [
    ("a,b\n1,2\n3,x\n", [], "line 3, value 2: 'x' is not a number"),
    ("1,2\n3,4,5\n", [], "line 2 has 3 values; the lines before it have 2"),
    ("a,b\n", [], "holds no lines of numbers"),
    ("1,2\n", ["--key", "a"], "--key selects a column of a parquet or arrow file; a CSV file is read whole"),
    ("1,2\n" * 200, ["--max-data-size", "1K"], "holds more than 1,024 bytes of numbers as float64, the most allowed (--max-data-size)"),
])
def test_bad_csv_is_one_line(tmp_path, models, text, extra, message):
    path = tmp_path / "x.csv"
    path.write_text(text)
    assert refused("elbo", models["flat"], path, *extra) == f"{path}: {message}"
    assert path.read_text() == text


def test_a_csv_block_boundary_keeps_line_numbers(tmp_path, models):
    lines = ["0.5," * (D - 1) + "0.5"] * 5000 + ["0.5," * (D - 2) + "0.5,oops"]
    (tmp_path / "long.csv").write_text("\n".join(lines) + "\n")
    assert refused("elbo", models["flat"], tmp_path / "long.csv") == f"{tmp_path / 'long.csv'}: line 5001, value 12: 'oops' is not a number"


# ----------------------------------------------------------------- torch files


def test_torch_files_as_data_name_the_way_out(tmp_path, models, pixels):
    for name, legacy in (("x.pt", False), ("x.pth", True)):
        path = tmp_path / name
        torch.save(torch.from_numpy(_values(pixels)), path, _use_new_zipfile_serialization=not legacy)
        assert refused("elbo", models["flat"], path) == (
            f"{path}: a torch.save file (tensors in a pickle), which vaeeval never unpickles; save the tensor as an array: "
            f"numpy.save('data.npy', torch.load('{path}', weights_only=True).numpy()); a model's checkpoint is MODEL, not DATA: "
            f"vaeeval convert --from lightning {path} --arch FILE.py:CLASS --state-dict -o weights.safetensors")


def test_what_datasets_itself_saves(tmp_path, models, pixels):
    """Where the datasets library is installed: its own save_to_disk, a list column and an Image column."""
    datasets = pytest.importorskip("datasets")
    np.save(tmp_path / "x.npy", pixels.astype(np.float32)[:, None] / np.float32(255))
    features = datasets.Features({"image": datasets.Image(), "pixels": datasets.Sequence(datasets.Value("float32"))})
    saved = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(image) for image in pixels], "pixels": list(pixels.reshape(N, D).astype(np.float32) / 255)},
        features=features)
    saved.save_to_disk(str(tmp_path / "saved"))
    expected = numbers(models["gray"], tmp_path / "x.npy")
    assert numbers(models["gray"], tmp_path / "saved", "--key", "image") == expected
    assert numbers(models["gray"], tmp_path / "saved", "--key", "pixels")["points"] == expected["points"]
    datasets.DatasetDict({"train": saved, "test": saved}).save_to_disk(str(tmp_path / "splits"))
    assert refused("elbo", models["gray"], tmp_path / "splits") == (
        f"{tmp_path / 'splits'}: a DatasetDict saved by Hugging Face datasets; give one split's folder (test, train)")
