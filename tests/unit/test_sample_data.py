"""The synthetic sample is laid out like the real Oxford-IIIT Pet archives, file by file."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from lxml import etree
from PIL import Image, ImageFile

from petdet_tasks import sample_data
from petdet_tasks.breeds import breed_id, breed_of, class_id, species
from petdet_tasks.sample_data import (
    DEFAULT_BREEDS,
    DEFAULT_PER_BREED,
    DEFECT_KINDS,
    LIST_HEADER,
    make_sample,
)

HEADER = [
    "#Image CLASS-ID SPECIES BREED ID",
    "#ID: 1:37 Class ids",
    "#SPECIES: 1:Cat 2:Dog",
    "#BREED ID: 1-12:Cat 1:25:Dog",
    "#All images with 1st letter as captial are cat images",
    "#images with small first letter are dog images",
]
SAFE_PARSER = etree.XMLParser(resolve_entities=False, no_network=True)


class Sample:
    """One generated sample, opened: archive contents keyed by member name."""

    def __init__(self, out: Path, summary: dict):
        self.out, self.summary = out, summary
        self.images = _read_tar(out / "images.tar.gz")
        self.annotations = _read_tar(out / "annotations.tar.gz")

    def lines(self, name: str) -> list[str]:
        return self.annotations[f"annotations/{name}"].decode().splitlines()

    def names(self, split: str) -> list[str]:
        return [line.split()[0] for line in self.lines(split) if not line.startswith("#")]

    def image(self, name: str) -> Image.Image:
        return Image.open(io.BytesIO(self.images[f"images/{name}.jpg"]))

    def trimap(self, name: str) -> np.ndarray:
        data = self.annotations[f"annotations/trimaps/{name}.png"]
        return np.asarray(Image.open(io.BytesIO(data)))

    def xml(self, name: str):
        return etree.fromstring(self.annotations[f"annotations/xmls/{name}.xml"], SAFE_PARSER)

    def clean_trainval(self) -> list[str]:
        return [n for n in self.names("trainval.txt") if n not in self.summary["defects"]]


def _read_tar(path: Path) -> dict[str, bytes | None]:
    with tarfile.open(path, "r:") as tar:  # plain tar, like the real ".tar.gz" files
        return {
            m.name: (tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()
        }


def _box(root) -> tuple[int, int, int, int]:
    return tuple(int(root.findtext(f"object/bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))


def _defect(sample: Sample, kind: str) -> str:
    (name,) = [n for n, k in sample.summary["defects"].items() if k == kind]
    return name


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Sample:
    out = tmp_path_factory.mktemp("sample")
    return Sample(out, make_sample(out))


# --------------------------------------------------------------------------- layout


def test_archives_are_plain_tar_despite_the_name(sample):
    for archive in ("images.tar.gz", "annotations.tar.gz"):
        head = (sample.out / archive).read_bytes()[:512]
        assert not head.startswith(b"\x1f\x8b"), "real archives are not gzip-compressed"
        assert tarfile.is_tarfile(sample.out / archive)


def test_member_names_match_the_real_layout(sample):
    names = sample.names("list.txt")
    trainval = sample.names("trainval.txt")
    missing = _defect(sample, "missing_xml")
    junk = {n for n in sample.annotations if n.startswith("annotations/trimaps/._")}
    assert len(junk) == 2
    assert {j.replace("/._", "/") for j in junk} <= {f"annotations/trimaps/{n}.png" for n in names}

    assert set(sample.images) == {"images"} | {f"images/{n}.jpg" for n in names}
    assert set(sample.annotations) == (
        {"annotations", "annotations/xmls", "annotations/trimaps"}
        | {f"annotations/{f}" for f in ("list.txt", "trainval.txt", "test.txt", "README")}
        | {f"annotations/xmls/{n}.xml" for n in trainval if n != missing}
        | {f"annotations/trimaps/{n}.png" for n in names}
        | junk
    )
    assert sample.annotations["annotations"] is None  # directory entries
    assert sample.annotations["annotations/README"].strip()


def test_members_are_sorted_with_fixed_metadata(sample):
    with tarfile.open(sample.out / "annotations.tar.gz", "r:") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted(m.name for m in members)
    for m in members:
        assert (m.uid, m.gid, m.uname, m.gname) == (0, 0, "", "")
        assert m.mtime == sample_data.MTIME
        assert m.mode == (0o755 if m.isdir() else 0o644)


def test_list_txt_header_and_real_ids(sample):
    lines = sample.lines("list.txt")
    assert lines[:6] == HEADER == list(LIST_HEADER)
    body = lines[6:]
    assert len(body) == DEFAULT_BREEDS * DEFAULT_PER_BREED == sample.summary["images"]
    names = [line.split()[0] for line in body]
    assert names == sorted(names, key=str.lower)
    for line in body:
        name, cid, sp, bid = line.split(" ")
        breed = breed_of(name)
        assert (int(cid), int(sp), int(bid)) == (class_id(breed), species(breed), breed_id(breed))


def test_breeds_alternate_cats_and_dogs_with_real_class_ids(sample):
    breeds = sample.summary["breeds"]
    assert [species(b) for b in breeds] == [1, 2] * 3
    assert [class_id(b) for b in breeds] == [1, 2, 6, 3, 7, 4]
    assert {breed_of(n) for n in sample.names("list.txt")} == set(breeds)
    assert sample_data.select_breeds(2) == ["Abyssinian", "american_bulldog"]
    assert sorted(sample_data.select_breeds(37)) == sorted(sample_data.BREEDS)


def test_trainval_and_test_split_the_list(sample):
    lines, trainval, test = (sample.lines(f) for f in ("list.txt", "trainval.txt", "test.txt"))
    assert not set(trainval) & set(test)
    assert sorted(trainval + test) == sorted(lines[6:])
    assert (len(trainval), len(test)) == (sample.summary["trainval"], sample.summary["test"])
    for breed in sample.summary["breeds"]:
        per_breed = [n for n in sample.names("trainval.txt") if breed_of(n) == breed]
        assert len(per_breed) == DEFAULT_PER_BREED // 2


def test_xmls_describe_their_images(sample):
    xml_names = [n for n in sample.annotations if n.startswith("annotations/xmls/")]
    assert xml_names
    for member in xml_names:
        name = member.rsplit("/", 1)[1][:-4]
        root = sample.xml(name)
        assert root.tag == "annotation"
        assert root.findtext("filename") == f"{name}.jpg"
        assert root.findtext("object/name") == ("cat" if species(breed_of(name)) == 1 else "dog")
        assert root.findtext("object/pose") in {"Frontal", "Left", "Right", "Unspecified"}
        width, height = int(root.findtext("size/width")), int(root.findtext("size/height"))
        assert 300 <= width <= 500 and 250 <= height <= 500
        if name not in sample.summary["defects"]:
            assert sample.image(name).size == (width, height)
        xmin, ymin, xmax, ymax = _box(root)
        assert 1 <= xmin < xmax <= width and 1 <= ymin < ymax <= height


def test_clean_images_are_rgb_jpegs_with_matching_trimaps(sample):
    for name in sample.names("list.txt"):
        tri = sample.trimap(name)
        assert tri.dtype == np.uint8 and tri.ndim == 2
        assert set(np.unique(tri)) == {1, 2, 3}
        if name not in sample.summary["defects"]:
            img = sample.image(name)
            assert (img.format, img.mode) == ("JPEG", "RGB")
            assert tri.shape == (img.height, img.width)


def test_box_is_where_the_pet_head_is(sample):
    for name in sample.clean_trainval()[:8]:
        pixels = np.asarray(sample.image(name).convert("RGB"), dtype=float)
        tri = sample.trimap(name)
        xmin, ymin, xmax, ymax = _box(sample.xml(name))
        assert tri[(ymin + ymax) // 2 - 1, (xmin + xmax) // 2 - 1] == 1
        inside = tri[ymin - 1 : ymax, xmin - 1 : xmax]
        assert (inside == 1).mean() > 0.5
        corners = np.zeros(tri.shape, bool)
        corners[:40, :40] = corners[:40, -40:] = corners[-40:, :40] = corners[-40:, -40:] = True
        background = pixels[corners & (tri == 2)].mean(axis=0)
        head = pixels[ymin - 1 : ymax, xmin - 1 : xmax].reshape(-1, 3).mean(axis=0)
        assert np.linalg.norm(head - background) > 30, name


# --------------------------------------------------------------------------- defects


def test_every_defect_is_on_its_own_trainval_image(sample):
    defects = sample.summary["defects"]
    assert sorted(defects.values()) == sorted(DEFECT_KINDS)
    assert set(defects) <= set(sample.names("trainval.txt"))
    for name in defects:
        assert f"annotations/trimaps/{name}.png" in sample.annotations
        assert (f"annotations/xmls/{name}.xml" in sample.annotations) == (
            defects[name] != "missing_xml"
        )


@pytest.mark.parametrize(
    ("kind", "fmt", "mode"),
    [
        ("png_as_jpg", "PNG", "RGB"),
        ("gif_as_jpg", "GIF", "P"),
        ("cmyk_jpeg", "JPEG", "CMYK"),
        ("rgba_png_as_jpg", "PNG", "RGBA"),
    ],
)
def test_misencoded_images(sample, kind, fmt, mode):
    name = _defect(sample, kind)
    img = sample.image(name)
    assert (img.format, img.mode) == (fmt, mode)
    img.load()
    width, height = (int(sample.xml(name).findtext(f"size/{k}")) for k in ("width", "height"))
    assert img.size == (width, height)


def test_truncated_jpeg_fails_to_load(sample, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    name = _defect(sample, "truncated_jpeg")
    img = sample.image(name)
    assert img.format == "JPEG"
    with pytest.raises(OSError):
        img.load()
    sample.image(sample.clean_trainval()[0]).load()


def test_apple_double_junk_is_not_an_image(sample):
    for name, data in sample.annotations.items():
        if "/._" in name:
            assert data.startswith(b"\x00\x05\x16\x07")
            with pytest.raises(OSError):
                Image.open(io.BytesIO(data))


# --------------------------------------------------------------------------- outputs


def test_summary_and_sha256sums(sample):
    summary = sample.summary
    json.dumps(summary)
    assert summary["images"] == summary["trainval"] + summary["test"]
    sums = (sample.out / "SHA256SUMS").read_text().splitlines()
    assert len(sums) == 2
    for line in sums:
        digest, name = line.split("  ")
        data = (sample.out / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest == summary["archives"][name]["sha256"]
        assert len(data) == summary["archives"][name]["size"]


def test_same_seed_gives_identical_archives(tmp_path):
    small = {"breeds": 3, "per_breed": 4}
    first = make_sample(tmp_path / "a", seed=7, **small)
    second = make_sample(tmp_path / "b", seed=7, **small)
    other = make_sample(tmp_path / "c", seed=8, **small)
    for archive in ("images.tar.gz", "annotations.tar.gz"):
        assert first["archives"][archive] == second["archives"][archive]
        assert first["archives"][archive]["sha256"] != other["archives"][archive]["sha256"]
        assert (tmp_path / "a" / archive).read_bytes() == (tmp_path / "b" / archive).read_bytes()


def test_minimal_sample_holds_every_defect(tmp_path):
    summary = make_sample(tmp_path, breeds=2, per_breed=6)
    assert summary["images"] == 12 and summary["trainval"] == 6
    assert sorted(summary["defects"].values()) == sorted(DEFECT_KINDS)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"breeds": 0}, ValueError, "breeds must be between 1 and 37"),
        ({"breeds": 38}, ValueError, "breeds must be between 1 and 37"),
        ({"per_breed": 1}, ValueError, "per_breed must be at least 2"),
        ({"seed": -1}, ValueError, "seed must be >= 0"),
        ({"breeds": "6"}, TypeError, "breeds must be an int"),
        ({"breeds": 2, "per_breed": 4}, ValueError, r"only 4 trainval images.*>= 6"),
        ({"breeds": 1, "per_breed": 10}, ValueError, "needs its own trainval image"),
    ],
)
def test_argument_validation(tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        make_sample(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
