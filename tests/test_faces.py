from __future__ import annotations

from pathlib import Path

import cv2

from heygem_daemon.media import faces
from heygem_daemon.media.faces import Box, detect_face


def test_highest_weight_face_beats_false_positive(portrait_jpg: Path) -> None:
    # The cascade also fires at (180, 79) on the suit, with a much lower level weight.
    assert detect_face(cv2.imread(str(portrait_jpg))) == Box(109, 40, 62, 62)


def test_no_face_gives_none(no_face_jpg: Path) -> None:
    assert detect_face(cv2.imread(str(no_face_jpg))) is None


def test_box_from_downscaled_detection_maps_back_to_input_pixels(portrait_jpg: Path) -> None:
    big = cv2.resize(cv2.imread(str(portrait_jpg)), (1280, 1280), interpolation=cv2.INTER_CUBIC)
    box = detect_face(big)
    assert box is not None
    assert all(abs(got - want) <= 12 for got, want in zip((box.x, box.y, box.w, box.h), (436, 160, 248, 248)))


def test_cascade_is_loaded_once_per_process(portrait_jpg: Path) -> None:
    image = cv2.imread(str(portrait_jpg))
    detect_face(image)
    detect_face(image)
    assert faces._cascade.cache_info().currsize == 1
    assert faces._cascade() is faces._cascade()


def test_search_near_the_last_box_finds_the_same_face(portrait_jpg: Path) -> None:
    image = cv2.imread(str(portrait_jpg))
    box = detect_face(image, near=Box(112, 44, 58, 58))
    assert box is not None
    assert abs(box.x - 109) <= 6 and abs(box.y - 40) <= 6 and 50 <= box.w <= 75


def test_search_near_a_box_ignores_faces_elsewhere(portrait_jpg: Path) -> None:
    assert detect_face(cv2.imread(str(portrait_jpg)), near=Box(230, 230, 60, 60)) is None
