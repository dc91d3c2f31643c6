"""The 37 Oxford-IIIT Pet breeds and their ids.

Ids are the dataset's CLASS-ID (and the TensorFlow Object Detection API's pets label map):
breed names sorted case-insensitively, 1-based. Capitalised names are cats (SPECIES 1), the
rest dogs (SPECIES 2); BREED-ID numbers each species' breeds 1..12 (cats) and 1..25 (dogs) in
the same order.
"""

from __future__ import annotations

BREEDS: tuple[str, ...] = tuple(
    sorted(
        [
            "Abyssinian", "american_bulldog", "american_pit_bull_terrier", "basset_hound",
            "beagle", "Bengal", "Birman", "Bombay", "boxer", "British_Shorthair", "chihuahua",
            "Egyptian_Mau", "english_cocker_spaniel", "english_setter", "german_shorthaired",
            "great_pyrenees", "havanese", "japanese_chin", "keeshond", "leonberger",
            "Maine_Coon", "miniature_pinscher", "newfoundland", "Persian", "pomeranian", "pug",
            "Ragdoll", "Russian_Blue", "saint_bernard", "samoyed", "scottish_terrier",
            "shiba_inu", "Siamese", "Sphynx", "staffordshire_bull_terrier", "wheaten_terrier",
            "yorkshire_terrier",
        ],
        key=str.lower,
    )
)

CAT, DOG = 1, 2

# looked up per list line by the TFRecord step's serial plan: built once, not searched
_CLASS_IDS = {b: i for i, b in enumerate(BREEDS, 1)}
_BREED_IDS = {b: i for group in ([b for b in BREEDS if b[0].isupper()],       # cats
                                  [b for b in BREEDS if not b[0].isupper()])  # dogs
              for i, b in enumerate(group, 1)}


def class_id(breed: str) -> int:
    """1-based CLASS-ID of a breed name (exact spelling, as in the file names)."""
    try:
        return _CLASS_IDS[breed]
    except (KeyError, TypeError):
        raise KeyError(
            f"unknown breed {breed!r}: expected one of the 37 Oxford-IIIT breeds"
        ) from None


def species(breed: str) -> int:
    """1 for cats (capitalised names), 2 for dogs."""
    class_id(breed)
    return CAT if breed[0].isupper() else DOG


def breed_id(breed: str) -> int:
    """BREED-ID: position of the breed among its species' breeds, 1-based."""
    class_id(breed)
    return _BREED_IDS[breed]


def breed_of(image_name: str) -> str:
    """Breed from an image name such as ``Abyssinian_12`` or ``great_pyrenees_3.jpg``."""
    stem = image_name.rsplit("/", 1)[-1]
    if stem.endswith(".jpg"):
        stem = stem[:-4]
    breed, sep, num = stem.rpartition("_")
    if not sep or not num.isdigit():
        raise ValueError(f"image name {image_name!r} is not BREED_<n>")
    class_id(breed)
    return breed
