"""The synthetic demo benchmark: content model, captions, splits, hard negatives, OOD captions.

A clip shows 1..max_objects coloured shapes on a background; all objects share one motion
(left, right, up, down, static, grow, shrink) at one speed (slow, fast; "none" when static).
Captions are paraphrases built from synonym tables and templates; every caption names every
attribute, and `parse_caption` reads them back (generation checks each caption with it).

Splits: train clips keep all their captions; val and test clips keep one (the query, as in
MSR-VTT 1k-A). Test clips have pairwise distinct attribute tuples, a share of them come as
one-attribute twins (time-reversed ones included), and some use colour x shape pairs held out of
train and val. A few more pairs are reserved for `novel_composition` OOD captions and never
rendered at all. Randomness: numpy Generators seeded by (seed, stream, clip index).
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from math import comb
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.config import SyntheticConfig
from pipeline.data import render as R
from pipeline.data.tables import RawDataset
from pipeline.errors import PipelineError
from pipeline.log import get_logger

log = get_logger(__name__)

# ------------------------------------------------------------------------------------------------
# Vocabulary (canonical names come from render.py; each surface word maps to one attribute value)
# ------------------------------------------------------------------------------------------------

SHAPE_WORDS = {
    "circle": ("circle", "disc", "dot"), "square": ("square", "box", "block"),
    "triangle": ("triangle", "wedge", "arrowhead"), "cross": ("cross", "plus sign", "plus"),
    "ring": ("ring", "hoop", "donut"),
}
COLOUR_WORDS = {
    "red": ("red", "crimson", "scarlet"), "green": ("green", "emerald", "lime"),
    "blue": ("blue", "cobalt", "sapphire"), "yellow": ("yellow", "golden", "lemon"),
    "magenta": ("magenta", "pink", "fuchsia"), "orange": ("orange", "amber", "tangerine"),
    "cyan": ("cyan", "turquoise", "aqua"),
}
BACKGROUND_WORDS = {
    "black": ("black", "dark", "pitch-black"), "white": ("white", "bright white", "snow-white"),
    "gray": ("gray", "grey", "ash-gray"), "checkered": ("checkered", "checkerboard", "chequered"),
}
BACKGROUND_NOUNS = ("background", "backdrop", "canvas")
# (singular, plural); lists of opposite directions are index-aligned, so reversal keeps the wording
MOTION_WORDS = {
    "left": (("moves to the left", "move to the left"), ("slides left", "slide left"),
             ("drifts leftward", "drift leftward"), ("travels to the left", "travel to the left"),
             ("heads left", "head left")),
    "right": (("moves to the right", "move to the right"), ("slides right", "slide right"),
              ("drifts rightward", "drift rightward"),
              ("travels to the right", "travel to the right"), ("heads right", "head right")),
    "up": (("moves up", "move up"), ("slides upward", "slide upward"), ("rises", "rise"),
           ("climbs upward", "climb upward"), ("travels up", "travel up")),
    "down": (("moves down", "move down"), ("slides downward", "slide downward"), ("falls", "fall"),
             ("drops downward", "drop downward"), ("travels down", "travel down")),
    "static": (("stays still", "stay still"), ("does not move", "do not move"),
               ("remains in place", "remain in place"), ("sits motionless", "sit motionless"),
               ("stays put", "stay put")),
    "grow": (("grows", "grow"), ("gets bigger", "get bigger"), ("expands", "expand"),
             ("swells", "swell"), ("increases in size", "increase in size")),
    "shrink": (("shrinks", "shrink"), ("gets smaller", "get smaller"), ("contracts", "contract"),
               ("dwindles", "dwindle"), ("decreases in size", "decrease in size")),
}
SPEED_WORDS = {
    "slow": ("slowly", "at a slow pace", "gently", "leisurely"),
    "fast": ("quickly", "fast", "rapidly", "swiftly", "at high speed"),
}
COUNT_WORDS = {1: ("one object", "a single shape", "one shape"),
               2: ("two objects", "two shapes", "a pair of shapes"),
               3: ("three objects", "three shapes", "a trio of shapes")}
TEMPLATES = ("{s} {v} on {b}", "on {b}, {s} {v}", "{s} {v} against {b}", "{c}: {s} {v} on {b}",
             "{b} where {s} {v}", "in front of {b}, {s} {v}", "{c} on {b}: {s} {v}")

# Words the generator never renders (OOD `novel_word` captions).
NOVEL_COLOURS = ("purple", "brown", "violet", "maroon", "beige", "silver", "olive", "indigo")
NOVEL_SHAPES = ("hexagon", "pentagon", "heart", "arrow", "crescent", "oval", "diamond", "spiral")
NOVEL_VERBS = (("spins", "spin"), ("rotates", "rotate"), ("bounces", "bounce"),
               ("zigzags", "zigzag"), ("flickers", "flicker"), ("wobbles", "wobble"),
               ("vanishes", "vanish"), ("jumps", "jump"))
NOVEL_SUBJECTS = ("a dog", "a man", "a woman", "a child", "a cat", "a horse", "a bird",
                  "a group of people")
NOVEL_ACTIONS = ("runs", "jumps", "dances", "plays", "swims", "sleeps", "sings", "walks")
NOVEL_PLACES = ("on a beach", "in a kitchen", "in a park", "on a busy street", "in the snow",
                "on a stage", "in a forest", "by a river")

STREAM_CONTENT, STREAM_CAPTION, STREAM_NOISE, STREAM_GLOBAL, STREAM_OOD = 1, 2, 3, 4, 5
N_RESERVED = 3  # colour x shape pairs never rendered in any split (novel_composition OOD)
TWIN_KINDS = ("reverse", "colour", "shape", "background", "speed", "motion")
DIRECTED = ("left", "right", "up", "down", "grow", "shrink")


def _lexicon() -> dict[str, tuple[str, str]]:
    lex: dict[str, tuple[str, str]] = {}
    tables = [("colour", COLOUR_WORDS), ("shape", SHAPE_WORDS), ("background", BACKGROUND_WORDS),
              ("speed", SPEED_WORDS),
              ("motion", {m: sum(forms, ()) for m, forms in MOTION_WORDS.items()})]
    for field, table in tables:
        for canon, words in table.items():
            for w in words:
                if lex.get(w, (field, canon)) != (field, canon):
                    raise AssertionError(f"ambiguous caption word {w!r}")
                lex[w] = (field, canon)
    return lex


_LEXICON = _lexicon()
_PATTERN = re.compile(
    r"(?<![\w-])(" + "|".join(re.escape(w) for w in sorted(_LEXICON, key=len, reverse=True))
    + r")(?![\w-])"
)

# ------------------------------------------------------------------------------------------------
# Content
# ------------------------------------------------------------------------------------------------

Pair = tuple[str, str]  # (shape, colour)


@dataclass(frozen=True)
class Content:
    """The attribute tuple of a clip; objects sorted, so equal content = equal tuple."""

    objects: tuple[Pair, ...]
    background: str
    motion: str
    speed: str

    @property
    def n_objects(self) -> int:
        return len(self.objects)

    def reversed(self) -> Content:
        """The same clip played backwards."""
        return replace(self, motion=R.REVERSE[self.motion])


def make_content(objects: Iterable[Pair], background: str, motion: str, speed: str) -> Content:
    return Content(tuple(sorted(objects)), background, motion, speed)


def parse_caption(text: str) -> Content:
    """Read the attribute tuple back from a caption (raises ValueError when ambiguous)."""
    found: dict[str, list[str]] = {"colour": [], "shape": [], "background": [], "speed": [],
                                   "motion": []}
    for m in _PATTERN.finditer(text.lower()):
        field, canon = _LEXICON[m.group(1)]
        found[field].append(canon)
    shapes, colours = found["shape"], found["colour"]
    if not shapes or len(shapes) != len(colours):
        raise ValueError(f"objects unclear in {text!r}")
    if len(found["background"]) != 1 or len(found["motion"]) != 1 or len(found["speed"]) > 1:
        raise ValueError(f"background, motion or speed unclear in {text!r}")
    motion = found["motion"][0]
    speed = found["speed"][0] if found["speed"] else R.STATIC_SPEED
    if (motion == "static") != (speed == R.STATIC_SPEED):
        raise ValueError(f"speed does not fit the motion in {text!r}")
    return make_content(zip(shapes, colours, strict=True), found["background"][0], motion, speed)


def attribute_diff(a: Content, b: Content) -> list[str]:
    """Names of the attributes in which two clips differ (colour/shape: of one object)."""
    diff = [k for k in ("background", "motion", "speed") if getattr(a, k) != getattr(b, k)]
    if a.n_objects != b.n_objects:
        return [*diff, "n_objects"]
    only_a = list((Counter(a.objects) - Counter(b.objects)).elements())
    only_b = list((Counter(b.objects) - Counter(a.objects)).elements())
    if len(only_a) > 1:
        diff.append("objects")
    elif only_a:
        (sa, ca), (sb, cb) = only_a[0], only_b[0]
        diff += (["shape"] if sa != sb else []) + (["colour"] if ca != cb else [])
    return diff


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index])


def _pick(rng: np.random.Generator, options: Sequence) -> object:
    return options[int(rng.integers(len(options)))]


def _draw_content(rng: np.random.Generator, max_objects: int, pairs: Sequence[Pair],
                  force: Pair | None = None, motions: Sequence[str] = R.MOTIONS) -> Content:
    n = int(rng.integers(1, max_objects + 1))
    objs = [pairs[i] for i in rng.choice(len(pairs), size=n, replace=False)]
    if force is not None and force not in objs:
        objs[0] = force
    motion = str(_pick(rng, motions))
    speed = R.STATIC_SPEED if motion == "static" else str(_pick(rng, R.SPEEDS))
    return make_content(objs, str(_pick(rng, list(R.BACKGROUNDS))), motion, speed)


def _draw_starts(rng: np.random.Generator, c: Content, size: int) -> tuple[Pair, ...]:
    """Random start centres keeping every object in frame and apart for the whole clip."""
    lo, hi = R.start_range(c.motion, c.speed, size)
    sep = 2 * R.max_radius(c.motion, c.speed, size) + R.GAP
    cand = rng.uniform(lo, hi, size=(512, c.n_objects, 2)).round(2)
    ok = np.ones(len(cand), dtype=bool)
    for i in range(c.n_objects):
        for j in range(i + 1, c.n_objects):
            ok &= np.abs(cand[:, i] - cand[:, j]).max(-1) >= sep
    if not ok.any():
        raise PipelineError(f"cannot place {c.n_objects} objects moving {c.motion} in {size} px")
    return tuple((float(x), float(y)) for x, y in cand[int(np.argmax(ok))])


def _twin_candidates(rng: np.random.Generator, c: Content, kind: str,
                     pairs: set[Pair]) -> list[Content]:
    """Contents that differ from `c` in exactly the attribute `kind`."""
    out: list[Content] = []
    if kind == "reverse" and c.motion in DIRECTED:
        out.append(c.reversed())
    elif kind in ("colour", "shape"):
        for k, (shape, colour) in enumerate(c.objects):
            options = R.COLOURS if kind == "colour" else R.SHAPES
            for o in options:
                new = (shape, o) if kind == "colour" else (o, colour)
                rest = c.objects[:k] + c.objects[k + 1:]
                if new in pairs and new != c.objects[k] and new not in rest:
                    out.append(replace(c, objects=tuple(sorted((*rest, new)))))
    elif kind == "background":
        out += [replace(c, background=b) for b in R.BACKGROUNDS if b != c.background]
    elif kind == "speed" and c.motion != "static":
        out.append(replace(c, speed="fast" if c.speed == "slow" else "slow"))
    elif kind == "motion" and c.motion != "static":
        out += [replace(c, motion=m) for m in DIRECTED if m not in (c.motion, R.REVERSE[c.motion])]
    return [out[i] for i in rng.permutation(len(out))]


def _twin_starts(rng: np.random.Generator, base: Content, starts: tuple[tuple[float, float], ...],
                 twin: Content, kind: str, size: int) -> tuple[tuple[float, float], ...]:
    """A twin's start centres: the partner's end positions when reversed, else its own layout
    (objects keep their places; a changed object takes the place of the one it replaces)."""
    if kind in ("colour", "shape"):
        where = dict(zip(base.objects, starts, strict=True))
        gone = next(where[o] for o in base.objects if o not in twin.objects)
        return tuple(where.get(o, gone) for o in twin.objects)
    arr = np.asarray(starts)
    if kind == "reverse":
        arr = R.end_positions(arr, base.motion, base.speed, size).round(2)
    if R.layout_ok(arr, twin.motion, twin.speed, size):
        return tuple((float(x), float(y)) for x, y in arr)
    return _draw_starts(rng, twin, size)


def _make_twin(rng: np.random.Generator, base: Content, starts: tuple[tuple[float, float], ...],
               pairs: set[Pair], used: set[Content], size: int
               ) -> tuple[Content, tuple[tuple[float, float], ...], str] | None:
    """A not yet used clip that differs from `base` in one attribute (reversal half the time)."""
    others = [TWIN_KINDS[1:][i] for i in rng.permutation(len(TWIN_KINDS) - 1)]
    kinds = ["reverse", *others] if rng.random() < 0.5 else [*others, "reverse"]
    for kind in kinds:
        for cand in _twin_candidates(rng, base, kind, pairs):
            if cand not in used:
                return cand, _twin_starts(rng, base, starts, cand, kind, size), kind
    return None


# ------------------------------------------------------------------------------------------------
# Captions
# ------------------------------------------------------------------------------------------------


@dataclass
class _Words:
    """One paraphrase's word choices (reused, with the opposite motion, for the reversed text)."""

    objects: list[tuple[str, str]]  # (colour word, shape word)
    m_idx: int
    speed: str
    background: str


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _choose_words(rng: np.random.Generator, c: Content) -> _Words:
    objs = [c.objects[i] for i in rng.permutation(c.n_objects)]
    return _Words(
        objects=[(str(_pick(rng, COLOUR_WORDS[col])), str(_pick(rng, SHAPE_WORDS[s])))
                 for s, col in objs],
        m_idx=int(rng.integers(len(MOTION_WORDS[c.motion]))),
        speed="" if c.motion == "static" else str(_pick(rng, SPEED_WORDS[c.speed])),
        background=str(_pick(rng, BACKGROUND_WORDS[c.background])),
    )


def _sentence(rng: np.random.Generator, w: _Words, verbs: tuple[str, str], template: str) -> str:
    """Fill `template` with the subject list, verb phrase (+ speed) and background phrase."""
    items = [_a(f"{col} {shape}") for col, shape in w.objects]
    n = len(items)
    subject = items[0] if n == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    if n == 2 and rng.random() < 0.3:
        subject += " both"
    verb = (verbs[1] if n > 1 else verbs[0]) + (f" {w.speed}" if w.speed else "")
    bg = _a(f"{w.background} {_pick(rng, BACKGROUND_NOUNS)}")
    count = str(_pick(rng, COUNT_WORDS[n])) if "{c}" in template else ""
    return template.format(s=subject, v=verb, b=bg, c=count)


def captions_for(rng: np.random.Generator, c: Content, k: int) -> list[tuple[str, str]]:
    """Up to k distinct (caption, reversed caption) paraphrases ("" reversed when static)."""
    out: list[tuple[str, str]] = []
    order = rng.permutation(len(TEMPLATES))
    for attempt in range(20 * k):
        if len(out) == k:
            break
        template = TEMPLATES[order[attempt % len(order)]]
        w = _choose_words(rng, c)
        state = rng.bit_generator.state  # the reversed caption re-draws the same choices
        text = _sentence(rng, w, MOTION_WORDS[c.motion][w.m_idx], template)
        rev = ""
        if c.motion != "static":
            rng.bit_generator.state = state
            rev = _sentence(rng, w, MOTION_WORDS[R.REVERSE[c.motion]][w.m_idx], template)
        if all(text != t for t, _ in out):
            out.append((text, rev))
    return out


def _novel_word(rng: np.random.Generator, sub: int, max_objects: int,
                pairs: Sequence[Pair]) -> str:
    """A caption with a colour, shape or verb the generator never renders, or an everyday scene."""
    if sub == 3:
        return " ".join(str(_pick(rng, t)) for t in (NOVEL_SUBJECTS, NOVEL_ACTIONS, NOVEL_PLACES))
    c = _draw_content(rng, max_objects, pairs, motions=DIRECTED)
    w = _choose_words(rng, c)
    k = int(rng.integers(c.n_objects))
    colour, shape = w.objects[k]
    verbs = MOTION_WORDS[c.motion][w.m_idx]
    if sub == 0:
        w.objects[k] = (str(_pick(rng, NOVEL_COLOURS)), shape)
    elif sub == 1:
        w.objects[k] = (colour, str(_pick(rng, NOVEL_SHAPES)))
    else:
        verbs = NOVEL_VERBS[int(rng.integers(len(NOVEL_VERBS)))]
    return _sentence(rng, w, verbs, str(_pick(rng, TEMPLATES)))


def _novel_composition(rng: np.random.Generator, sub: int, max_objects: int,
                       pairs: Sequence[Pair], reserved: Sequence[Pair]) -> str:
    """Known words only: a reserved colour x shape pair, or more objects than any clip has."""
    if sub == 0 and reserved:
        c = _draw_content(rng, max_objects, pairs, force=reserved[int(rng.integers(len(reserved)))])
        return captions_for(rng, c, 1)[0][0]
    c = _draw_content(rng, 1, pairs)
    idx = rng.choice(len(pairs), size=max_objects + 1, replace=False)
    c = make_content([pairs[i] for i in idx], c.background, c.motion, c.speed)
    template = str(_pick(rng, [t for t in TEMPLATES if "{c}" not in t]))
    w = _choose_words(rng, c)
    return _sentence(rng, w, MOTION_WORDS[c.motion][w.m_idx], template)


def ood_captions(seed: int, n: int, max_objects: int, pairs: Sequence[Pair],
                 reserved: Sequence[Pair]) -> pd.DataFrame:
    """`n` captions of each OOD kind: caption_id, text, kind (novel_word, novel_composition)."""
    rows: list[tuple[str, str, str]] = []
    for k, kind in enumerate(("novel_word", "novel_composition")):
        rng = _rng(seed, STREAM_OOD, k)
        texts: dict[str, None] = {}
        for attempt in range(50 * n):
            if len(texts) == n:
                break
            if kind == "novel_word":
                texts[_novel_word(rng, attempt % 4, max_objects, pairs)] = None
            else:
                texts[_novel_composition(rng, attempt % 2, max_objects, pairs, reserved)] = None
        rows += [(f"ood-{kind}-{i:04d}", t, kind) for i, t in enumerate(texts)]
    return pd.DataFrame(rows, columns=["caption_id", "text", "kind"])


# ------------------------------------------------------------------------------------------------
# Planning: the whole benchmark as data, before any pixel is drawn
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipPlan:
    """One clip: identity, split, content, layout, captions and hard-negative links."""

    index: int  # global clip index (the seed key)
    video_id: str
    split: str
    content: Content
    starts: tuple[tuple[float, float], ...]  # one (x, y) per object, in content.objects order
    captions: tuple[tuple[str, str], ...] = ()  # (text, reversed_text)
    twin_of: str = ""
    twin_kind: str = ""
    seen_combo: bool = True


@dataclass
class Plan:
    clips: list[ClipPlan]
    holdout: list[Pair]  # pairs only test clips may render
    reserved: list[Pair]  # pairs no clip renders (novel_composition)
    ood: pd.DataFrame


def _validate(cfg: SyntheticConfig, seed: int) -> None:
    checks = [
        (seed >= 0, "seed must be >= 0"),
        (cfg.size >= 32 and cfg.size % 2 == 0, "prepare.synthetic.size must be even and >= 32"),
        (cfg.fps >= 1 and cfg.seconds > 0, "prepare.synthetic.fps and seconds must be positive"),
        (cfg.n_train >= 1 and cfg.n_val >= 0 and cfg.n_test >= 0, "split sizes: n_train >= 1"),
        (cfg.captions_per_clip >= 1, "prepare.synthetic.captions_per_clip must be >= 1"),
        (1 <= cfg.max_objects <= 3, "prepare.synthetic.max_objects must be 1..3"),
        (cfg.noise >= 0, "prepare.synthetic.noise must be >= 0"),
        (0 <= cfg.holdout_pairs <= 14, "prepare.synthetic.holdout_pairs must be 0..14"),
        (0.0 <= cfg.twin_fraction <= 1.0, "prepare.synthetic.twin_fraction must be in [0, 1]"),
        (cfg.n_ood >= 0 and cfg.workers >= 1, "n_ood must be >= 0 and workers >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise PipelineError(message)
    n_pairs = len(R.SHAPES) * len(R.COLOURS) - N_RESERVED
    per_objects = len(R.BACKGROUNDS) * (len(DIRECTED) * len(R.SPEEDS) + 1)
    for split, n, pairs in (("val", cfg.n_val, n_pairs - cfg.holdout_pairs),
                            ("test", cfg.n_test, n_pairs)):
        capacity = per_objects * sum(comb(pairs, k) for k in range(1, cfg.max_objects + 1))
        if n > capacity // 2:  # keep rejection sampling of unique tuples cheap
            raise PipelineError(f"too few distinct attribute tuples for {n} {split} clips "
                                f"(at most {capacity // 2}): lower n_{split} or raise max_objects")


def _special_pairs(seed: int, k: int) -> list[Pair]:
    """k distinct colour x shape pairs, spread over colours and shapes."""
    g = _rng(seed, STREAM_GLOBAL, 0)
    shapes = [R.SHAPES[i] for i in g.permutation(len(R.SHAPES))]
    colours = [list(R.COLOURS)[i] for i in g.permutation(len(R.COLOURS))]
    return [(shapes[i % len(shapes)], colours[i % len(colours)]) for i in range(k)]


def _draw_unique(rng: np.random.Generator, category: str, max_objects: int, size: int,
                 pairs: Sequence[Pair], holdout: Sequence[Pair], train: Sequence[Content],
                 used: set[Content]) -> tuple[Content, tuple[tuple[float, float], ...]]:
    """A clip whose content is not in `used` (then added to it).

    category: "fresh" (random), "seen" (a train clip's tuple, new layout; random if none left),
    "holdout" (one object uses a held-out pair), "twin_base" (a directed motion).
    """
    for attempt in range(5000):
        if category == "seen" and attempt < 50:
            c = train[int(rng.integers(len(train)))]
        else:
            force = holdout[int(rng.integers(len(holdout)))] if category == "holdout" else None
            motions = DIRECTED if category == "twin_base" else R.MOTIONS
            c = _draw_content(rng, max_objects, pairs, force=force, motions=motions)
        if c not in used:
            used.add(c)
            return c, _draw_starts(rng, c, size)
    raise PipelineError("too few distinct attribute tuples for the val/test size: "
                        "lower prepare.synthetic.n_val/n_test or raise max_objects")


def _plan_test(cfg: SyntheticConfig, seed: int, first: int, pairs: Sequence[Pair],
               holdout: Sequence[Pair], train: Sequence[Content]) -> list[ClipPlan]:
    """Test clips: unique tuples; twin pairs first, then seen / held-out-pair / fresh clips."""
    used: set[Content] = set()
    n_twins = 2 * int(round(cfg.n_test * cfg.twin_fraction / 2))
    categories = ("seen", "holdout" if holdout else "fresh", "fresh", "fresh")
    clips: list[ClipPlan] = []
    for j in range(cfg.n_test):
        rng = _rng(seed, STREAM_CONTENT, first + j)
        vid = f"syn-test-{j:05d}"
        if j < n_twins and j % 2 == 1:
            base = clips[-1]
            twin = _make_twin(rng, base.content, base.starts, set(pairs), used, cfg.size)
            if twin is not None:
                c, starts, kind = twin
                used.add(c)
                clips[-1] = replace(base, twin_of=vid, twin_kind=kind)
                clips.append(ClipPlan(first + j, vid, "test", c, starts,
                                      twin_of=base.video_id, twin_kind=kind))
                continue
        category = "twin_base" if j < n_twins else categories[(j - n_twins) % len(categories)]
        c, starts = _draw_unique(rng, category, cfg.max_objects, cfg.size, pairs, holdout, train,
                                 used)
        clips.append(ClipPlan(first + j, vid, "test", c, starts))
    return clips


def plan_benchmark(cfg: SyntheticConfig, seed: int) -> Plan:
    """Contents, layouts, captions and links of every clip, and the OOD captions (no I/O)."""
    _validate(cfg, seed)
    special = _special_pairs(seed, N_RESERVED + cfg.holdout_pairs)
    reserved, holdout = special[:N_RESERVED], special[N_RESERVED:]
    all_pairs = [(s, c) for s in R.SHAPES for c in R.COLOURS]
    train_pairs = [p for p in all_pairs if p not in special]
    test_pairs = [p for p in all_pairs if p not in reserved]

    clips: list[ClipPlan] = []
    for j in range(cfg.n_train):
        rng = _rng(seed, STREAM_CONTENT, j)
        c = _draw_content(rng, cfg.max_objects, train_pairs)
        clips.append(ClipPlan(j, f"syn-train-{j:05d}", "train", c, _draw_starts(rng, c, cfg.size)))
    train = [clip.content for clip in clips]
    used_val: set[Content] = set()
    for j in range(cfg.n_val):
        index = cfg.n_train + j
        c, starts = _draw_unique(_rng(seed, STREAM_CONTENT, index), "fresh", cfg.max_objects,
                                 cfg.size, train_pairs, [], train, used_val)
        clips.append(ClipPlan(index, f"syn-val-{j:05d}", "val", c, starts))
    clips += _plan_test(cfg, seed, cfg.n_train + cfg.n_val, test_pairs, holdout, train)

    seen = set(train)
    out = []
    for clip in clips:
        k = cfg.captions_per_clip if clip.split == "train" else 1
        caps = captions_for(_rng(seed, STREAM_CAPTION, clip.index), clip.content, k)
        for text, rev in caps:  # every caption must name every attribute, unambiguously
            if parse_caption(text) != clip.content or (
                rev and parse_caption(rev) != clip.content.reversed()
            ):
                raise AssertionError(f"caption does not match its clip: {text!r}")
        out.append(replace(clip, captions=tuple(caps), seen_combo=clip.content in seen))
    ood = ood_captions(seed, cfg.n_ood, cfg.max_objects, train_pairs, reserved)
    return Plan(out, holdout, reserved, ood)


# ------------------------------------------------------------------------------------------------
# Rendering and the public entry point
# ------------------------------------------------------------------------------------------------


def render_jobs(plan: Plan, cfg: SyntheticConfig, seed: int, out_dir: Path) -> list[R.RenderJob]:
    """One RenderJob per clip; its fingerprint covers every input of the pixels."""
    jobs = []
    for clip in plan.clips:
        job = R.RenderJob(
            video_id=clip.video_id, path=str(out_dir / f"{clip.video_id}.mp4"),
            shapes=tuple(s for s, _ in clip.content.objects),
            colours=tuple(c for _, c in clip.content.objects),
            background=clip.content.background, motion=clip.content.motion,
            speed=clip.content.speed, starts=clip.starts, size=cfg.size, fps=cfg.fps,
            n_frames=R.n_frames_of(cfg.seconds, cfg.fps), noise=cfg.noise,
            noise_seed=(seed, STREAM_NOISE, clip.index), fingerprint="",
        )
        fields = {k: v for k, v in job.__dict__.items() if k not in ("path", "fingerprint")}
        blob = json.dumps([R.RENDER_VERSION, fields], sort_keys=True).encode()
        jobs.append(replace(job, fingerprint="dret-syn-" + hashlib.sha256(blob).hexdigest()[:24]))
    return jobs


def render_all(jobs: Sequence[R.RenderJob], workers: int, progress: bool = True) -> int:
    """Render + encode clips (a pool of `workers` processes, ordered); returns how many were
    rendered (the rest were current already)."""
    bar = {"total": len(jobs), "desc": "synthetic clips", "unit": "clip", "disable": not progress}
    if workers <= 1 or len(jobs) <= 1:
        return sum(rendered for _, rendered in tqdm(map(R.render_job, jobs), **bar))
    # fork: workers only run numpy and ffmpeg, and fork needs no `__main__` guard in callers
    method = "fork" if "fork" in mp.get_all_start_methods() else None
    with mp.get_context(method).Pool(workers) as pool:
        chunk = max(1, min(8, len(jobs) // (4 * workers)))
        results = pool.imap(R.render_job, jobs, chunksize=chunk)
        return sum(rendered for _, rendered in tqdm(results, **bar))


def videos_table(plan: Plan) -> pd.DataFrame:
    """videos: video_id, path, split + the synthetic attribute columns (contracts.md)."""
    rows = [{
        "video_id": c.video_id, "path": f"{c.video_id}.mp4", "split": c.split,
        "shapes": "|".join(s for s, _ in c.content.objects),
        "colours": "|".join(col for _, col in c.content.objects),
        "background": c.content.background, "motion": c.content.motion,
        "speed": c.content.speed, "n_objects": c.content.n_objects,
        "seen_combo": c.seen_combo, "twin_of": c.twin_of,
    } for c in plan.clips]
    df = pd.DataFrame(rows)
    return df.astype({"n_objects": "int64", "seen_combo": "bool"})


def captions_table(plan: Plan) -> pd.DataFrame:
    """captions: caption_id, video_id, text, split, reversed_text."""
    rows = [(f"{c.video_id}-c{k}", c.video_id, text, c.split, rev)
            for c in plan.clips for k, (text, rev) in enumerate(c.captions)]
    return pd.DataFrame(rows, columns=["caption_id", "video_id", "text", "split",
                                       "reversed_text"])


def summary(plan: Plan) -> dict:
    """Deterministic facts about the benchmark, for summary.json."""
    test = [c for c in plan.clips if c.split == "test"]
    held = set(plan.holdout)
    return {"synthetic": {
        "holdout_pairs": [f"{c} {s}" for s, c in plan.holdout],
        "reserved_pairs": [f"{c} {s}" for s, c in plan.reserved],
        "test_unseen_share": float(np.mean([not c.seen_combo for c in test])) if test else 0.0,
        "test_heldout_pair_clips": sum(bool(held & set(c.content.objects)) for c in test),
        "test_twin_pairs": sum(1 for c in test if c.twin_of) // 2,
        "twin_kinds": dict(sorted(Counter(c.twin_kind for c in test if c.twin_kind).items())),
        "ood_captions": {k: int(v) for k, v in plan.ood["kind"].value_counts().sort_index()
                         .items()},
    }}


def generate(cfg: SyntheticConfig, out_dir: Path, seed: int, *,
             progress: bool = True) -> RawDataset:
    """Plan the benchmark, write `<out_dir>/<video_id>.mp4` (reusing current clips), return
    the tables. The same seed and config give identical tables and identical decoded frames."""
    out_dir = Path(out_dir)
    plan = plan_benchmark(cfg, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = render_jobs(plan, cfg, seed, out_dir)
    start = time.perf_counter()
    rendered = render_all(jobs, cfg.workers, progress)
    elapsed = time.perf_counter() - start
    log.info("synthetic: %d clips rendered, %d reused, %.1f s (%.1f clips/s rendered)",
             rendered, len(jobs) - rendered, elapsed, rendered / max(elapsed, 1e-9))
    return RawDataset(videos=videos_table(plan), captions=captions_table(plan),
                      video_root=out_dir, ood_captions=plan.ood, extra_summary=summary(plan))
