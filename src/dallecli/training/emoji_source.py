"""The emoji world's sources: Noto emoji images and CLDR annotations, fetched from npm at BUILD time only.

    python -m dallecli.training.emoji_source [--cache build/emoji-src] [--selection core|everyday|broad]

Two pinned npm packages are packed (``npm pack``) into a cache folder, checked against their pinned
``dist.integrity`` (sha512, which the registry's ``npm view`` must also report), and unpacked with a checked
``tarfile`` extraction (every member a regular file or folder that stays inside the target folder):

- ``emoji-datasource-google`` 16.0.0: ``emoji.json`` (Unicode name, short names, category, subcategory, image
  file name, skin-tone variations) and the 64x64 RGBA PNGs of the Google Noto emoji (v2.048). The package's code
  and data are MIT (Cal Henderson); its README states the Google/Noto images are under Apache-2.0 (the Noto emoji
  project, https://github.com/googlefonts/noto-emoji).
- ``emojibase-data`` 16.0.3 (MIT, Miles Johnson): ``en/data.json``, the English CLDR labels and keywords
  ("cat face": animal, cat, face, kitten, kitty, pet); CLDR data is under the Unicode licence.

:func:`load_concepts` joins both into :class:`Concept` records and keeps the ones worth drawing
(:data:`SELECTIONS`): no flags, keycaps, letter or number symbols, skin-tone or gender variants, clock faces or
other symbols, except the coloured circle, square and triangle emoji, which keep the shapes world's prompts
working. Nothing here runs at generation time.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import shutil
import subprocess
import tarfile
import tempfile
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from dallecli.atomic import staged_folder, write_file
from dallecli.errors import DalleError

DEFAULT_CACHE = Path("build/emoji-src")


class EmojiSourceError(DalleError):
    """A source package that cannot be fetched, fails its integrity check, or is an unsafe archive."""


@dataclass(frozen=True)
class Source:
    """One pinned npm package: what to unpack from it and under which licences it comes."""

    package: str
    version: str
    integrity: str  # npm's dist.integrity: "sha512-" + base64 of the tarball's SHA-512
    licences: dict[str, str]
    keep: tuple[str, ...]  # path prefixes (inside the tarball) to unpack; the rest is skipped

    @property
    def spec(self) -> str:
        return f"{self.package}@{self.version}"

    @property
    def stem(self) -> str:
        return f"{self.package}-{self.version}"


GOOGLE = Source(
    "emoji-datasource-google", "16.0.0",
    "sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A==",
    {"images": "Apache-2.0 (Google Noto Emoji v2.048, https://github.com/googlefonts/noto-emoji)",
     "data (emoji.json)": "MIT (Copyright (c) 2013 Cal Henderson, https://github.com/iamcal/emoji-data)"},
    ("package/emoji.json", "package/LICENSE", "package/README.md", "package/package.json",
     "package/img/google/64/"),
)
EMOJIBASE = Source(
    "emojibase-data", "16.0.3",
    "sha512-MopInVCDZeXvqBMPJxnvYUyKw9ImJZqIDr2sABo6acVSPev5IDYX+mf+0tsu96JJyc3INNvgIf06Eso7bdTX2Q==",
    {"package": "MIT (Copyright (c) 2017-2019 Miles Johnson, https://github.com/milesj/emojibase)",
     "CLDR annotations (en/data.json)": "Unicode License v3 (https://www.unicode.org/license.txt)"},
    ("package/en/data.json", "package/LICENSE", "package/README.md", "package/package.json"),
)
SOURCES = (GOOGLE, EMOJIBASE)

# The coloured shapes: kept whatever the selection, with the shapes world's names ("red triangle").
SHAPE_EMOJI: dict[str, str] = {
    "1F534": "red circle", "1F7E0": "orange circle", "1F7E1": "yellow circle", "1F7E2": "green circle",
    "1F535": "blue circle", "1F7E3": "purple circle", "26AB": "black circle", "26AA": "white circle",
    "1F7E4": "brown circle",
    "1F7E5": "red square", "1F7E7": "orange square", "1F7E8": "yellow square", "1F7E9": "green square",
    "1F7E6": "blue square", "1F7EA": "purple square", "2B1B": "black square", "2B1C": "white square",
    "1F7EB": "brown square",
    "1F53A": "red triangle", "1F53B": "red triangle pointed down",
}

# Subcategories (emoji.json's) of each selection. "everyday": things a person would ask to see drawn, each
# distinct at 64 pixels; "core" a smaller part of it; "broad" adds the rest of the pictorial emoji (faces' fine
# shades, people, objects). Each includes the coloured shapes.
_EVERYDAY = {
    "Animals & Nature": {"animal-amphibian", "animal-bird", "animal-bug", "animal-mammal", "animal-marine",
                         "animal-reptile", "plant-flower", "plant-other"},
    "Food & Drink": {"food-fruit", "food-vegetable", "food-prepared", "food-sweet", "drink", "food-asian"},
    "Travel & Places": {"place-building", "place-geographic", "place-other", "sky & weather", "transport-air",
                        "transport-ground", "transport-water"},
    "Activities": {"sport", "event", "game"},
    "Objects": {"clothing", "household", "musical-instrument", "tool", "computer", "light & video"},
    "Smileys & Emotion": {"face-smiling", "face-affection", "face-costume", "cat-face", "monkey-face", "heart"},
    "People & Body": {"person-fantasy", "person-role", "body-parts"},
}
_BROAD = {
    **{k: set(v) for k, v in _EVERYDAY.items()},
    "Food & Drink": _EVERYDAY["Food & Drink"] | {"dishware"},
    "Travel & Places": _EVERYDAY["Travel & Places"] | {"place-map", "place-religious", "hotel", "time"},
    "Activities": _EVERYDAY["Activities"] | {"award-medal", "arts & crafts"},
    "Objects": None,  # all of them
    "Smileys & Emotion": None,
    "People & Body": _EVERYDAY["People & Body"] | {"person", "person-activity", "person-sport", "person-gesture",
                                                   "person-resting", "hands", "hand-fingers-open",
                                                   "hand-fingers-partial", "hand-single-finger",
                                                   "hand-fingers-closed", "hand-prop"},
}
_CORE = {  # the most common everyday things, for a smaller model: about 400
    "Animals & Nature": {"animal-mammal", "animal-bird", "animal-marine", "animal-reptile", "animal-amphibian",
                         "plant-flower"},
    "Food & Drink": {"food-fruit", "food-vegetable", "food-sweet", "food-prepared"},
    "Travel & Places": {"sky & weather", "transport-air", "transport-water", "place-building"},
    "Activities": {"sport"},
    "Objects": {"musical-instrument"},
    "Smileys & Emotion": {"face-smiling", "cat-face", "heart"},
}
SELECTIONS: dict[str, dict[str, set[str] | None]] = {"core": _CORE, "everyday": _EVERYDAY, "broad": _BROAD}
GENDER_SIGNS = ("200D-2640", "200D-2642")  # ZWJ + female / male sign: the gendered variant of a person emoji
CLOCK_FACE = re.compile(r"o.?clock|-thirty")
# Words too generic to stand for one concept in a caption, and words the scene grammar owns.
GENERIC_WORDS = frozenset("""
    animal face food fruit vegetable drink object symbol nature plant place travel sport game thing person man woman
    boy girl adult people body hand red orange yellow green blue purple brown black white gray grey pink small large
    medium big little left right top bottom center middle corner background gradient on in at the a an with and of
    emotion smile happy sad mark sign nature weather transport vehicle building tool
""".split())


@dataclass(frozen=True)
class Concept:
    """One drawable thing: an emoji, its names and the path of its 64x64 RGBA image.

    Attributes:
        id: the emoji's code points, upper-case hex joined by "-" without FE0F ("1F431").
        char: the emoji character(s).
        name: the canonical English name (CLDR label, lower-case ASCII: "cat face").
        short_names: other names for it (iamcal short names, "_" as spaces: "cat").
        keywords: single CLDR keywords specific enough to stand for it in a caption ("kitten", "kitty").
        category, subcategory: emoji.json's grouping ("Smileys & Emotion", "cat-face").
        image: path of the 64x64 RGBA PNG (Google Noto art).
    """

    id: str
    char: str
    name: str
    short_names: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()
    category: str = ""
    subcategory: str = ""
    image: Path = field(default=Path(), compare=False)

    @property
    def words(self) -> tuple[str, ...]:
        """Every way a caption may name it: the name first, then short names, then keywords."""
        return (self.name, *self.short_names, *self.keywords)


# ---------------------------------------------------------------------------------------------- fetching

def integrity_of(path: Path) -> str:
    """npm's integrity string ("sha512-" + base64 digest) of a file."""
    digest = hashlib.sha512()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "sha512-" + base64.b64encode(digest.digest()).decode("ascii")


def _npm(*args: str, cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(["npm", *args], capture_output=True, text=True, check=True, cwd=cwd, timeout=600)
    except FileNotFoundError as exc:
        raise EmojiSourceError("npm is not installed; install Node.js (npm) to fetch the emoji sources") from exc
    except subprocess.CalledProcessError as exc:
        raise EmojiSourceError(f"npm {' '.join(args)} failed: {exc.stderr.strip()[-300:]}") from exc
    except subprocess.TimeoutExpired as exc:
        raise EmojiSourceError(f"npm {' '.join(args)} timed out; check the network and retry") from exc
    return done.stdout


def registry_integrity(source: Source) -> str:
    """The ``dist.integrity`` the npm registry reports for the pinned version (needs the network)."""
    return _npm("view", source.spec, "dist.integrity").strip()


def fetch_tarball(source: Source, cache: Path) -> Path:
    """The verified tarball of ``source`` in ``cache``, packed with ``npm pack`` when it is not there yet.

    Raises:
        EmojiSourceError: npm fails, or the registry's or the tarball's integrity is not the pinned one.
    """
    final = cache / f"{source.stem}.tgz"
    if final.exists() and integrity_of(final) == source.integrity:
        return final
    reported = registry_integrity(source)
    if reported != source.integrity:
        raise EmojiSourceError(f"the npm registry reports {source.spec} with integrity {reported}, not the pinned "
                               f"{source.integrity}; refusing it")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-npm-", dir=cache.resolve()) as scratch:
        _npm("pack", source.spec, "--pack-destination", scratch, "--silent", cwd=Path(scratch))
        packed = Path(scratch) / f"{source.stem}.tgz"
        if not packed.exists() or integrity_of(packed) != source.integrity:
            raise EmojiSourceError(f"the tarball npm packed for {source.spec} does not match its pinned integrity")
        with packed.open("rb") as handle:
            write_file(final, lambda out: shutil.copyfileobj(handle, out), what=f"{final.name} in {cache}")
    return final


def safe_extract(archive: Path, dest: Path, keep: tuple[str, ...] | None = None) -> list[Path]:
    """Unpack a (gzipped) tarball into ``dest`` after checking every member, without following links.

    Every member must be a regular file or a folder whose normalised path stays inside ``dest`` (no absolute
    paths, no ``..``, no links, devices or FIFOs); one bad member refuses the whole archive before anything is
    written. Members whose names start with none of ``keep`` (when given) are skipped.

    Args:
        archive: the tarball.
        dest: the folder to fill (created).
        keep: path prefixes to unpack, e.g. ``("package/emoji.json", "package/img/google/64/")``.

    Returns:
        The files written.

    Raises:
        EmojiSourceError: an unsafe member (its name is in the message), or an unreadable archive.
    """
    dest = Path(dest)
    root = dest.resolve()
    written = []
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                name = member.name
                parts = PurePosixPath(name).parts
                if not (member.isfile() or member.isdir()):
                    raise EmojiSourceError(f"{archive.name}: member {name!r} is not a regular file or folder")
                if PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name or ":" in name:
                    raise EmojiSourceError(f"{archive.name}: member {name!r} points outside the folder")
                if not (dest / name).resolve().is_relative_to(root):
                    raise EmojiSourceError(f"{archive.name}: member {name!r} points outside the folder")
            for member in members:
                if not member.isfile() or (keep is not None and not member.name.startswith(keep)):
                    continue
                target = dest / member.name
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None  # a regular file
                with source, target.open("wb") as out:
                    shutil.copyfileobj(source, out)
                written.append(target)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise EmojiSourceError(f"{archive} cannot be unpacked ({exc}); delete it to fetch it again") from exc
    return written


def fetch_sources(cache: Path = DEFAULT_CACHE) -> dict[str, Path]:
    """Fetch, verify and unpack both sources into ``cache`` (each step skipped when already done) and write
    ``cache/sources.json`` recording versions, integrity and licences.

    Returns:
        ``{package name: its unpacked "package" folder}``.

    Raises:
        EmojiSourceError: see :func:`fetch_tarball` and :func:`safe_extract`.
    """
    cache = Path(cache)
    folders = {}
    for source in SOURCES:
        unpacked = cache / source.stem
        if not (unpacked / ".complete").exists():
            tarball = fetch_tarball(source, cache)
            with staged_folder(unpacked, what=f"{source.stem} in {cache}") as staging:
                safe_extract(tarball, staging, source.keep)
                (staging / ".complete").write_text(source.integrity + "\n", encoding="utf-8")
        folders[source.package] = unpacked / "package"
    write_file(cache / "sources.json", json.dumps(sources_record(), indent=2) + "\n")
    return folders


def sources_record() -> list[dict]:
    """What a model folder and the README record about the sources: package, version, integrity, licences."""
    return [{"package": s.package, "version": s.version, "integrity": s.integrity, "licences": s.licences,
             "tarball": f"https://registry.npmjs.org/{s.package}/-/{s.stem}.tgz"} for s in SOURCES]


# ---------------------------------------------------------------------------------------------- parsing

def _ascii(text: str) -> str:
    text = text.replace("\u2019", "'").replace("\u201c", "").replace("\u201d", "")
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"\s+", " ", folded.lower()).strip()


def _key(hexcode: str) -> str:
    return "-".join(p for p in hexcode.upper().split("-") if p != "FE0F")


def _keywords(tags: list[str], name: str, counts: Counter) -> tuple[str, ...]:
    """The CLDR tags that can stand for the concept alone: one word, not generic, not a verb or adjective by
    its ending, not a plural of another tag or name word, shared by at most three concepts."""
    own = set(tags) | set(name.split())
    kept = []
    for tag in tags:
        tag = _ascii(tag)
        if not re.fullmatch(r"[a-z][a-z-]{2,}", tag) or tag in GENERIC_WORDS or tag in name.split():
            continue
        if tag.endswith(("ing", "ed", "ly", "ful", "ous", "ive", "ish")) and len(tag) > 5:
            continue  # a verb or an adjective ("sliding", "curious"), not a name for the thing
        if tag.endswith("s") and (tag[:-1] in own or tag[:-2] in own or tag[:-3] + "y" in own):
            continue
        if counts[tag] > 3:
            continue
        kept.append(tag)
    return tuple(kept)


def parse_concepts(emoji_json: Path, emojibase_json: Path, image_dir: Path) -> list[Concept]:
    """Every emoji with a Google image, default skin tone only, joined with its CLDR label and keywords.

    Args:
        emoji_json: emoji-datasource's ``emoji.json``.
        emojibase_json: emojibase-data's ``en/data.json``.
        image_dir: the folder of the 64x64 PNGs (``img/google/64``).

    Returns:
        Concepts in emoji.json's sort order (skin-tone variations are separate entries there and not read).
    """
    entries = json.loads(Path(emoji_json).read_text(encoding="utf-8"))
    cldr = {_key(e["hexcode"]): e for e in json.loads(Path(emojibase_json).read_text(encoding="utf-8"))}
    tag_counts = Counter(_ascii(t) for e in cldr.values() for t in set(e.get("tags") or []))
    concepts = []
    for entry in sorted(entries, key=lambda e: e.get("sort_order", 0)):
        if not entry.get("has_img_google"):
            continue
        key = _key(entry["unified"])
        annotation = cldr.get(key, {})
        name = SHAPE_EMOJI.get(key) or _ascii(annotation.get("label") or entry.get("name") or "")
        if not name:
            continue
        shorts = []
        for short in entry.get("short_names") or []:
            short = _ascii(short.replace("_", " "))
            if short != name and short not in shorts and re.fullmatch(r"[a-z][a-z ]+", short):
                shorts.append(short)
        char = "".join(chr(int(p, 16)) for p in entry["unified"].split("-"))
        concepts.append(Concept(
            id=key, char=char, name=name, short_names=tuple(shorts),
            keywords=_keywords(annotation.get("tags") or [], name, tag_counts),
            category=entry.get("category", ""), subcategory=entry.get("subcategory", ""),
            image=Path(image_dir) / entry["image"],
        ))
    return concepts


def keep_concept(concept: Concept, selection: str = "everyday") -> bool:
    """Whether a concept belongs to a selection (see :data:`SELECTIONS`); the coloured shapes always do."""
    if concept.id in SHAPE_EMOJI:
        return True
    subcategories = SELECTIONS[selection].get(concept.category, set())
    if subcategories is not None and concept.subcategory not in subcategories:
        return False
    if concept.category == "Symbols" or concept.category == "Flags" or concept.category == "Component":
        return False
    if any(sign in concept.id for sign in GENDER_SIGNS) or "1F3FB" <= concept.id[-5:] <= "1F3FF":
        return False  # a gendered or skin-toned variant (the neutral, yellow one is kept)
    if ":" in concept.name or CLOCK_FACE.search(concept.name) or "facing right" in concept.name:
        return False
    if concept.category == "People & Body" and re.match(r"(man|woman|men|women)\b", concept.name) \
            and concept.name not in ("man", "woman"):
        return False
    return re.fullmatch(r"[a-z][a-z0-9' -]*", concept.name) is not None


def load_concepts(cache: Path = DEFAULT_CACHE, selection: str = "everyday") -> list[Concept]:
    """The selected concepts from an unpacked cache (see :func:`fetch_sources`), with unique names.

    Args:
        cache: the folder :func:`fetch_sources` filled.
        selection: a key of :data:`SELECTIONS`.

    Returns:
        Concepts in emoji order; when two share a name, only the first is kept.

    Raises:
        EmojiSourceError: the cache has not been filled.
    """
    google = Path(cache) / GOOGLE.stem / "package"
    base = Path(cache) / EMOJIBASE.stem / "package"
    if not (google / "emoji.json").exists() or not (base / "en" / "data.json").exists():
        raise EmojiSourceError(f"no emoji sources in {cache}; run `python -m dallecli.training.emoji_source` first")
    return select(parse_concepts(google / "emoji.json", base / "en" / "data.json", google / "img" / "google" / "64"),
                  selection)


def select(concepts: list[Concept], selection: str = "everyday") -> list[Concept]:
    """The concepts of ``selection`` whose image exists, the first of each name only."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {sorted(SELECTIONS)}, not {selection!r}")
    kept, names = [], set()
    for concept in concepts:
        if keep_concept(concept, selection) and concept.name not in names and concept.image.exists():
            kept.append(concept)
            names.add(concept.name)
    return kept


def category_counts(concepts: list[Concept]) -> dict[str, int]:
    """Number of concepts per category, largest first (the coloured shapes counted as "Shapes")."""
    counts = Counter("Shapes" if c.id in SHAPE_EMOJI else c.category for c in concepts)
    return dict(counts.most_common())


def bundle_selection(cache: Path, folder: Path, selection: str) -> int:
    """Copy what :func:`load_concepts` reads for ``selection`` (the two JSON files, the licences and the
    selection's 64x64 PNGs only, ~2 MB for "core" against ~100 MB unpacked) into ``folder``, laid out as a cache,
    for a machine that cannot reach npm (a GPU machine that is sent the working tree, say).

    Returns:
        The number of images copied.

    Raises:
        EmojiSourceError: ``cache`` has not been filled.
    """
    concepts = load_concepts(cache, selection)
    with staged_folder(Path(folder), what=f"emoji source bundle {folder}") as staging:
        for source in SOURCES:
            shutil.copytree(Path(cache) / source.stem, staging / source.stem,
                            ignore=shutil.ignore_patterns("img"))  # the images: the selection's only, below
        images = staging / GOOGLE.stem / "package" / "img" / "google" / "64"
        images.mkdir(parents=True)
        for concept in concepts:
            shutil.copyfile(concept.image, images / concept.image.name)
        shutil.copyfile(Path(cache) / "sources.json", staging / "sources.json")
    return len(concepts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fetch the emoji sources (npm) and list the concepts kept.")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--selection", choices=sorted(SELECTIONS), default="everyday")
    parser.add_argument("--list", action="store_true", help="print every kept concept")
    parser.add_argument("--bundle", type=Path, default=None,
                        help="also copy the selection's sources into this folder (a cache to carry elsewhere)")
    args = parser.parse_args(argv)
    fetch_sources(args.cache)
    if args.bundle is not None:
        print(f"{bundle_selection(args.cache, args.bundle, args.selection)} images bundled in {args.bundle}")
    concepts = load_concepts(args.cache, args.selection)
    if args.list:
        for c in concepts:
            print(f"{c.id}\t{c.char}\t{c.name}\t{', '.join(c.short_names + c.keywords)}")
    for category, count in category_counts(concepts).items():
        print(f"{count:5d}  {category}")
    print(f"{len(concepts):5d}  concepts ({args.selection})")


if __name__ == "__main__":
    main()
