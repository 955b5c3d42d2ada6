import json

import cv2
import numpy as np
import pytest

from edgepix.runtime.core.errors import DataError
from edgepix.runtime.data.synthetic import (
    CLASS_NAMES,
    MovingScene,
    SceneConfig,
    make_scene,
    random_objects,
    render_scene,
    scene_seed,
    write_dataset,
)

K = len(CLASS_NAMES)


def test_scene_is_deterministic_per_seed():
    a_img, a_mask = make_scene(7)
    b_img, b_mask = make_scene(7)
    c_img, _ = make_scene(8)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_mask, b_mask)
    assert not np.array_equal(a_img, c_img)


def test_scene_shapes_types_and_mask_range():
    img, mask = make_scene(3, SceneConfig(size=(96, 160)))
    assert img.shape == (96, 160, 3) and img.dtype == np.uint8
    assert mask.shape == (96, 160) and mask.dtype == np.uint8
    assert mask.max() < K


def test_every_class_appears_across_a_small_dataset():
    counts = np.zeros(K, dtype=np.int64)
    for seed in range(20):
        _, mask = make_scene(seed, SceneConfig(size=(64, 64)))
        counts += np.bincount(mask.ravel(), minlength=K)[:K]
    assert (counts > 0).all(), counts
    # Objects cover a real share of the scene, not a few stray pixels.
    assert 0.05 < counts[1:].sum() / counts.sum() < 0.7


def test_mask_matches_what_was_drawn():
    """In a clean scene every pixel shows the colour of the topmost object the mask names, or the background."""
    config = SceneConfig(size=(128, 128), clean=True, min_objects=6, max_objects=6)
    rng = np.random.default_rng(5)
    objects = random_objects(rng, config)
    background = np.full((128, 128, 3), 96, np.uint8)
    image, mask = render_scene(objects, background, config)
    assert (mask > 0).any()
    assert (image[mask == 0] == 96).all()
    # Rasterise each object alone; the last one covering a pixel owns it.
    owner = np.full((128, 128), -1)
    for i, obj in enumerate(objects):
        layer = np.zeros((128, 128), np.uint8)
        cv2.fillPoly(layer, [obj.polygon()], 1, lineType=cv2.LINE_8, shift=4)
        owner[layer == 1] = i
    covered = owner >= 0
    assert np.array_equal(covered, mask > 0)
    classes = np.array([o.cls for o in objects])
    colours = np.array([o.colour for o in objects])
    assert np.array_equal(mask[covered], classes[owner[covered]])
    assert np.array_equal(image[covered], colours[owner[covered]])


def test_moving_scene_moves_objects_smoothly():
    scene = MovingScene(seed=2, config=SceneConfig(size=(128, 128)), max_speed=3.0)
    frames = [scene.next()[1] for _ in range(6)]
    changed = [(a != b).mean() for a, b in zip(frames, frames[1:])]
    assert all(0 < c < 0.2 for c in changed), changed  # something moves, nothing jumps
    # Same seed, same video.
    again = MovingScene(seed=2, config=SceneConfig(size=(128, 128)), max_speed=3.0)
    assert all(np.array_equal(a, again.next()[1]) for a in frames)


def test_write_dataset_folder_format(tmp_path):
    out = write_dataset(tmp_path / "d", 10, size=(64, 80), seed=1, val_fraction=0.2)
    images = sorted(p.stem for p in (out / "images").glob("*.png"))
    masks = sorted(p.stem for p in (out / "masks").glob("*.png"))
    assert images == masks and len(images) == 10
    train = (out / "train.txt").read_text().split()
    val = (out / "val.txt").read_text().split()
    assert len(train) == 8 and len(val) == 2 and sorted(train + val) == images
    classes = json.loads((out / "classes.json").read_text())
    assert classes["names"] == list(CLASS_NAMES) and len(classes["palette"]) == K
    mask = cv2.imread(str(out / "masks" / "00000.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (64, 80) and mask.dtype == np.uint8 and mask.max() < K


def test_bad_scene_config_is_rejected():
    with pytest.raises(DataError, match="at least 16x16"):
        SceneConfig(size=(8, 8))
    with pytest.raises(DataError, match="min_objects"):
        SceneConfig(min_objects=5, max_objects=2)


# ---- lit scenes: rendered from the layout, for mask -> image models ---------------------------------------------


def test_unknown_appearance_is_refused():
    with pytest.raises(DataError, match="appearance"):
        SceneConfig(appearance="photoreal")


def test_lit_scenes_are_deterministic_and_keep_exact_masks():
    config = SceneConfig(size=(96, 128), appearance="lit")
    a, b = make_scene(4, config), make_scene(4, config)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert a[0].shape == (96, 128, 3) and a[1].max() < K and (a[1] > 0).any()


def test_lit_background_runs_from_bright_sky_to_dark_ground():
    """The background's brightness is a function of the row (what a generator can learn from the mask's geometry),
    not of the scene: every scene's sky is brighter than its ground."""
    for seed in range(8):
        image, mask = make_scene(seed, SceneConfig(size=(128, 128), appearance="lit"))
        grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).astype(np.float32)
        top = grey[:24][mask[:24] == 0]
        bottom = grey[-24:][mask[-24:] == 0]
        if top.size > 50 and bottom.size > 50:
            assert top.mean() - bottom.mean() > 50, (seed, top.mean(), bottom.mean())


def test_lit_objects_are_shaded_from_the_upper_left_and_cast_shadows_down_right():
    config = SceneConfig(size=(160, 160), appearance="lit", min_objects=1, max_objects=1, min_radius=0.15,
                         max_radius=0.2)
    for seed in range(6):
        rng = np.random.default_rng(seed)
        objects = random_objects(rng, config)
        obj = objects[0]
        background = np.full((160, 160, 3), 150, np.uint8)
        image, mask = render_scene(objects, background, config)  # no rng: no noise
        grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).astype(np.float32)
        yy, xx = np.mgrid[0:160, 0:160]
        inside = mask > 0
        toward_light = (xx - obj.cx) + (yy - obj.cy) < 0
        assert grey[inside & toward_light].mean() > grey[inside & ~toward_light].mean() + 10, seed
        # The shadow: background pixels darkened, all of them down and to the right of the object's centre.
        shadow = (mask == 0) & (grey < 100)
        assert shadow.sum() > 20, seed
        assert (xx[shadow] + yy[shadow]).mean() > obj.cx + obj.cy, seed


def test_lit_object_colours_stay_in_their_class_family():
    """So that segmenters trained on varied scenes read lit ones (the pix2pix consistency score relies on it)."""
    hues = {1: 0, 2: 60, 3: 115, 4: 25, 5: 150}
    for seed in range(6):
        image, mask = make_scene(seed, SceneConfig(size=(128, 128), appearance="lit"))
        hue = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)[..., 0].astype(np.int32)
        for cls, centre in hues.items():
            sel = mask == cls
            if sel.sum() < 30:
                continue
            distance = np.abs(((hue[sel] - centre + 90) % 180) - 90)
            assert np.median(distance) <= 6, (seed, cls, np.median(distance))


def test_write_dataset_with_lit_scenes(tmp_path):
    out = write_dataset(tmp_path / "lit", 3, size=(48, 64), appearance="lit")
    image = cv2.imread(str(out / "images" / "00000.png"))
    expected, _ = make_scene(scene_seed(0, 0), SceneConfig(size=(48, 64), appearance="lit"))
    assert np.array_equal(image, expected)
