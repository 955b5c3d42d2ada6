"""Datasets, mask formats, bad input, augmentation and normalisation for segmentation training."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from edgepix.runtime.core.errors import DataError
from edgepix.runtime.data.synthetic import CLASS_NAMES, PALETTE, make_scene, scene_seed, write_dataset
from edgepix.runtime.description.spec import ModelSpec, Task, default_palette

torch = pytest.importorskip("torch")

from edgepix.train.data import (  # noqa: E402
    SYNTHETIC_VAL_SEED,
    SegmentationDataset,
    SyntheticSource,
    collate,
    folder_source,
    image_size,
    open_source,
    read_mask,
    voc_source,
)
from edgepix.train.transforms import AugmentConfig, EvalTransform, TrainTransform, normalize, preprocess  # noqa: E402


@pytest.fixture
def synth_folder(tmp_path):
    return write_dataset(tmp_path / "data", 10, size=(64, 96), seed=3, val_fraction=0.3)


def _spec(names=CLASS_NAMES, size=(64, 64)):
    return ModelSpec(task=Task.SEGMENTATION, model_name="fastscnn", input_size=size, class_names=names)


# ---- the folder format ---------------------------------------------------------------------------------


def test_folder_source_reads_the_data_synth_layout(synth_folder):
    train, val = folder_source(synth_folder, "train"), folder_source(synth_folder, "val")
    assert (len(train), len(val)) == (7, 3)
    assert train.classes.names == CLASS_NAMES and train.classes.palette == PALETTE
    image, mask = train.load(0)
    ref_image, ref_mask = make_scene(scene_seed(3, 0), __import__("edgepix.runtime.data.synthetic", fromlist=["x"])
                                     .SceneConfig(size=(64, 96)))
    assert np.array_equal(image, ref_image) and np.array_equal(mask, ref_mask)
    train.scan()
    val.scan()


def test_split_without_split_files_is_a_stable_hash_split(synth_folder):
    (synth_folder / "train.txt").unlink()
    (synth_folder / "val.txt").unlink()
    train, val = folder_source(synth_folder, "train", val_fraction=0.3), folder_source(synth_folder, "val",
                                                                                       val_fraction=0.3)
    names_t = {p[0].stem for p in train.pairs}
    names_v = {p[0].stem for p in val.pairs}
    assert names_t | names_v == {f"{i:05d}" for i in range(10)} and not names_t & names_v
    assert names_v == {p[0].stem for p in folder_source(synth_folder, "val", val_fraction=0.3).pairs}


def test_rgb_colour_masks_are_mapped_through_the_palette(synth_folder):
    src = folder_source(synth_folder, "train")
    image_path, mask_path = src.pairs[0]
    index_mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
    colour = np.array(PALETTE, np.uint8)[index_mask][:, :, ::-1]  # RGB palette -> BGR file
    cv2.imwrite(str(mask_path), colour)
    assert np.array_equal(read_mask(mask_path, src.classes), index_mask)
    colour[5, 7] = (1, 2, 3)
    cv2.imwrite(str(mask_path), colour)
    with pytest.raises(DataError, match=r"colour RGB\(3, 2, 1\) at pixel \(x=7, y=5\)") as e:
        src.scan()
    assert str(mask_path) in str(e.value)


def test_palette_pngs_read_as_indices_with_255_ignore(tmp_path):
    """Pascal VOC masks are indexed PNGs; the indices come back, including 255 (ignore)."""
    PIL = pytest.importorskip("PIL.Image")
    mask = np.zeros((20, 30), np.uint8)
    mask[2:8, 3:9] = 15
    mask[10:12, :] = 255
    mask[15:, 20:] = 3
    img = PIL.fromarray(mask, mode="P")
    img.putpalette([c for rgb in default_palette(256) for c in rgb])
    img.save(tmp_path / "m.png")
    from edgepix.train.data import VOC_CLASSES, ClassInfo

    got = read_mask(tmp_path / "m.png", ClassInfo(VOC_CLASSES, default_palette(21)))
    assert np.array_equal(got, mask)


def test_voc_layout(tmp_path):
    PIL = pytest.importorskip("PIL.Image")
    root = tmp_path / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for stem in ("2007_000032", "2007_000039"):
        cv2.imwrite(str(root / "JPEGImages" / f"{stem}.jpg"), rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
        m = np.zeros((40, 50), np.uint8)
        m[5:20, 5:20] = 7
        m[19, 5:20] = 255
        p = PIL.fromarray(m, mode="P")
        p.putpalette([c for rgb in default_palette(256) for c in rgb])
        p.save(root / "SegmentationClass" / f"{stem}.png")
    (root / "ImageSets/Segmentation/train.txt").write_text("2007_000032\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("2007_000039\n")
    src = open_source(tmp_path, "train")  # finds VOCdevkit/VOC2012
    assert len(src) == 1 and src.classes.num_classes == 21 and src.classes.names[7] == "car"
    src.scan()
    image, mask = src.load(0)
    assert image.shape == (40, 50, 3) and set(np.unique(mask)) == {0, 7, 255}
    assert image_size(src.pairs[0][0]) == (40, 50)
    assert len(voc_source(root, "val")) == 1


# ---- bad input: one line naming the file and the value --------------------------------------------------


def _one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="data folder not found") as e:
        open_source(tmp_path / "absent", "train")
    assert str(tmp_path / "absent") in _one_line(e)
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "masks").mkdir()
    (tmp_path / "empty" / "classes.json").write_text(json.dumps({"names": ["a", "b"]}))
    with pytest.raises(DataError, match="no images.*empty"):
        open_source(tmp_path / "empty", "train")
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="images/ and masks/"):
        open_source(tmp_path / "flat", "train")


def test_image_without_mask_and_mask_without_image(synth_folder):
    (synth_folder / "masks" / "00004.png").unlink()
    with pytest.raises(DataError) as e:
        folder_source(synth_folder, "train")
    assert "00004.png: image has no mask" in _one_line(e)
    cv2.imwrite(str(synth_folder / "masks" / "00004.png"), np.zeros((64, 96), np.uint8))
    (synth_folder / "images" / "00002.png").unlink()
    with pytest.raises(DataError) as e:
        folder_source(synth_folder, "train")
    assert "masks/00002.png: mask has no image" in _one_line(e)


def test_mask_value_outside_the_classes(synth_folder):
    mask_path = synth_folder / "masks" / "00001.png"
    mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
    mask[0, :5] = 9
    cv2.imwrite(str(mask_path), mask)
    src = folder_source(synth_folder, "train")
    with pytest.raises(DataError) as e:
        src.scan()
    text = _one_line(e)
    assert str(mask_path) in text and "mask value 9 is not a class" in text and "0..5" in text and "5 pixels" in text


def test_ignore_value_is_allowed(synth_folder):
    mask_path = synth_folder / "masks" / "00001.png"
    mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
    mask[0, :5] = 255
    cv2.imwrite(str(mask_path), mask)
    folder_source(synth_folder, "train").scan()


def test_image_mask_size_mismatch(synth_folder):
    mask_path = synth_folder / "masks" / "00003.png"
    cv2.imwrite(str(mask_path), np.zeros((64, 95), np.uint8))
    with pytest.raises(DataError) as e:
        folder_source(synth_folder, "train").scan()
    assert str(mask_path) in _one_line(e) and "95x64" in str(e.value) and "96x64" in str(e.value)


def test_unreadable_image(synth_folder):
    bad = synth_folder / "images" / "00005.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError) as e:
        folder_source(synth_folder, "train").scan()
    assert str(bad) in _one_line(e) and "cannot read image" in str(e.value)
    jpeg = synth_folder / "images" / "00005.jpg"
    bad.unlink()
    jpeg.write_bytes(b"\xff\xd8\xff\xe0 garbage")
    with pytest.raises(DataError, match="cannot read image") as e:
        folder_source(synth_folder, "train").scan()
    assert str(jpeg) in str(e.value)


def test_bad_classes_json(synth_folder):
    (synth_folder / "classes.json").write_text(json.dumps({"names": ["a", "a"]}))
    with pytest.raises(DataError, match="unique"):
        folder_source(synth_folder, "train")
    (synth_folder / "classes.json").write_text(json.dumps({"names": ["a", "b"], "palette": [[0, 0, 0]]}))
    with pytest.raises(DataError, match="one \\[r, g, b\\]"):
        folder_source(synth_folder, "train")


def test_split_file_naming_a_missing_stem(synth_folder):
    (synth_folder / "val.txt").write_text("00009\nnope\n")
    with pytest.raises(DataError, match="val.txt: lists 'nope'"):
        folder_source(synth_folder, "val")


# ---- synthetic source ----------------------------------------------------------------------------------


def test_synthetic_train_and_val_are_disjoint_and_deterministic():
    train = open_source("synthetic", "train", seed=0, synthetic_n=4, synthetic_size=(64, 64))
    val = open_source("synthetic", "val", seed=0, synthetic_val_n=4, synthetic_size=(64, 64))
    assert isinstance(train, SyntheticSource) and val.seed == SYNTHETIC_VAL_SEED != train.seed
    train.pregenerate(workers=2)
    for i in range(4):
        assert not np.array_equal(train.load(i)[0], val.load(i)[0])
        assert np.array_equal(train.load(i)[0], make_scene(scene_seed(0, i),
                                                           __import__("edgepix.runtime.data.synthetic", fromlist=["x"])
                                                           .SceneConfig(size=(64, 64)))[0])
    with pytest.raises(DataError, match="reserved"):
        open_source("synthetic", "train", seed=SYNTHETIC_VAL_SEED)


# ---- augmentation --------------------------------------------------------------------------------------


def test_augmentation_never_invents_mask_values():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)
    mask = np.zeros((50, 70), np.uint8)
    mask[10:30, 10:40] = 3
    mask[25:45, 30:65] = 5
    t = TrainTransform((64, 64), AugmentConfig(scale=(0.5, 2.0), hue=5), ignore_index=255)
    seen_flip = seen_pad = False
    for i in range(60):
        img, m = t(image, mask, np.random.default_rng(i))
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8 and m.shape == (64, 64)
        assert set(np.unique(m)) <= {0, 3, 5, 255}
        seen_pad |= bool((m == 255).any())
    # The geometry follows the mask: without jitter, the flipped crop of the stretched image is consistent.
    t = TrainTransform((50, 70), AugmentConfig(scale=(1.0, 1.0), jitter_probability=0.0))
    for i in range(10):
        img, m = t(image, mask, np.random.default_rng(i))
        if np.array_equal(m, mask[:, ::-1]):
            seen_flip = True
            assert np.array_equal(img, image[:, ::-1])
        else:
            assert np.array_equal(m, mask) and np.array_equal(img, image)
    assert seen_flip and seen_pad


def test_colour_jitter_keeps_hue_by_default():
    """Synthetic classes are told apart by hue families: the default jitter leaves hue alone."""
    image = np.zeros((32, 32, 3), np.uint8)
    image[:] = (40, 60, 200)  # reddish BGR
    t = TrainTransform((32, 32), AugmentConfig(scale=(1.0, 1.0), hflip=False, jitter_probability=1.0))
    hue0 = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)[0, 0, 0]
    for i in range(10):
        out, _ = t(image, np.zeros((32, 32), np.uint8), np.random.default_rng(i))
        assert abs(int(cv2.cvtColor(out, cv2.COLOR_BGR2HSV)[0, 0, 0]) - int(hue0)) <= 2


def test_normalisation_follows_the_spec_and_the_runtime():
    spec = _spec(size=(32, 48))
    image = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    x = normalize(image, spec)
    rgb = image[:, :, ::-1].astype(np.float64) / 255.0
    expected = ((rgb - np.array(spec.mean)) / np.array(spec.std)).transpose(2, 0, 1)
    assert x.dtype == np.float32 and x.shape == (3, 32, 48)
    assert np.abs(x - expected).max() < 1e-5
    bgr_spec = spec.replace(channel_order="BGR", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert np.allclose(normalize(image, bgr_spec), image.transpose(2, 0, 1) / 255.0, atol=1e-6)
    # The whole preprocessing (resize + normalise) is the export gate's, value for value.
    big = np.random.default_rng(1).integers(0, 256, (100, 70, 3), dtype=np.uint8)
    from edgepix.export.verify import preprocess as gate_preprocess

    assert np.array_equal(preprocess(big, spec), gate_preprocess(big, spec)[0])


def test_dataset_is_reproducible_per_epoch_and_index(synth_folder):
    src = folder_source(synth_folder, "train")
    spec = _spec()
    ds = SegmentationDataset(src, TrainTransform((64, 64)), spec, seed=1)
    ds.set_epoch(2)
    a = ds[3]
    ds.set_epoch(0)
    b = ds[3]
    ds.set_epoch(2)
    c = ds[3]
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])
    assert not torch.equal(a[0], b[0])
    assert a[0].dtype == torch.float32 and a[0].shape == (3, 64, 64) and a[1].dtype == torch.uint8
    val = SegmentationDataset(src, EvalTransform((64, 64)), spec)
    images, masks = collate([val[0], val[1]])
    assert images.shape == (2, 3, 64, 64) and masks.shape == (2, 64, 96)  # masks stay at their own size


def test_without_an_ignore_index_padding_mirrors_image_and_mask():
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[:, :8] = 2
    t = TrainTransform((32, 32), AugmentConfig(scale=(0.5, 0.5), hflip=False, jitter_probability=0.0),
                       ignore_index=None)
    img, m = t(image, mask, np.random.default_rng(3))
    assert set(np.unique(m)) == {0, 2}  # no 255 where nothing may be ignored
    small = cv2.resize(mask, (16, 16), interpolation=cv2.INTER_NEAREST)
    assert (m == 2).sum() > (small == 2).sum()  # the mirrored border carries labels too
