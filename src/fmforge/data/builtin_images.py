"""Real images that installed packages ship, written out as inputs for ``prepare_images`` (no downloads).

- scikit-learn's handwritten digits: 1,797 8×8 grayscale images, 10 classes → a class-folder tree, or
  image-caption pairs whose captions name the digit in words (contrastive training, zero-shot tests);
- scikit-image's bundled photos, each captioned with the first line of its loader's docstring → a captions
  JSONL next to the photos (the package's own PNG/JPEG files, bytes unchanged);
- scikit-image's LFW subset: 100 faces and 100 non-faces, 25×25 grayscale → class folders face/non_face.

Some scikit-image images are fetched from the network on first use (brain, cells3d, eagle, kidney, lily,
skin, ...); only those inside the wheel are used here.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
from PIL import Image

# Photos inside the scikit-image wheel (checked with scikit-image 0.26): loader name → its file there.
# Synthetic or duplicate images (binary_blobs, checkerboard, horse, shepp_logan_phantom, cat = chelsea,
# stereo_motorcycle) are left out.
SKIMAGE_PHOTOS = {
    "astronaut": "astronaut.png", "brick": "brick.png", "camera": "camera.png", "cell": "cell.png",
    "chelsea": "chelsea.png", "clock": "clock_motion.png", "coffee": "coffee.png", "coins": "coins.png",
    "colorwheel": "color.png", "grass": "grass.png", "gravel": "gravel.png",
    "hubble_deep_field": "hubble_deep_field.jpg", "immunohistochemistry": "ihc.png", "logo": "logo.png",
    "microaneurysms": "microaneurysms.png", "moon": "moon.png", "page": "page.png", "retina": "retina.jpg",
    "rocket": "rocket.jpg", "text": "text.png",
}


def _save_gray(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, "PNG")


def digits_pixels(images: np.ndarray) -> np.ndarray:
    """scikit-learn's digit intensities (0..16) as the 8-bit gray levels written to the PNGs."""
    return np.round(images * (255 / 16)).astype(np.uint8)


def write_digits(directory: str | Path) -> Path:
    """Write scikit-learn's digits as ``DIR/digits/<label>/<index>.png`` (8×8, gray; index = position in
    ``load_digits()``); returns the class-folder root."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = Path(directory) / "digits"
    for i, (pixels, label) in enumerate(zip(digits_pixels(digits.images), digits.target)):
        _save_gray(pixels, root / str(int(label)) / f"{i:04d}.png")
    return root


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Training captions name the digit in words, in five phrasings; zero-shot prompts should use others.
DIGIT_CAPTIONS = ("a handwritten {}", "the digit {} written by hand", "a scanned handwritten number {}",
                  "{} in handwriting", "a small gray image of the number {}")


def write_digit_captions(directory: str | Path) -> Path:
    """Write scikit-learn's digits as image-caption pairs for contrastive training: ``DIR/digit_captions/
    <index>.png`` (the same bytes ``write_digits`` writes, so both land in the same split) and
    ``captions.jsonl``, each caption naming the digit in words in one of ``DIGIT_CAPTIONS``' phrasings
    (cycled by index). Returns the JSONL's path."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = Path(directory) / "digit_captions"
    lines = []
    for i, (pixels, label) in enumerate(zip(digits_pixels(digits.images), digits.target)):
        _save_gray(pixels, root / f"{i:04d}.png")
        caption = DIGIT_CAPTIONS[i % len(DIGIT_CAPTIONS)].format(DIGIT_NAMES[int(label)])
        lines.append(json.dumps({"image": f"{i:04d}.png", "caption": caption}))
    path = root / "captions.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_lfw_faces(directory: str | Path) -> Path:
    """Write scikit-image's LFW subset as ``DIR/lfw_faces/{face,non_face}/<index>.png`` (25×25, gray);
    returns the class-folder root."""
    from skimage.data import lfw_subset

    images = lfw_subset()  # float in [0, 1]: the first 100 are faces, the next 100 are not
    root = Path(directory) / "lfw_faces"
    for i, image in enumerate(images):
        _save_gray(np.round(image * 255).astype(np.uint8), root / ("face" if i < 100 else "non_face") / f"{i:03d}.png")
    return root


def skimage_photos() -> list[tuple[str, Path, str]]:
    """(name, file inside the scikit-image wheel, caption) for every bundled photo."""
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    photos = []
    for name, file in SKIMAGE_PHOTOS.items():
        if (folder / file).is_file():
            caption = (inspect.getdoc(getattr(skimage.data, name)) or name).strip().splitlines()[0].strip()
            photos.append((name, folder / file, caption))
    return photos


def write_skimage_captions(directory: str | Path) -> Path:
    """Copy scikit-image's bundled photos to ``DIR/skimage_photos/`` and write ``captions.jsonl`` there
    (``{"image": "astronaut.png", "caption": "Color image of the astronaut Eileen Collins."}`` per line);
    returns the JSONL's path."""
    root = Path(directory) / "skimage_photos"
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, file, caption in skimage_photos():
        target = root / f"{name}{file.suffix}"
        target.write_bytes(file.read_bytes())
        lines.append(json.dumps({"image": target.name, "caption": caption}, ensure_ascii=False))
    path = root / "captions.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
