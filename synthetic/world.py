"""M-BEIR-mini: a deterministic synthetic multimodal world in the exact M-BEIR layout.

Every item is a small compositional scene: one or two shapes, each with a colour, size, position
and texture, on a background colour. Scenes are rendered to 64x64 PNGs and described by templated
text, and three synthetic datasets (ids 20-22, clear of M-BEIR's 0-10) cover the eight M-BEIR
tasks, so the whole pipeline runs end to end on a CPU with exact ground truth:

    genius world --out worlds/demo --size demo [--seed N]

Ground truth is exact by construction. Every candidate has a content key (its scene; its scene and
the question it answers; or, for object cards, the object) and a pool holds each key once, so a
query's positives are exactly the pool entries with the key it asks for. Scenes are handed out
without replacement across the whole world, so each scene belongs to one pool: test queries are
new scenes, never seen in training, while the attribute vocabulary is shared.

Pools follow M-BEIR: training candidates go to the union train pool; each (dataset, task) has one
local pool that its val and test queries share; the union test pool is the local pools, and the
union val pool is the local pools trimmed to the val positives.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import itertools
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np
from PIL import Image, ImageDraw

from genius.common.config import resolve_path
from genius.common.io import atomic_dir, atomic_write_json, atomic_write_text
from genius.common.mbeir import MBEIR_DATASET_IDS, TASKS
from genius.common.runstate import RunKey, RunState
from genius.common.stage import ArgumentParser, add_debug_flag, user_errors_exit

GENERATOR = "genius.synthetic.world"
# Worlds written before the module moved out of common/ name it so; they are the same worlds.
GENERATORS = (GENERATOR, "genius.common.world")
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")

# ---- vocabulary -----------------------------------------------------------------------------
IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "heart")
# Object colours are far apart in RGB and none is a background colour, so every object stands out.
COLOURS = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 215, 30), "green": (40, 170, 60),
    "cyan": (40, 200, 210), "blue": (40, 80, 220), "purple": (140, 60, 190), "pink": (245, 120, 190),
}
BACKGROUNDS = {"white": (245, 245, 245), "gray": (128, 128, 128), "black": (20, 20, 20)}
SIZES = {"small": 7, "large": 13}  # radius in pixels
TEXTURES = ("solid", "striped", "dotted")
POSITIONS = {"left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48), "centre": (32, 32)}
# Two large shapes only fit side by side or one above the other; the centre is for lone shapes.
TWO_OBJECT_LAYOUTS = (("left", "right"), ("top", "bottom"))
OBJECT_ATTRIBUTES = ("shape", "colour", "size", "texture", "position")
VALUES = {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES), "texture": TEXTURES,
          "position": tuple(POSITIONS), "background": tuple(BACKGROUNDS)}


@dataclass(frozen=True)
class SyntheticDataset:
    id: int
    name: str  # lower-case alphanumeric: it goes into mbeir_<name>_task<k>_<split>.jsonl
    display_name: str
    tasks: tuple[int, ...]


# Task spread mirrors M-BEIR: captioned photos (news), encyclopedia passages and entity cards
# (wiki), and image edits / near-duplicates (edit).
DATASETS = (
    SyntheticDataset(20, "shapesnews", "ShapesNews", (0, 2, 3)),
    SyntheticDataset(21, "shapeswiki", "ShapesWiki", (1, 6, 8)),
    SyntheticDataset(22, "shapesedit", "ShapesEdit", (4, 7)),
)
assert not {d.id for d in DATASETS} & set(MBEIR_DATASET_IDS.values())

# Four prompts per (dataset, task); each names the modality of the target.
INSTRUCTIONS = {
    (20, 0): ("Find the news photo of the shapes described in this caption.",
              "Retrieve the press image that matches this description.",
              "Which news picture shows these shapes?",
              "Show me the image this news caption was written for."),
    (20, 2): ("Find the news story, an image with its headline text, that matches this caption.",
              "Retrieve the news item, picture and text, that shows this scene.",
              "Which news post with a photo and a headline text fits this description?",
              "Show me the news entry, its image together with its text, described here."),
    (20, 3): ("Find a news caption text that describes this photo.",
              "Retrieve the caption written for this news image.",
              "Which caption text describes the shapes in this picture?",
              "Look up a text description of this news photo."),
    (21, 1): ("Retrieve the encyclopedia passage that describes the scene in this question.",
              "Find the wiki text about the picture described here.",
              "Which article passage is about this arrangement of shapes?",
              "Look up the text entry describing these shapes."),
    (21, 6): ("Find the encyclopedia passage that answers this question about the picture.",
              "Retrieve the wiki text that answers the question for this image.",
              "Which passage answers the question about the shape in this picture?",
              "Look up the text that gives the answer for this image."),
    (21, 8): ("Find the wiki entry, image and text, of the shape this question points to.",
              "Retrieve the encyclopedia card, with its image and description text, of the shape asked about.",
              "Which entry, a picture plus a text, shows the shape the question names?",
              "Look up the image-and-text entry of the shape in question."),
    (22, 4): ("Find another image of exactly the same scene.",
              "Retrieve a picture showing the same shapes as this one.",
              "Which photo is a re-shot of this scene?",
              "Show me an image with the same arrangement of shapes."),
    (22, 7): ("Find the image that shows this picture after the requested edit.",
              "Retrieve the picture of the scene once the change is made.",
              "Which image matches this one with the described modification?",
              "Show me the edited photo described by the note."),
}


@dataclass(frozen=True)
class WorldSize:
    queries: dict[str, int]  # queries per (dataset, task) file, by split
    train_pool: int  # minimum candidates per (dataset, task) in the union train pool
    local_pool: int  # minimum candidates per local pool, which val and test queries share as in M-BEIR


WORLD_SIZES = {
    # The project's tests run the whole pipeline on this one (about two minutes on 2 cores) and ask
    # GENIUS for ten times chance Recall@5 on its task-specific pools. Chance is about
    # 5 x positives / pool, so 600-candidate pools put it at 0.8% (one positive) and 1.7% (i->t,
    # two captions); with 60-112 it was 8-9%, and ten times that was out of reach. 200 training
    # queries per task are what the from-scratch CLIP-SF and generator need: with 40 the CLIP-SF
    # memorised its 320 pairs (dense Recall@5 at 4x chance on 400-candidate pools), with 120
    # GENIUS's T->I Recall@5 fell to 20% on one world. 40 test queries keep one query at 2.5
    # points of Recall.
    "test": WorldSize(queries={"train": 200, "val": 8, "test": 40}, train_pool=400, local_pool=600),
    # The CPU demo trains a tiny CLIP from scratch on this one within its 10-minute budget.
    "demo": WorldSize(queries={"train": 300, "val": 40, "test": 100}, train_pool=600, local_pool=400),
}

# ---- scenes ---------------------------------------------------------------------------------
_MAX_DRAWS = 1000  # a fresh scene is found in a handful of draws; this bound only guards a bug
# There are only 5,040 one-shape scenes (and 680K two-shape ones); the demo world takes about 8K
# scenes, so lone shapes must stay a minority or their hard negatives run out.
LONE_SHAPE_SHARE = 0.2


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    position: str
    texture: str

    def to_json(self) -> dict:
        return dict(vars(self))  # dataclasses.asdict is ten times slower, and this is a hot path


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Obj, ...]  # in layout order: left before right, top before bottom

    def to_json(self) -> dict:
        return {"background": self.background, "objects": [o.to_json() for o in self.objects]}

    @cached_property
    def key(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)


@dataclass(frozen=True)
class Modification:
    attribute: str  # one of OBJECT_ATTRIBUTES, or "background"
    value: str
    target: int | None  # index of the changed object; None for the background

    def to_json(self) -> dict:
        return {"object": self.target, "attribute": self.attribute, "value": self.value}


def random_scene(rng: random.Random, n_objects: int | None = None) -> Scene:
    n_objects = n_objects or (1 if rng.random() < LONE_SHAPE_SHARE else 2)
    positions = (rng.choice(tuple(POSITIONS)),) if n_objects == 1 else rng.choice(TWO_OBJECT_LAYOUTS)
    return Scene(rng.choice(VALUES["background"]), tuple(random_object(rng, p) for p in positions))


def random_object(rng: random.Random, position: str) -> Obj:
    return Obj(rng.choice(SHAPES), rng.choice(VALUES["colour"]), rng.choice(VALUES["size"]), position,
               rng.choice(TEXTURES))


def apply_modification(scene: Scene, mod: Modification) -> Scene:
    if mod.target is None:
        return dataclasses.replace(scene, background=mod.value)
    objects = list(scene.objects)
    objects[mod.target] = dataclasses.replace(objects[mod.target], **{mod.attribute: mod.value})
    return dataclasses.replace(scene, objects=tuple(objects))


def random_modification(scene: Scene, rng: random.Random,
                        attributes: tuple[str, ...] = OBJECT_ATTRIBUTES + ("background",)) -> Modification:
    """Change one attribute to a different value. Only a lone shape may move: two shapes keep
    their layout so they never overlap."""
    options = [(None, "background")] if "background" in attributes else []
    options += [(i, a) for i in range(len(scene.objects)) for a in OBJECT_ATTRIBUTES
                if a in attributes and (a != "position" or len(scene.objects) == 1)]
    target, attribute = rng.choice(options)
    current = scene.background if target is None else getattr(scene.objects[target], attribute)
    return Modification(attribute, rng.choice([v for v in VALUES[attribute] if v != current]), target)


class SceneBank:
    """Hands out each scene at most once in a world, so no scene is shared by two pools or splits."""

    def __init__(self) -> None:
        self._taken: set[str] = set()  # membership only, never iterated (set order varies per run)

    def claim(self, scene: Scene) -> bool:
        """Take ``scene``; False when it was already taken."""
        if scene.key in self._taken:
            return False
        self._taken.add(scene.key)
        return True

    def fresh(self, rng: random.Random, n_objects: int | None = None) -> Scene:
        for _ in range(_MAX_DRAWS):
            scene = random_scene(rng, n_objects)
            if self.claim(scene):
                return scene
        raise RuntimeError("no fresh scene left after many draws")

    def fresh_modification(self, scene: Scene, rng: random.Random) -> tuple[Modification, Scene]:
        """A one-attribute change of ``scene`` that leads to a scene not taken yet (and takes it)."""
        for _ in range(_MAX_DRAWS):
            mod = random_modification(scene, rng)
            changed = apply_modification(scene, mod)
            if self.claim(changed):
                return mod, changed
        raise RuntimeError("every neighbour of the scene is already taken")

    def near_miss(self, scene: Scene, rng: random.Random) -> Scene:
        """A fresh scene that differs from ``scene`` in one attribute: a hard negative."""
        return self.fresh_modification(scene, rng)[1]


# ---- rendering ------------------------------------------------------------------------------
def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    return [((1 if k % 2 == 0 else inner) * math.cos(math.pi * k / points - math.pi / 2),
             (1 if k % 2 == 0 else inner) * math.sin(math.pi * k / points - math.pi / 2))
            for k in range(2 * points)]


def _heart(steps: int = 32) -> list[tuple[float, float]]:
    """The classic parametric heart, scaled so its bounding box is [-1, 1] on both axes."""
    ts = [2 * math.pi * k / steps for k in range(steps)]
    xs = [16 * math.sin(t) ** 3 for t in ts]
    ys = [-(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)) for t in ts]
    x_mid, y_mid = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    x_half, y_half = (max(xs) - min(xs)) / 2, (max(ys) - min(ys)) / 2
    return [((x - x_mid) / x_half, (y - y_mid) / y_half) for x, y in zip(xs, ys)]


_ARM = 0.33  # half-width of the cross's arms, as a fraction of the radius
# Outlines in units of the shape's radius, centred on (0, 0); the circle is drawn as an ellipse.
UNIT_OUTLINES = {
    "square": [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)],
    "triangle": [(0.0, -1.0), (1.0, 0.8), (-1.0, 0.8)],
    "diamond": [(0.0, -1.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)],
    "cross": [(-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM), (1, _ARM), (_ARM, _ARM), (_ARM, 1),
              (-_ARM, 1), (-_ARM, _ARM), (-1, _ARM), (-1, -_ARM), (-_ARM, -_ARM)],
    "star": _star(),
    "heart": _heart(),
}

_GRID_Y, _GRID_X = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
# Patterns are fixed in image coordinates; 3-px stripes and 2x2 dots stay visible on a 14-px shape.
_PATTERNS = {
    "solid": np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool),
    "striped": ((_GRID_X + _GRID_Y) // 3) % 2 == 1,
    "dotted": (_GRID_X % 5 < 2) & (_GRID_Y % 5 < 2),
}


@lru_cache(maxsize=None)
def _fill(colour: str, texture: str) -> Image.Image:
    """A full-size layer in the object's colour, with the pattern marks in a darker shade of it."""
    rgb = np.array(COLOURS[colour], dtype=np.float32)
    layer = np.where(_PATTERNS[texture][..., None], rgb * 0.45, rgb)
    return Image.fromarray(layer.astype(np.uint8))


def _shape_mask(shape: str, cx: int, cy: int, radius: int) -> Image.Image:
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
    else:
        draw.polygon([(cx + x * radius, cy + y * radius) for x, y in UNIT_OUTLINES[shape]], fill=255)
    return mask


def render_scene(scene: Scene, jitter_seed: int | None = None) -> Image.Image:
    """Draw ``scene``. With a jitter seed the shapes move by up to 2 px and pixel noise is added:
    a re-shot of the same scene, which is what an i->i query is matched against."""
    rng = random.Random(jitter_seed) if jitter_seed is not None else None
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[scene.background])
    for obj in scene.objects:
        cx, cy = POSITIONS[obj.position]
        if rng is not None:
            cx, cy = cx + rng.randint(-2, 2), cy + rng.randint(-2, 2)
        image.paste(_fill(obj.colour, obj.texture), mask=_shape_mask(obj.shape, cx, cy, SIZES[obj.size]))
    if jitter_seed is None:
        return image
    noise = np.random.default_rng(jitter_seed).integers(-10, 11, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8))


def card_scene(obj: Obj) -> Scene:
    """An object card's picture: the object alone, centred on white."""
    return Scene("white", (dataclasses.replace(obj, position="centre"),))


def _derived_seed(*parts: object) -> int:
    """A seed that depends only on ``parts`` (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big")


class ImageStore:
    """Renders each distinct picture of a dataset once and gives its path relative to the world root."""

    def __init__(self, root: Path, dataset: str, seed: int) -> None:
        self.root, self.seed = root, seed
        self.folder = f"mbeir_images/{dataset}_images"
        (root / self.folder).mkdir(parents=True, exist_ok=True)
        self.paths: dict[str, str] = {}

    def scene(self, scene: Scene, variant: int = 0) -> str:
        """Variant 0 is the clean rendering; other variants are jittered re-shots."""
        key = f"{scene.key}|{variant}"
        if key not in self.paths:
            jitter = None if variant == 0 else _derived_seed(self.seed, scene.key, variant)
            path = f"{self.folder}/{len(self.paths) + 1:06d}.png"
            # Fixed PNG parameters and no metadata, so the bytes depend on the pixels only.
            render_scene(scene, jitter).save(self.root / path, format="PNG", compress_level=6)
            self.paths[key] = path
        return self.paths[key]


# ---- text -----------------------------------------------------------------------------------
# Every size word starts with a consonant, and phrases always lead with the size, so "a" is right.
_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_TEXTURE_WORDS = {"solid": ("solid", "plain"), "striped": ("striped",), "dotted": ("dotted", "spotted")}
_TEXTURE_WITH = {"solid": "in one solid colour", "striped": "with stripes", "dotted": "with dots"}
_POSITION_WORDS = {"left": ("on the left", "at the left side"), "right": ("on the right", "at the right side"),
                   "top": ("at the top", "near the top"), "bottom": ("at the bottom", "near the bottom"),
                   "centre": ("in the centre", "in the middle")}
_MOVE_WORDS = {"left": "to the left", "right": "to the right", "top": "to the top", "bottom": "to the bottom",
               "centre": "to the centre"}

_CAPTIONS = ("{objects} on a {bg} background", "{objects}, {bg} background", "a {bg} background with {objects}",
             "{objects} against a {bg} backdrop", "picture of {objects} on {bg}")
_SCENE_QUESTIONS = ("which picture shows {objects} on a {bg} background?", "find the scene with {objects} on {bg}",
                    "what is known about the picture with {objects} against a {bg} backdrop?",
                    "describe the scene of {objects}, {bg} background")
_TITLES = ("{shapes} on {bg}", "{bg} scene with {shapes}", "{shapes}, seen on {bg}")
_ATTRIBUTE_QUESTIONS = {
    "colour": ("what colour is the {ref}?", "which colour does the {ref} have?"),
    "size": ("how big is the {ref}?", "is the {ref} small or large?"),
    "texture": ("what pattern does the {ref} have?", "is the {ref} solid, striped or dotted?"),
    "position": ("where is the {ref}?", "in which part of the picture is the {ref}?"),
}
_OBJECT_QUESTIONS_BY_POSITION = ("what is the object {where}?", "tell me about the shape {where}",
                                 "which shape is {where}?")
_OBJECT_QUESTIONS_BY_SHAPE = ("tell me about the {shape}", "what does the {shape} look like?")
# Keyed by attribute, or by (attribute, new value) where the wording depends on the value.
_EDITS = {
    "colour": ("make the {ref} {value}", "change the colour of the {ref} to {value}", "paint the {ref} {value}"),
    "shape": ("turn the {ref} into a {value}", "change the {ref} to a {value}"),
    "position": ("move the {ref} {move}", "put the {ref} {move}"),
    "background": ("make the background {value}", "change the background to {value}"),
    ("size", "large"): ("make the {ref} bigger", "enlarge the {ref}"),
    ("size", "small"): ("make the {ref} smaller", "shrink the {ref}"),
    ("texture", "solid"): ("make the {ref} plain", "remove the pattern from the {ref}"),
    ("texture", "striped"): ("give the {ref} stripes", "make the {ref} striped"),
    ("texture", "dotted"): ("give the {ref} dots", "make the {ref} dotted"),
}


def object_phrase(obj: Obj, rng: random.Random) -> str:
    """'large striped red circle' or 'large red circle with stripes' (no article, no position)."""
    size = rng.choice(_SIZE_WORDS[obj.size])
    if rng.random() < 0.5:
        return f"{size} {rng.choice(_TEXTURE_WORDS[obj.texture])} {obj.colour} {obj.shape}"
    return f"{size} {obj.colour} {obj.shape} {_TEXTURE_WITH[obj.texture]}"


def _objects_phrase(scene: Scene, rng: random.Random) -> str:
    parts = [f"a {object_phrase(o, rng)} {rng.choice(_POSITION_WORDS[o.position])}" for o in scene.objects]
    rng.shuffle(parts)  # either shape may be named first
    return " and ".join(parts)


def caption(scene: Scene, rng: random.Random) -> str:
    """A full description: every attribute of every shape and the background, in varied words."""
    return rng.choice(_CAPTIONS).format(objects=_objects_phrase(scene, rng), bg=scene.background)


def scene_question(scene: Scene, rng: random.Random) -> str:
    return rng.choice(_SCENE_QUESTIONS).format(objects=_objects_phrase(scene, rng), bg=scene.background)


def passage(scene: Scene) -> str:
    """An encyclopedia-style passage: one sentence per shape, in a fixed order and wording."""
    count = "one shape" if len(scene.objects) == 1 else "two shapes"
    sentences = [f"This picture has a {scene.background} background and {count}."]
    for obj in scene.objects:
        where = _POSITION_WORDS[obj.position][0]
        sentences.append(f"{where[0].upper()}{where[1:]} there is a {obj.size} {obj.colour} {obj.shape} "
                         f"{_TEXTURE_WITH[obj.texture]}.")
    return " ".join(sentences)


def title(scene: Scene, rng: random.Random) -> str:
    """A headline naming only the shapes and the background: the image carries the rest."""
    shapes = " and ".join(f"a {o.shape}" for o in scene.objects)
    return rng.choice(_TITLES).format(shapes=shapes, bg=scene.background)


def reference(scene: Scene, index: int) -> str:
    """How text points at one shape: by its name, plus its place when the name is not unique."""
    obj = scene.objects[index]
    if sum(o.shape == obj.shape for o in scene.objects) == 1:
        return obj.shape
    return f"{obj.shape} {_POSITION_WORDS[obj.position][0]}"


def askable(scene: Scene) -> list[tuple[int, str]]:
    """(object, attribute) pairs a question can ask about; a shape named by its place cannot be
    asked where it is."""
    return [(i, a) for i, obj in enumerate(scene.objects) for a in ("colour", "size", "texture", "position")
            if a != "position" or reference(scene, i) == obj.shape]


def attribute_question(scene: Scene, index: int, attribute: str, rng: random.Random) -> str:
    return rng.choice(_ATTRIBUTE_QUESTIONS[attribute]).format(ref=reference(scene, index))


def answer_passage(scene: Scene, index: int, attribute: str) -> str:
    """The answer to one question as a passage: the answer sentence, then the scene's passage."""
    obj = scene.objects[index]
    answer = _POSITION_WORDS[obj.position][0] if attribute == "position" else getattr(obj, attribute)
    return f"The {reference(scene, index)} is {answer}. {passage(scene)}"


def object_question(scene: Scene, index: int, rng: random.Random) -> str:
    obj = scene.objects[index]
    if reference(scene, index) == obj.shape and rng.random() < 0.5:
        return rng.choice(_OBJECT_QUESTIONS_BY_SHAPE).format(shape=obj.shape)
    return rng.choice(_OBJECT_QUESTIONS_BY_POSITION).format(where=rng.choice(_POSITION_WORDS[obj.position]))


def edit_text(scene: Scene, mod: Modification, rng: random.Random) -> str:
    key = mod.attribute if mod.attribute in _EDITS else (mod.attribute, mod.value)
    ref = "" if mod.target is None else reference(scene, mod.target)
    return rng.choice(_EDITS[key]).format(ref=ref, value=mod.value, move=_MOVE_WORDS.get(mod.value, ""))


# ---- tasks ----------------------------------------------------------------------------------
@dataclass
class Draft:
    """A candidate before it has a did. ``key`` is its content identity within one pool."""

    key: str
    modality: str
    src: dict
    txt: str | None = None
    img_path: str | None = None


@dataclass
class QueryDraft:
    txt: str | None
    img_path: str | None
    src: dict
    positives: list[Draft]
    negatives: list[Draft] = field(default_factory=list)  # hard negatives, for the pool only


@dataclass
class TaskContext:
    rng: random.Random
    bank: SceneBank
    images: ImageStore


CAPTIONS_PER_SCENE = 2  # i->t positives per query (MSCOCO has five)


def _scene_src(scene: Scene, **extra: object) -> dict:
    return {"scene": scene.to_json(), **extra}


def _image(ctx: TaskContext, scene: Scene, variant: int = 0) -> Draft:
    return Draft(scene.key, "image", _scene_src(scene), img_path=ctx.images.scene(scene, variant))


def _passage(scene: Scene) -> Draft:
    return Draft(scene.key, "text", _scene_src(scene), txt=passage(scene))


def _titled_image(ctx: TaskContext, scene: Scene) -> Draft:
    return Draft(scene.key, "image,text", _scene_src(scene), txt=title(scene, ctx.rng),
                 img_path=ctx.images.scene(scene))


def _captions(ctx: TaskContext, scene: Scene) -> list[Draft]:
    texts: list[str] = []
    while len(texts) < CAPTIONS_PER_SCENE:  # paraphrases must differ; the phrasing space is large
        text = caption(scene, ctx.rng)
        if text not in texts:
            texts.append(text)
    return [Draft(f"{scene.key}|{k}", "text", _scene_src(scene, caption=k), txt=text)
            for k, text in enumerate(texts)]


def _answer(scene: Scene, index: int, attribute: str) -> Draft:
    return Draft(f"{scene.key}|{index}|{attribute}", "text",
                 _scene_src(scene, object=index, attribute=attribute),
                 txt=answer_passage(scene, index, attribute))


def _card(ctx: TaskContext, obj: Obj) -> Draft:
    """An entity card (OVEN-like): the object alone, as a picture and a sentence."""
    attributes = {k: v for k, v in obj.to_json().items() if k != "position"}
    return Draft(json.dumps(attributes, sort_keys=True), "image,text", {"object": attributes},
                 txt=f"a {object_phrase(obj, ctx.rng)}", img_path=ctx.images.scene(card_scene(obj)))


def _query_t2i(ctx: TaskContext, scene: Scene) -> QueryDraft:
    return QueryDraft(caption(scene, ctx.rng), None, _scene_src(scene), [_image(ctx, scene)],
                      [_image(ctx, ctx.bank.near_miss(scene, ctx.rng))])


def _query_t2t(ctx: TaskContext, scene: Scene) -> QueryDraft:
    return QueryDraft(scene_question(scene, ctx.rng), None, _scene_src(scene), [_passage(scene)],
                      [_passage(ctx.bank.near_miss(scene, ctx.rng))])


def _query_t2it(ctx: TaskContext, scene: Scene) -> QueryDraft:
    return QueryDraft(caption(scene, ctx.rng), None, _scene_src(scene), [_titled_image(ctx, scene)],
                      [_titled_image(ctx, ctx.bank.near_miss(scene, ctx.rng))])


def _query_i2t(ctx: TaskContext, scene: Scene) -> QueryDraft:
    return QueryDraft(None, ctx.images.scene(scene), _scene_src(scene), _captions(ctx, scene),
                      _captions(ctx, ctx.bank.near_miss(scene, ctx.rng)))


def _query_i2i(ctx: TaskContext, scene: Scene) -> QueryDraft:
    # The query and its positive are two different re-shots of one scene (NIGHTS-like).
    return QueryDraft(None, ctx.images.scene(scene, variant=2), _scene_src(scene, variant=2),
                      [_image(ctx, scene, variant=1)], [_image(ctx, ctx.bank.near_miss(scene, ctx.rng), variant=1)])


def _query_it2t(ctx: TaskContext, scene: Scene) -> QueryDraft:
    """InfoSeek-like: the image says which scene, the question says which passage of it."""
    pairs = askable(scene)
    index, attribute = ctx.rng.choice(pairs)
    other_index, other_attribute = ctx.rng.choice([p for p in pairs if p != (index, attribute)])
    return QueryDraft(attribute_question(scene, index, attribute, ctx.rng), ctx.images.scene(scene),
                      _scene_src(scene, object=index, attribute=attribute), [_answer(scene, index, attribute)],
                      [_answer(scene, other_index, other_attribute), _near_miss_answer(ctx, scene, index, attribute)])


def _near_miss_answer(ctx: TaskContext, scene: Scene, index: int, attribute: str) -> Draft:
    """The same question's answer for a neighbouring scene (one where the question still makes sense)."""
    for _ in range(_MAX_DRAWS):
        other = ctx.bank.near_miss(scene, ctx.rng)
        if (index, attribute) in askable(other):
            return _answer(other, index, attribute)
    raise RuntimeError("no neighbouring scene keeps the question answerable")


def _query_it2i(ctx: TaskContext, scene: Scene) -> QueryDraft:
    """CIRR-like: a reference image and an edit; the target is the edited scene, rendered."""
    mod, target = ctx.bank.fresh_modification(scene, ctx.rng)
    src = {"reference": scene.to_json(), "modification": mod.to_json(), "target": target.to_json()}
    return QueryDraft(edit_text(scene, mod, ctx.rng), ctx.images.scene(scene), src, [_image(ctx, target)],
                      [_image(ctx, scene), _image(ctx, ctx.bank.near_miss(target, ctx.rng))])


def _query_it2it(ctx: TaskContext, scene: Scene) -> QueryDraft:
    """OVEN-like: the question picks one shape of the picture; the target is that shape's card."""
    index = ctx.rng.randrange(len(scene.objects))
    alone = card_scene(scene.objects[index])
    lookalike = apply_modification(alone, random_modification(alone, ctx.rng, ("shape", "colour", "size", "texture")))
    negatives = [_card(ctx, o) for i, o in enumerate(scene.objects) if i != index] + [_card(ctx, lookalike.objects[0])]
    return QueryDraft(object_question(scene, index, ctx.rng), ctx.images.scene(scene), _scene_src(scene, object=index),
                      [_card(ctx, scene.objects[index])], negatives)


@dataclass(frozen=True)
class TaskRecipe:
    query: Callable[[TaskContext, Scene], QueryDraft]
    distractors: Callable[[TaskContext], list[Draft]]  # candidates of one random item for the pool
    n_objects: int | None = None  # shapes in a query scene; None for either
    capacity: int | None = None  # how many distinct candidates the task has at most


def _random_answer(ctx: TaskContext) -> list[Draft]:
    scene = ctx.bank.fresh(ctx.rng)
    return [_answer(scene, *ctx.rng.choice(askable(scene)))]


N_OBJECT_CARDS = len(SHAPES) * len(COLOURS) * len(SIZES) * len(TEXTURES)
TASK_RECIPES = {
    0: TaskRecipe(_query_t2i, lambda ctx: [_image(ctx, ctx.bank.fresh(ctx.rng))]),
    1: TaskRecipe(_query_t2t, lambda ctx: [_passage(ctx.bank.fresh(ctx.rng))]),
    2: TaskRecipe(_query_t2it, lambda ctx: [_titled_image(ctx, ctx.bank.fresh(ctx.rng))]),
    3: TaskRecipe(_query_i2t, lambda ctx: _captions(ctx, ctx.bank.fresh(ctx.rng))),
    4: TaskRecipe(_query_i2i, lambda ctx: [_image(ctx, ctx.bank.fresh(ctx.rng), variant=1)]),
    6: TaskRecipe(_query_it2t, _random_answer),
    7: TaskRecipe(_query_it2i, lambda ctx: [_image(ctx, ctx.bank.fresh(ctx.rng))]),
    # Two shapes, so the question has to pick one; cards are objects, not scenes, and run out.
    8: TaskRecipe(_query_it2it, lambda ctx: [_card(ctx, random_object(ctx.rng, "centre"))], n_objects=2,
                  capacity=N_OBJECT_CARDS),
}
assert set(TASK_RECIPES) == set(TASKS)


def build_pool(ctx: TaskContext, task: int, query_counts: list[int],
               min_pool: int) -> tuple[list[list[QueryDraft]], list[Draft]]:
    """Sets of queries that share one pool, and that pool: their positives and hard negatives,
    then random distractors up to ``min_pool``. Equal keys are one candidate, which keeps the
    ground truth exact even when two queries' candidates coincide."""
    recipe = TASK_RECIPES[task]
    pool: dict[str, Draft] = {}
    query_sets = []
    for count in query_counts:
        queries = [recipe.query(ctx, ctx.bank.fresh(ctx.rng, recipe.n_objects)) for _ in range(count)]
        for draft in (d for query in queries for d in query.positives + query.negatives):
            pool.setdefault(draft.key, draft)
        query_sets.append(queries)
    # Each round adds a new item with probability > 0, and the capacity keeps the target reachable.
    while len(pool) < min(min_pool, recipe.capacity or min_pool):
        for draft in recipe.distractors(ctx):
            pool.setdefault(draft.key, draft)
    return query_sets, list(pool.values())


# ---- assembling the world -------------------------------------------------------------------
@dataclass
class TaskData:
    """One (dataset, task): its query records by split, its part of the union train pool, and
    its local pool (shared by its val and test queries)."""

    dataset: SyntheticDataset
    task: int
    queries: dict[str, list[dict]]
    train_pool: list[dict]
    local_pool: list[dict]

    @property
    def stem(self) -> str:
        return f"mbeir_{self.dataset.name}_task{self.task}"


def _id_order(did: str) -> tuple[int, int]:
    dataset, index = did.split(":")
    return int(dataset), int(index)


def _candidate_order(record: dict) -> tuple[int, int]:
    return _id_order(record["did"])


def _number(dataset: SyntheticDataset, task: int, query_sets: list[list[QueryDraft]], pool: list[Draft],
            qids: Iterator[int], dids: Iterator[int], rng: random.Random) -> tuple[list[list[dict]], list[dict]]:
    """Give ids and turn drafts into M-BEIR records."""
    # Shuffled before numbering so a did says nothing about relevance (a scorer that ties
    # everything must not find the positives first).
    pool = list(pool)
    rng.shuffle(pool)
    did_of = {draft.key: f"{dataset.id}:{next(dids)}" for draft in pool}
    candidates = [{"did": did_of[d.key], "txt": d.txt, "img_path": d.img_path, "modality": d.modality,
                   "src_content": json.dumps(d.src)} for d in pool]
    records = [[{"qid": f"{dataset.id}:{next(qids)}", "query_txt": q.txt, "query_img_path": q.img_path,
                 "query_modality": TASKS[task][0], "query_src_content": json.dumps(q.src),
                 "pos_cand_list": sorted({did_of[d.key] for d in q.positives}, key=_id_order),
                 "neg_cand_list": [], "task_id": task} for q in queries] for queries in query_sets]
    return records, candidates


def build_world(root: Path, size: WorldSize, seed: int) -> list[TaskData]:
    """Render the images under ``root`` and return the records of every (dataset, task)."""
    rng, bank = random.Random(seed), SceneBank()
    tasks = []
    for dataset in DATASETS:
        ctx = TaskContext(rng, bank, ImageStore(root, dataset.name, seed))
        qids, dids = itertools.count(1), itertools.count(1)  # separate counters, as in M-BEIR
        for task in dataset.tasks:
            train_sets, train_pool = build_pool(ctx, task, [size.queries["train"]], size.train_pool)
            eval_sets, local_pool = build_pool(ctx, task, [size.queries["val"], size.queries["test"]], size.local_pool)
            (train,), train_pool = _number(dataset, task, train_sets, train_pool, qids, dids, rng)
            (val, test), local_pool = _number(dataset, task, eval_sets, local_pool, qids, dids, rng)
            tasks.append(TaskData(dataset, task, {"train": train, "val": val, "test": test}, train_pool, local_pool))
    return tasks


def union_pools(tasks: list[TaskData]) -> dict[str, list[dict]]:
    """M-BEIR's global pools: train candidates; the local pools; the local pools trimmed to the
    dids the val queries reference. Each sorted by (dataset id, n)."""
    test = sorted((c for t in tasks for c in t.local_pool), key=_candidate_order)
    val_dids = {did for t in tasks for q in t.queries["val"] for did in q["pos_cand_list"]}
    return {"train": sorted((c for t in tasks for c in t.train_pool), key=_candidate_order),
            "val": [c for c in test if c["did"] in val_dids], "test": test}


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def _qrels(queries: list[dict]) -> str:
    return "".join(f"{q['qid']} 0 {did} 1 {q['task_id']}\n" for q in queries for did in q["pos_cand_list"])


def _instructions_tsv() -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(["query_modality", "cand_modality", "dataset_name", "dataset_id",
                     "prompt_1", "prompt_2", "prompt_3", "prompt_4"])
    for dataset in DATASETS:
        for task in dataset.tasks:
            writer.writerow([*TASKS[task], dataset.display_name, dataset.id, *INSTRUCTIONS[(dataset.id, task)]])
    return buffer.getvalue()


def write_files(root: Path, tasks: list[TaskData], pools: dict[str, list[dict]], seed: int) -> None:
    for t in tasks:
        for split, queries in t.queries.items():
            atomic_write_text(root / f"query/{split}/{t.stem}_{split}.jsonl", _jsonl(queries))
            atomic_write_text(root / f"qrels/{split}/{t.stem}_{split}_qrels.txt", _qrels(queries))
        atomic_write_text(root / f"cand_pool/local/{t.stem}_cand_pool.jsonl", _jsonl(t.local_pool))
    for split, pool in pools.items():
        atomic_write_text(root / f"cand_pool/global/mbeir_union_{split}_cand_pool.jsonl", _jsonl(pool))
    train = [q for t in tasks for q in t.queries["train"]]
    random.Random(_derived_seed(seed, "union_train")).shuffle(train)
    atomic_write_text(root / "query/union_train/mbeir_union_up_train.jsonl", _jsonl(train))
    atomic_write_text(root / "query/union_val/mbeir_union_val.jsonl", _jsonl([q for t in tasks for q in t.queries["val"]]))
    atomic_write_text(root / "instructions/query_instructions.tsv", _instructions_tsv())


def summarize(tasks: list[TaskData], pools: dict[str, list[dict]], size_name: str, seed: int, n_images: int) -> dict:
    return {
        "generator": GENERATOR, "format_version": FORMAT_VERSION, "seed": seed, "size": size_name,
        "size_spec": dataclasses.asdict(WORLD_SIZES[size_name]), "image_size": IMAGE_SIZE,
        "datasets": {str(d.id): d.name for d in DATASETS},
        "tasks": [{"dataset": t.dataset.name, "dataset_id": t.dataset.id, "task_id": t.task,
                   "queries": {s: len(q) for s, q in t.queries.items()},
                   "train_pool": len(t.train_pool), "local_pool": len(t.local_pool)} for t in tasks],
        "queries": {s: sum(len(t.queries[s]) for t in tasks) for s in SPLITS},
        "candidates": {s: len(pool) for s, pool in pools.items()},
        "images": n_images,
    }


def _is_world(path: Path) -> bool:
    try:
        return json.loads((path / "world.json").read_text()).get("generator") in GENERATORS
    except (OSError, ValueError, AttributeError):
        return False


# What `genius world` writes into its folder; done.json (the run state) is written last.
WORLD_OUTPUTS = ("world.json", "query", "cand_pool", "qrels", "instructions", "mbeir_images")


def world_key(size: str, seed: int) -> RunKey:
    """What a world's files depend on: its size (the numbers behind the name too, since they change
    between versions of WORLD_SIZES), its seed and the generator's format version."""
    return RunKey(config={"size": size, "size_spec": dataclasses.asdict(WORLD_SIZES[size]), "seed": seed},
                  inputs={}, extra={"generator": GENERATOR, "format_version": FORMAT_VERSION})


def world_state(path: str | Path, size: str, seed: int, force: bool = False) -> RunState:
    return RunState(path, world_key(size, seed), WORLD_OUTPUTS, stage="genius world", force=force)


def _legacy_current(path: Path, size: str, seed: int) -> bool:
    """A world written before worlds recorded their run state (no done.json) that has this key: its
    world.json says so (older ones without size_spec by their per-task query counts)."""
    try:
        summary = json.loads((path / "world.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(summary, dict) or summary.get("generator") not in GENERATORS:
        return False
    if (summary.get("format_version"), summary.get("size"), summary.get("seed")) != (FORMAT_VERSION, size, seed):
        return False
    spec = dataclasses.asdict(WORLD_SIZES[size])
    if "size_spec" in summary:
        return summary["size_spec"] == spec
    tasks = summary.get("tasks") or []
    return bool(tasks) and all(task.get("queries") == spec["queries"] for task in tasks)


def _is_current(path: Path, size: str, seed: int) -> bool:
    """A world of this key is already there (rewriting it would change every file's mtime and so
    make every later stage redo its work): its run state says so, or, for a world written before
    worlds recorded one, its world.json does."""
    if size not in WORLD_SIZES:
        return False
    state = world_state(path, size, seed)
    if state.is_done():
        return True
    return state.recorded() is None and _legacy_current(Path(path), size, seed)


def write_world(out_dir: str | Path, size: Literal["test", "demo"], seed: int = 0) -> dict:
    """Generate the world into ``out_dir`` and return its summary (also written to world.json).

    The world is built in a temporary folder and moved into place whole, so an interrupted run
    leaves nothing a reader would accept. An existing world there is replaced; any other
    non-empty path is refused, so a mistyped ``--out`` cannot delete real data.
    """
    if size not in WORLD_SIZES:
        raise ValueError(f"unknown world size {size!r}; valid sizes: {', '.join(WORLD_SIZES)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and (not any(out_dir.iterdir()) or _is_world(out_dir))):
        raise ValueError(f"{out_dir} exists and is not a generated world; choose another --out or remove it")
    with atomic_dir(out_dir) as root:
        tasks = build_world(root, WORLD_SIZES[size], seed)
        pools = union_pools(tasks)
        write_files(root, tasks, pools, seed)
        summary = summarize(tasks, pools, size, seed, sum(1 for _ in root.glob("mbeir_images/*/*.png")))
        atomic_write_json(root / "world.json", summary)  # how _is_world recognises a world
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="genius world", description="Write the synthetic M-BEIR-mini world.")
    parser.add_argument("--out", required=True, type=Path, help="output folder (the world's M-BEIR root)")
    parser.add_argument("--size", required=True, choices=tuple(WORLD_SIZES), help="test: seconds; demo: the CPU demo")
    parser.add_argument("--seed", type=int, default=0, help="same seed, byte-identical files (default 0)")
    parser.add_argument("--force", action="store_true", help="rewrite the world even if it is up to date")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    args.out = resolve_path(args.out)
    state = world_state(args.out, args.size, args.seed, force=args.force)
    if not args.force and _is_current(args.out, args.size, args.seed):
        if state.recorded() is None:  # written before worlds recorded a run state: record it, keep the files
            state.finish(images=json.loads((args.out / "world.json").read_text()).get("images"))
        print(f"the {args.size} world (seed {args.seed}) at {args.out} is up to date; nothing to do")
        return
    start = time.perf_counter()
    with user_errors_exit(parser):
        summary = write_world(args.out, args.size, args.seed)
        # The run state that makes the next `genius world` with this key skip. write_world replaced
        # the folder whole, so no older done.json survives. It is not one of the world's data files
        # (those are byte-identical for one seed); it records when the world was finished.
        state.finish(images=summary["images"])
    queries, candidates = summary["queries"], summary["candidates"]
    print(f"wrote the {args.size} world (seed {args.seed}) to {args.out} in {time.perf_counter() - start:.1f} s")
    print(f"  {len(DATASETS)} datasets, {len(summary['tasks'])} (dataset, task) pairs, {summary['images']} images")
    print("  queries:    " + ", ".join(f"{s} {queries[s]}" for s in SPLITS))
    print("  candidates: " + ", ".join(f"{s} {candidates[s]}" for s in SPLITS))


if __name__ == "__main__":
    sys.exit(main())
